#include "copy/copy_backend.hpp"

#include <unistd.h>

#include "engine.hpp"

namespace fastckpt {

CopyBackend::CopyBackend() : pid_(static_cast<int>(::getpid())) {}

void CopyBackend::check_process() const {
  if (static_cast<int>(::getpid()) != pid_)
    throw std::invalid_argument(forked_message(
        std::string("copy backend (") + name() + ")",
        "create a new copy backend (and pinned buffers) in this process"));
}

}  // namespace fastckpt

#include "copy/pinned.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <stdexcept>

#include "common.hpp"

namespace fastckpt {

PinMethod parse_pin_method(const std::string& name) {
  if (name == "register") return PinMethod::kRegister;
  if (name == "memfd") return PinMethod::kMemfd;
  if (name == "alloc") return PinMethod::kAlloc;
  throw std::invalid_argument("pin method '" + name + "': expected register, memfd or alloc");
}

const char* pin_method_name(PinMethod m) noexcept {
  switch (m) {
    case PinMethod::kRegister:
      return "register";
    case PinMethod::kMemfd:
      return "memfd";
    case PinMethod::kAlloc:
      return "alloc";
  }
  return "?";
}

namespace {

// A shared mapping of a fresh memfd of `len` bytes (the descriptor is closed again).
void* map_memfd(size_t len) {
  const int fd = ::memfd_create("fastckpt-staging", MFD_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw IoError(err, "memfd_create failed: " + errno_text(err), "");
  }
  if (::ftruncate(fd, static_cast<off_t>(len)) != 0) {
    const int err = errno;
    ::close(fd);
    throw IoError(err, "cannot size a memfd to " + std::to_string(len) + " bytes: " +
                           errno_text(err), "");
  }
  void* m = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  ::close(fd);
  if (m == MAP_FAILED)
    throw IoError(err, "cannot map a memfd of " + std::to_string(len) + " bytes: " +
                           errno_text(err), "");
  return m;
}

}  // namespace

PinnedMemory::PinnedMemory(std::shared_ptr<CopyBackend> backend, uint64_t nbytes,
                           PinMethod method)
    : backend_(std::move(backend)), method_(method), nbytes_(nbytes) {
  if (!backend_) throw std::invalid_argument("pinned memory needs a copy backend");
  if (nbytes == 0) throw std::invalid_argument("pinned memory of 0 bytes");
  backend_->check_process();
  const auto t0 = std::chrono::steady_clock::now();
  switch (method) {
    case PinMethod::kRegister:
      anon_ = std::make_unique<AlignedBuffer>(static_cast<size_t>(nbytes), true);
      data_ = anon_->data();
      backend_->pin(data_, nbytes);  // on failure anon_ unmaps itself
      pinned_ = true;
      break;
    case PinMethod::kMemfd: {
      const uint64_t page = 4096;
      map_len_ = static_cast<size_t>((nbytes + page - 1) / page * page);
      map_ = map_memfd(map_len_);
      data_ = static_cast<char*>(map_);
      try {
        backend_->pin(data_, nbytes);
      } catch (...) {
        ::munmap(map_, map_len_);
        throw;
      }
      pinned_ = true;
      break;
    }
    case PinMethod::kAlloc:
      data_ = static_cast<char*>(backend_->host_alloc(nbytes));
      break;
  }
  setup_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

PinnedMemory::~PinnedMemory() {
  // The backend skips device calls in a child of fork(); the mappings are plain memory there.
  switch (method_) {
    case PinMethod::kRegister:
      if (pinned_) backend_->unpin(data_);
      break;  // anon_ unmaps
    case PinMethod::kMemfd:
      if (pinned_) backend_->unpin(data_);
      ::munmap(map_, map_len_);
      break;
    case PinMethod::kAlloc:
      backend_->host_free(data_, nbytes_);
      break;
  }
}

}  // namespace fastckpt

// Backend: one io_uring (liburing) serviced by a dedicated thread, up to `queue_depth` reads in
// flight, files registered with the ring while they have reads in flight. Only compiled when
// liburing was found at build time (FASTCKPT_HAVE_URING).
#pragma once

#include <memory>
#include <string>

#include "backend.hpp"

namespace fastckpt {

struct UringProbe {
  bool compiled = false;
  bool usable = false;
  int err = 0;          // errno of the failure when !usable
  std::string message;  // why not usable ("" when usable)
  std::string version;  // liburing version compiled against
};

// Whether io_uring can be used in this process (cached; a test hook can force a failure).
UringProbe probe_uring();

// Test hook: make every io_uring setup fail with `err` (0 turns the fault off).
void set_uring_setup_fault(int err);
int uring_setup_fault();

// Starts a ring thread. Throws IoError when the ring cannot be set up.
std::unique_ptr<Backend> make_uring_backend(unsigned queue_depth, IoContext& ctx);

}  // namespace fastckpt

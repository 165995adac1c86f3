// Page-locked host memory for the staging ring, made one of three ways (which is fastest depends
// on the machine; the loader measures and records it):
//   register: 2 MiB-aligned anonymous memory advised for transparent huge pages, then registered
//             with the device (cuMemHostRegister);
//   memfd:    a memfd mapped MAP_SHARED, then registered;
//   alloc:    the driver's own pinned allocation (cuMemHostAlloc).
// With the fake backend, pinning is a counted no-op and the memory is the same kind.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "buffer.hpp"
#include "copy/copy_backend.hpp"

namespace fastckpt {

enum class PinMethod { kRegister, kMemfd, kAlloc };

// "register" | "memfd" | "alloc"; std::invalid_argument otherwise.
PinMethod parse_pin_method(const std::string& name);
const char* pin_method_name(PinMethod m) noexcept;

class PinnedMemory {
 public:
  // Throws std::invalid_argument (nbytes 0, a backend from another process), IoError (mapping
  // failed) or DeviceError (pinning failed; nothing is left mapped).
  PinnedMemory(std::shared_ptr<CopyBackend> backend, uint64_t nbytes, PinMethod method);
  ~PinnedMemory();
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;

  char* data() const noexcept { return data_; }
  uint64_t size() const noexcept { return nbytes_; }
  PinMethod method() const noexcept { return method_; }
  // Seconds the constructor took (mapping + pinning): what the method costs on this machine.
  double setup_s() const noexcept { return setup_s_; }
  // Whether the memory was advised for transparent huge pages (register only).
  bool huge_pages() const noexcept { return anon_ != nullptr && anon_->huge_pages(); }
  const CopyBackend& backend() const noexcept { return *backend_; }
  // Marks the memory as lent to a slot source; false when it already was (slots of two sources
  // must never overlap).
  bool claim() noexcept { return !claimed_.exchange(true); }

 private:
  std::shared_ptr<CopyBackend> backend_;
  PinMethod method_;
  uint64_t nbytes_;
  char* data_ = nullptr;
  std::unique_ptr<AlignedBuffer> anon_;  // register
  void* map_ = nullptr;                  // memfd
  size_t map_len_ = 0;
  bool pinned_ = false;                  // register, memfd: pin() succeeded
  std::atomic<bool> claimed_{false};
  double setup_s_ = 0;
};

}  // namespace fastckpt

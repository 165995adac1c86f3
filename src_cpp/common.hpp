// Shared definitions of the engine: error types and alignment helpers. No Python here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastckpt {

// O_DIRECT transfers are issued only for ranges whose file offset, length and memory address are
// multiples of this. 4096 is a multiple of every common logical block size (512, 4096), so it
// satisfies any device's direct-I/O alignment short of exotic 8 KiB-sector hardware; a transfer
// the kernel still refuses (EINVAL) is retried through the buffered descriptor.
constexpr uint64_t kDirectAlign = 4096;

inline bool is_aligned(uint64_t v) noexcept { return (v & (kDirectAlign - 1)) == 0; }
inline uint64_t align_down(uint64_t v) noexcept { return v & ~(kDirectAlign - 1); }
inline uint64_t align_up(uint64_t v) noexcept { return align_down(v + kDirectAlign - 1); }

// An operating-system failure: errno, a message saying what was being done, and the file.
// The bindings turn it into Python's OSError(errno, message, path).
class IoError : public std::runtime_error {
 public:
  IoError(int err, const std::string& message, std::string path)
      : std::runtime_error(message), err_(err), path_(std::move(path)) {}
  int err() const noexcept { return err_; }
  const std::string& path() const noexcept { return path_; }

 private:
  int err_;
  std::string path_;
};

// A batch was cancelled (by the caller or because its engine was closed) before all of its
// reads completed; waiting on it cannot deliver the missing data.
class CancelledError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A wait ran out of time. Nothing was consumed: a later wait returns the same completions.
class WaitTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "Input/output error" for errno values; thread-safe.
std::string errno_text(int err);

}  // namespace fastckpt

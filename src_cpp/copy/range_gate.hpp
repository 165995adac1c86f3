// "Bytes [lo, hi) of this source are ready": the hook for sources whose bytes arrive over time
// (an object-store download written into a local file). A producer marks ranges ready (or fails
// the whole source); a read that carries the gate is not issued before its range is ready.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "notifier.hpp"

namespace fastckpt {

class RangeGate {
 public:
  // `name` (a URL, a path) names the source in errors.
  explicit RangeGate(std::string name = "") : name_(std::move(name)) {}

  // Thread-safe. Throws std::invalid_argument when lo > hi.
  void mark_ready(uint64_t lo, uint64_t hi);
  // Every current and later wait on this gate throws IoError(err, message, name). The first
  // failure wins. err 0 is taken as EIO.
  void fail(int err, const std::string& message);
  // True when [lo, hi) is ready, false when not yet; throws IoError when the gate failed.
  bool ready(uint64_t lo, uint64_t hi) const;
  // Blocks until [lo, hi) is ready (true) or `timeout` passes (false); throws IoError when the
  // gate fails.
  bool wait(uint64_t lo, uint64_t hi, std::chrono::nanoseconds timeout) const;
  // `n` is signalled on every mark_ready and fail (held weakly).
  void subscribe(const std::shared_ptr<Notifier>& n) { subscribers_.add(n); }
  // Bytes marked ready so far (overlaps counted once).
  uint64_t ready_bytes() const;
  const std::string& name() const noexcept { return name_; }

 private:
  bool covered(uint64_t lo, uint64_t hi) const;  // lock held
  [[noreturn]] void throw_failure() const;       // lock held

  const std::string name_;
  mutable std::mutex m_;
  mutable std::condition_variable cv_;
  std::map<uint64_t, uint64_t> ranges_;  // lo -> hi, disjoint and not touching
  bool failed_ = false;
  int err_ = 0;
  std::string message_;
  Subscribers subscribers_;
};

}  // namespace fastckpt

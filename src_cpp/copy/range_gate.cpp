#include "copy/range_gate.hpp"

#include <algorithm>
#include <cerrno>
#include <iterator>
#include <stdexcept>

#include "common.hpp"

namespace fastckpt {

void RangeGate::mark_ready(uint64_t lo, uint64_t hi) {
  if (lo > hi)
    throw std::invalid_argument("mark_ready(" + std::to_string(lo) + ", " + std::to_string(hi) +
                                "): lo must not exceed hi");
  if (lo == hi) return;
  {
    std::lock_guard<std::mutex> lock(m_);
    // Merge with every range that overlaps or touches [lo, hi).
    auto it = ranges_.upper_bound(lo);
    if (it != ranges_.begin() && std::prev(it)->second >= lo) --it;
    while (it != ranges_.end() && it->first <= hi) {
      lo = std::min(lo, it->first);
      hi = std::max(hi, it->second);
      it = ranges_.erase(it);
    }
    ranges_.emplace(lo, hi);
  }
  cv_.notify_all();
  subscribers_.notify_all();
}

void RangeGate::fail(int err, const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(m_);
    if (failed_) return;
    failed_ = true;
    err_ = err != 0 ? err : EIO;
    message_ = message;
  }
  cv_.notify_all();
  subscribers_.notify_all();
}

bool RangeGate::covered(uint64_t lo, uint64_t hi) const {
  if (lo >= hi) return true;
  auto it = ranges_.upper_bound(lo);
  if (it == ranges_.begin()) return false;
  --it;
  return it->first <= lo && it->second >= hi;
}

void RangeGate::throw_failure() const {
  throw IoError(err_, "the source failed while its bytes were awaited: " + message_, name_);
}

bool RangeGate::ready(uint64_t lo, uint64_t hi) const {
  std::lock_guard<std::mutex> lock(m_);
  if (failed_) throw_failure();
  return covered(lo, hi);
}

bool RangeGate::wait(uint64_t lo, uint64_t hi, std::chrono::nanoseconds timeout) const {
  // Longer than a year means "no limit" (and keeps the deadline from overflowing).
  const auto limit = std::min<std::chrono::nanoseconds>(timeout, std::chrono::hours(24 * 365));
  const auto deadline = std::chrono::steady_clock::now() + limit;
  std::unique_lock<std::mutex> lock(m_);
  const bool done = cv_.wait_until(lock, deadline, [&] { return failed_ || covered(lo, hi); });
  if (failed_) throw_failure();
  return done;
}

uint64_t RangeGate::ready_bytes() const {
  std::lock_guard<std::mutex> lock(m_);
  uint64_t n = 0;
  for (const auto& [lo, hi] : ranges_) n += hi - lo;
  return n;
}

}  // namespace fastckpt

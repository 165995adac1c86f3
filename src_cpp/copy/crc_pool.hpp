// Checksums staged bytes off the copy loop's thread: one core computes CRC32C at about 10 GB/s
// (measured on the H200 box), a quarter of what the loop moves, so a few workers do it while the
// device copies the same bytes (both only read them). Results land in a caller-owned vector, one
// slot per op; done(op) says when it is there.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "notifier.hpp"

namespace fastckpt {

class CrcPool {
 public:
  // `crcs` must outlive the pool and hold one entry per op; `notifier` is signalled whenever a
  // checksum is done. Threads start on the first submit.
  // `delay` (a test hook) is slept before each checksum: a slow checksum must still hold its slot.
  CrcPool(size_t threads, std::vector<uint32_t>& crcs, std::shared_ptr<Notifier> notifier,
          std::chrono::nanoseconds delay = std::chrono::nanoseconds(0));
  ~CrcPool();  // cancel_and_wait(), then joins
  CrcPool(const CrcPool&) = delete;
  CrcPool& operator=(const CrcPool&) = delete;

  void submit(size_t op, const void* data, uint64_t n);
  bool done(size_t op) const noexcept { return done_[op].load(std::memory_order_acquire); }
  // True when no job is queued or running.
  bool idle() const;
  // Blocks until every submitted job is done.
  void wait_all();
  // Drops queued jobs and waits for running ones: afterwards no worker reads any submitted
  // memory.
  void cancel_and_wait();

 private:
  struct Job {
    size_t op;
    const void* data;
    uint64_t n;
  };
  void worker();

  const size_t threads_wanted_;
  std::vector<uint32_t>& crcs_;
  std::shared_ptr<Notifier> notifier_;
  const std::chrono::nanoseconds delay_;
  std::unique_ptr<std::atomic<bool>[]> done_;
  mutable std::mutex m_;
  std::condition_variable cv_;       // work arrived / stop
  std::condition_variable idle_cv_;  // a job finished
  std::deque<Job> queue_;
  size_t running_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace fastckpt

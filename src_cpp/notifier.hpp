// A wake-up counter one waiter can block on while several sources (read batches, slot sources,
// gates, cancel flags) signal "something changed". The waiter reads generation(), inspects its
// sources, and when nothing is ready waits for the generation to move. The notifier's lock is a
// leaf: notify() may be called with any other lock held.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace fastckpt {

class Notifier {
 public:
  uint64_t generation() const {
    std::lock_guard<std::mutex> lock(m_);
    return gen_;
  }
  void notify() {
    {
      std::lock_guard<std::mutex> lock(m_);
      ++gen_;
    }
    cv_.notify_all();
  }
  // Blocks until the generation differs from `seen` or `deadline` passes; true when it moved.
  bool wait(uint64_t seen, std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(m_);
    return cv_.wait_until(lock, deadline, [&] { return gen_ != seen; });
  }

 private:
  mutable std::mutex m_;
  std::condition_variable cv_;
  uint64_t gen_ = 0;
};

// The notifiers interested in one source. Held weakly: a waiter that went away is dropped at the
// next notify or subscribe.
class Subscribers {
 public:
  void add(const std::shared_ptr<Notifier>& n) {
    std::lock_guard<std::mutex> lock(m_);
    prune();
    for (const auto& w : list_)
      if (w.lock() == n) return;
    list_.push_back(n);
  }
  void notify_all() {
    std::vector<std::shared_ptr<Notifier>> live;
    {
      std::lock_guard<std::mutex> lock(m_);
      prune();
      for (const auto& w : list_)
        if (auto n = w.lock()) live.push_back(std::move(n));
    }
    for (const auto& n : live) n->notify();
  }

 private:
  void prune() {
    list_.erase(std::remove_if(list_.begin(), list_.end(),
                               [](const std::weak_ptr<Notifier>& w) { return w.expired(); }),
                list_.end());
  }
  std::mutex m_;
  std::vector<std::weak_ptr<Notifier>> list_;
};

}  // namespace fastckpt

#include "copy/crc_pool.hpp"

#include <pthread.h>

#include "checksum.hpp"

namespace fastckpt {

CrcPool::CrcPool(size_t threads, std::vector<uint32_t>& crcs, std::shared_ptr<Notifier> notifier,
                 std::chrono::nanoseconds delay)
    : threads_wanted_(threads == 0 ? 1 : threads),
      crcs_(crcs),
      notifier_(std::move(notifier)),
      delay_(delay),
      done_(new std::atomic<bool>[crcs.size()]) {
  for (size_t i = 0; i < crcs.size(); ++i) done_[i].store(false, std::memory_order_relaxed);
}

CrcPool::~CrcPool() {
  cancel_and_wait();
  {
    std::lock_guard<std::mutex> lock(m_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void CrcPool::submit(size_t op, const void* data, uint64_t n) {
  {
    std::lock_guard<std::mutex> lock(m_);
    queue_.push_back(Job{op, data, n});
    if (threads_.size() < threads_wanted_ && threads_.size() < queue_.size() + running_) {
      threads_.emplace_back([this] { worker(); });
      pthread_setname_np(threads_.back().native_handle(), "fastckpt-crc");
    }
  }
  cv_.notify_one();
}

void CrcPool::worker() {
  std::unique_lock<std::mutex> lock(m_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping
    const Job job = queue_.front();
    queue_.pop_front();
    ++running_;
    lock.unlock();
    if (delay_.count() > 0) std::this_thread::sleep_for(delay_);
    crcs_[job.op] = crc32c(0, job.data, job.n);  // one writer per op; read after done()
    done_[job.op].store(true, std::memory_order_release);
    notifier_->notify();
    lock.lock();
    --running_;
    idle_cv_.notify_all();
  }
}

bool CrcPool::idle() const {
  std::lock_guard<std::mutex> lock(m_);
  return queue_.empty() && running_ == 0;
}

void CrcPool::wait_all() {
  std::unique_lock<std::mutex> lock(m_);
  idle_cv_.wait(lock, [&] { return queue_.empty() && running_ == 0; });
}

void CrcPool::cancel_and_wait() {
  std::unique_lock<std::mutex> lock(m_);
  queue_.clear();
  idle_cv_.wait(lock, [&] { return running_ == 0; });
}

}  // namespace fastckpt

#include "copy/slot_source.hpp"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "common.hpp"

namespace fastckpt {

SlotSource::SlotSource(uint64_t slot_nbytes) : slot_nbytes_(slot_nbytes) {
  if (slot_nbytes == 0) throw std::invalid_argument("slot_nbytes must be > 0");
}

size_t SlotSource::add(std::shared_ptr<PinnedMemory> mem) {
  if (!mem) throw std::invalid_argument("no memory to add");
  const uint64_t n = mem->size() / slot_nbytes_;
  if (n == 0)
    throw std::invalid_argument("a buffer of " + std::to_string(mem->size()) +
                                " bytes holds no slot of " + std::to_string(slot_nbytes_) +
                                " bytes");
  {
    std::lock_guard<std::mutex> lock(m_);
    if (closed_) throw std::invalid_argument("the slot source is closed");
    if (all_.size() + n > std::numeric_limits<uint32_t>::max())
      throw std::invalid_argument("too many slots");
    if (!mem->claim())
      throw std::invalid_argument("this buffer already holds slots of a slot source");
    for (uint64_t i = 0; i < n; ++i) {
      Slot s;
      s.ptr = mem->data() + i * slot_nbytes_;
      s.nbytes = slot_nbytes_;
      s.id = static_cast<uint32_t>(all_.size());
      all_.push_back(s);
      free_.push_back(s);
    }
    memory_.push_back(std::move(mem));
  }
  cv_.notify_all();
  subscribers_.notify_all();
  return static_cast<size_t>(n);
}

void SlotSource::begin_pipeline() {
  std::lock_guard<std::mutex> lock(m_);
  if (closed_) throw CancelledError("the staging slots are closed");
  ++running_;
}

void SlotSource::end_pipeline() {
  {
    std::lock_guard<std::mutex> lock(m_);
    --running_;
  }
  cv_.notify_all();
}

std::optional<Slot> SlotSource::try_take() {
  std::lock_guard<std::mutex> lock(m_);
  if (cancelled_ || free_.empty()) return std::nullopt;
  const Slot s = free_.back();
  free_.pop_back();
  return s;
}

void SlotSource::give(const Slot& slot) {
  {
    std::lock_guard<std::mutex> lock(m_);
    free_.push_back(slot);
  }
  cv_.notify_all();
  subscribers_.notify_all();
}

bool SlotSource::cancelled() const {
  std::lock_guard<std::mutex> lock(m_);
  return cancelled_;
}

bool SlotSource::close(bool cancel_running, std::chrono::nanoseconds timeout) {
  std::vector<std::shared_ptr<PinnedMemory>> drop;
  {
    std::unique_lock<std::mutex> lock(m_);
    closed_ = true;
    if (cancel_running) cancelled_ = true;
    lock.unlock();
    subscribers_.notify_all();
    lock.lock();
    const auto limit = std::min<std::chrono::nanoseconds>(timeout, std::chrono::hours(24 * 365));
    const auto deadline = std::chrono::steady_clock::now() + limit;
    if (!cv_.wait_until(lock, deadline,
                        [&] { return running_ == 0 && free_.size() == all_.size(); }))
      return false;
    drop.swap(memory_);
    all_.clear();
    free_.clear();
  }
  return true;  // `drop` frees (and unpins) the memory here, outside the lock
}

size_t SlotSource::total() const {
  std::lock_guard<std::mutex> lock(m_);
  return all_.size();
}

size_t SlotSource::available() const {
  std::lock_guard<std::mutex> lock(m_);
  return free_.size();
}

size_t SlotSource::running() const {
  std::lock_guard<std::mutex> lock(m_);
  return running_;
}

bool SlotSource::closed() const {
  std::lock_guard<std::mutex> lock(m_);
  return closed_;
}

}  // namespace fastckpt

#include "work_queue.hpp"

#include <algorithm>

namespace fastckpt {

bool WorkQueue::push(std::vector<Piece>& pieces) {
  if (pieces.empty()) return true;
  {
    std::lock_guard<std::mutex> lock(m_);
    if (closed_) return false;
    for (auto& p : pieces) q_.push_back(std::move(p));
  }
  if (pieces.size() == 1)
    cv_.notify_one();
  else
    cv_.notify_all();
  if (on_push_) on_push_();
  return true;
}

bool WorkQueue::pop_wait(Piece& out) {
  std::unique_lock<std::mutex> lock(m_);
  cv_.wait(lock, [&] { return closed_ || (!paused_ && !q_.empty()); });
  if (q_.empty() || paused_) return false;
  out = std::move(q_.front());
  q_.pop_front();
  return true;
}

bool WorkQueue::try_pop(Piece& out) {
  std::lock_guard<std::mutex> lock(m_);
  if (q_.empty() || paused_) return false;
  out = std::move(q_.front());
  q_.pop_front();
  return true;
}

size_t WorkQueue::remove_batch(const BatchState* batch) {
  std::lock_guard<std::mutex> lock(m_);
  const auto it = std::remove_if(q_.begin(), q_.end(),
                                 [&](const Piece& p) { return p.batch.get() == batch; });
  const auto n = static_cast<size_t>(q_.end() - it);
  q_.erase(it, q_.end());
  return n;
}

std::deque<Piece> WorkQueue::close() {
  std::deque<Piece> rest;
  {
    std::lock_guard<std::mutex> lock(m_);
    closed_ = true;
    rest.swap(q_);
  }
  cv_.notify_all();
  if (on_push_) on_push_();
  return rest;
}

void WorkQueue::set_paused(bool paused) {
  {
    std::lock_guard<std::mutex> lock(m_);
    paused_ = paused;
  }
  cv_.notify_all();
  if (on_push_) on_push_();
}

}  // namespace fastckpt

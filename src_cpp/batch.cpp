#include "batch.hpp"

namespace fastckpt {

BatchState::BatchState(std::vector<int64_t> tags, std::vector<std::shared_ptr<FileHandle>> files,
                       std::shared_ptr<Notifier> notifier)
    : tags_(std::move(tags)),
      remaining_(tags_.size(), 0),
      files_(std::move(files)),
      notifier_(std::move(notifier)) {}

void BatchState::add_pieces(uint32_t req, uint32_t n) {
  std::lock_guard<std::mutex> lock(m_);
  remaining_[req] += n;
  outstanding_ += n;
}

void BatchState::complete_empty_requests() {
  std::lock_guard<std::mutex> lock(m_);
  for (size_t i = 0; i < tags_.size(); ++i) {
    if (remaining_[i] == 0) {
      ready_.push_back(tags_[i]);
      ++completed_;
    }
  }
  if (!ready_.empty()) {
    cv_.notify_all();
    if (notifier_) notifier_->notify();
  }
}

void BatchState::piece_finished(uint32_t req) {
  std::lock_guard<std::mutex> lock(m_);
  --outstanding_;
  bool request_done = false;
  if (!cancelled_.load(std::memory_order_relaxed) && --remaining_[req] == 0) {
    ready_.push_back(tags_[req]);
    ++completed_;
    request_done = true;
  }
  cv_.notify_all();
  if (notifier_ && (request_done || outstanding_ == 0)) notifier_->notify();
}

void BatchState::piece_failed(int err, const std::string& message, const std::string& path) {
  std::lock_guard<std::mutex> lock(m_);
  --outstanding_;
  if (!failed_ && completed_ < tags_.size()) {
    failed_ = true;
    err_ = err;
    err_message_ = message;
    err_path_ = path;
    cancelled_.store(true, std::memory_order_relaxed);
  }
  cv_.notify_all();
  if (notifier_) notifier_->notify();
}

void BatchState::pieces_discarded(size_t n) {
  if (n == 0) return;
  std::lock_guard<std::mutex> lock(m_);
  outstanding_ -= n;
  cv_.notify_all();
  if (notifier_) notifier_->notify();
}

bool BatchState::mark_cancelled(const std::string& reason) {
  std::lock_guard<std::mutex> lock(m_);
  if (failed_ || completed_ == tags_.size()) return false;
  if (!cancelled_.load(std::memory_order_relaxed)) {
    cancel_reason_ = reason;
    cancelled_.store(true, std::memory_order_relaxed);
  }
  cv_.notify_all();
  if (notifier_) notifier_->notify();
  return true;
}

void BatchState::throw_stopped() {
  // Destinations must not be written after the caller sees the error: wait for running pieces.
  std::unique_lock<std::mutex> lock(m_);
  cv_.wait(lock, [&] { return outstanding_ == 0; });
  if (failed_) throw IoError(err_, err_message_, err_path_);
  throw CancelledError(cancel_reason_.empty() ? "the batch was cancelled" : cancel_reason_);
}

WaitStatus BatchState::wait(size_t min_completions, std::chrono::nanoseconds slice,
                            std::vector<int64_t>& out) {
  std::unique_lock<std::mutex> lock(m_);
  const auto deadline = std::chrono::steady_clock::now() + slice;
  for (;;) {
    if (cancelled_.load(std::memory_order_relaxed)) return WaitStatus::kStopped;
    const size_t left = tags_.size() - reported_;
    const size_t need = min_completions < left ? min_completions : left;
    if (ready_.size() >= need) {
      out.insert(out.end(), ready_.begin(), ready_.end());
      reported_ += ready_.size();
      ready_.clear();
      return WaitStatus::kReady;
    }
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
      if (cancelled_.load(std::memory_order_relaxed)) return WaitStatus::kStopped;
      const size_t left2 = tags_.size() - reported_;
      const size_t need2 = min_completions < left2 ? min_completions : left2;
      if (ready_.size() >= need2) continue;
      return WaitStatus::kTimeout;
    }
  }
}

void BatchState::wait_quiescent() {
  std::unique_lock<std::mutex> lock(m_);
  cv_.wait(lock, [&] { return outstanding_ == 0; });
}

bool BatchState::finished() const {
  std::lock_guard<std::mutex> lock(m_);
  return outstanding_ == 0 &&
         (completed_ == tags_.size() || cancelled_.load(std::memory_order_relaxed));
}

size_t BatchState::pending() const {
  std::lock_guard<std::mutex> lock(m_);
  if (cancelled_.load(std::memory_order_relaxed)) return 0;
  return tags_.size() - reported_;
}

bool BatchState::done() const {
  std::lock_guard<std::mutex> lock(m_);
  return reported_ == tags_.size() || cancelled_.load(std::memory_order_relaxed);
}

}  // namespace fastckpt

// A batch of read requests: completion bookkeeping shared by the engine's threads and the waiter.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"
#include "file.hpp"
#include "notifier.hpp"

namespace fastckpt {

class BatchState;

// One contiguous transfer (a request, or a chunk of one) handed to a backend.
struct Piece {
  std::shared_ptr<BatchState> batch;
  FileHandle* file = nullptr;  // kept alive by batch->files()
  uint64_t offset = 0;
  uint64_t len = 0;
  char* dest = nullptr;
  uint32_t req = 0;     // index of the request in the batch
  bool direct = false;  // use the O_DIRECT descriptor (offset, len and dest are aligned)
};

// Outcome of one bounded wait.
enum class WaitStatus { kReady, kTimeout, kStopped };

class BatchState {
 public:
  // `notifier` (optional) is signalled when a request completes, a piece fails or is dropped,
  // the last piece ends, or the batch is cancelled: one waiter can watch many batches at once.
  BatchState(std::vector<int64_t> tags, std::vector<std::shared_ptr<FileHandle>> files,
             std::shared_ptr<Notifier> notifier = nullptr);

  // ---- engine side (any thread) ----
  // Registers `n` pieces for request `req` before they are queued.
  void add_pieces(uint32_t req, uint32_t n);
  // Marks requests with no pieces (zero-length) complete.
  void complete_empty_requests();
  void piece_finished(uint32_t req);
  // Records the first failure; the batch becomes cancelled. Later failures are dropped.
  void piece_failed(int err, const std::string& message, const std::string& path);
  // `n` queued pieces were dropped without running (cancellation or engine shutdown).
  void pieces_discarded(size_t n);
  // Sets the cancelled flag (reason for waiters); returns false when the batch had already
  // finished or failed.
  bool mark_cancelled(const std::string& reason);
  bool cancelled() const noexcept { return cancelled_.load(std::memory_order_relaxed); }

  // ---- waiter side ----
  // Blocks at most `slice` until >= min(min_completions, left) completions are unconsumed, then
  // moves them to `out` (kReady). kStopped: a read failed or the batch was cancelled; the caller
  // cancels the rest (EngineCore::cancel) and calls throw_stopped().
  WaitStatus wait(size_t min_completions, std::chrono::nanoseconds slice,
                  std::vector<int64_t>& out);
  // Waits until no piece runs, then throws IoError (a read failed) or CancelledError.
  [[noreturn]] void throw_stopped();
  // Blocks until no piece of this batch is queued or running.
  void wait_quiescent();
  // True when no piece is queued or running and nothing more can complete.
  bool finished() const;
  size_t pending() const;  // requests not yet reported by wait()
  bool done() const;       // every request reported, or the batch failed/was cancelled
  size_t size() const noexcept { return tags_.size(); }
  const std::vector<std::shared_ptr<FileHandle>>& files() const noexcept { return files_; }

 private:
  mutable std::mutex m_;
  std::condition_variable cv_;
  std::vector<int64_t> tags_;
  std::vector<uint32_t> remaining_;  // pieces left per request
  std::vector<std::shared_ptr<FileHandle>> files_;
  std::deque<int64_t> ready_;  // completed, not yet returned by wait()
  size_t completed_ = 0;
  size_t reported_ = 0;
  size_t outstanding_ = 0;  // pieces queued or running
  std::atomic<bool> cancelled_{false};
  bool failed_ = false;
  int err_ = 0;
  std::string err_message_;
  std::string err_path_;
  std::string cancel_reason_;
  std::shared_ptr<Notifier> notifier_;
};

}  // namespace fastckpt

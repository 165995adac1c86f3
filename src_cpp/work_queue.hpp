// A FIFO of pieces shared by a backend's worker thread(s) and submitters.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <vector>

#include "batch.hpp"

namespace fastckpt {

class WorkQueue {
 public:
  // `on_push` (optional) runs after pieces are queued, outside the lock (wakes a ring thread).
  void set_on_push(std::function<void()> on_push) { on_push_ = std::move(on_push); }

  // Queues pieces; returns false (queuing nothing) when the queue is closed.
  bool push(std::vector<Piece>& pieces);
  // Blocks until a piece is available (true) or the queue is closed and empty (false).
  bool pop_wait(Piece& out);
  bool try_pop(Piece& out);
  // Removes every queued piece of `batch`; returns how many.
  size_t remove_batch(const BatchState* batch);
  // Closes the queue and returns the pieces still in it (the caller discards them).
  std::deque<Piece> close();
  // Test hook: while paused, pop_wait blocks and try_pop finds nothing.
  void set_paused(bool paused);

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<Piece> q_;
  bool closed_ = false;
  bool paused_ = false;
  std::function<void()> on_push_;
};

}  // namespace fastckpt

// The interface between the engine and its two backends (io_uring ring, pread thread pool).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "batch.hpp"

namespace fastckpt {

// Shared by the backends of one engine: fault injection (a test hook) and byte accounting.
struct IoContext {
  int64_t fault_after_bytes = -1;  // < 0: off
  int fault_errno = 0;
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<uint64_t> bytes_direct{0};  // of which through O_DIRECT

  // Accounts `n` bytes just read; true when the engine must report them as a failure instead.
  bool fault(uint64_t n, bool direct) noexcept {
    if (direct) bytes_direct.fetch_add(n, std::memory_order_relaxed);
    const uint64_t before = bytes_read.fetch_add(n, std::memory_order_relaxed);
    return fault_after_bytes >= 0 && before + n > static_cast<uint64_t>(fault_after_bytes);
  }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const noexcept = 0;
  // Queues pieces; false when the backend has been shut down.
  virtual bool enqueue(std::vector<Piece>& pieces) = 0;
  // Drops the queued (not yet started) pieces of `batch`; returns how many.
  virtual size_t remove_batch(const BatchState* batch) = 0;
  // Drops queued pieces (their batches are cancelled), waits for running ones, stops threads.
  virtual void shutdown() = 0;
  // Test hook: stop starting queued pieces (running ones finish) until unpaused.
  virtual void set_paused(bool paused) = 0;
};

// Messages shared by both backends, so an error reads the same whichever engine ran the read.
std::string read_error_message(int err, uint64_t offset, uint64_t nbytes);
std::string eof_message(uint64_t offset, uint64_t missing, uint64_t nbytes);
std::string injected_fault_message(int err, uint64_t offset, uint64_t nbytes);
// Discards queued pieces after a shutdown, cancelling their batches.
template <class Seq>
void discard_pieces(Seq& pieces, const std::string& reason) {
  for (auto& p : pieces) {
    p.batch->mark_cancelled(reason);
    p.batch->pieces_discarded(1);
  }
  pieces.clear();
}

}  // namespace fastckpt

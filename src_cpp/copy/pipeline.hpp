// The read -> host-to-device copy pipeline, one call per load: reads go into free staging slots
// (the engine), each completed read is copied to its device address on the next stream
// (round-robin) with an event after it, and slots are recycled by querying those events. The
// caller's thread runs the loop; it blocks only when no progress is possible (then on the
// pipeline's reads, or on the oldest copy). With the reads keeping up, a copy is in flight on
// every stream at once.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "copy/copy_backend.hpp"
#include "copy/range_gate.hpp"
#include "copy/slot_source.hpp"
#include "engine.hpp"
#include "file.hpp"
#include "notifier.hpp"

namespace fastckpt {

struct CopyOp {
  enum class Kind { kRead, kHost };
  Kind kind = Kind::kRead;
  uint64_t nbytes = 0;
  uint64_t dst = 0;  // device address
  // kRead: bytes [offset, offset + nbytes) of `file`, read into a slot once `gate` (optional)
  // says they are ready. At most one slot (SlotSource::slot_nbytes()) long.
  std::shared_ptr<FileHandle> file;
  uint64_t offset = 0;
  std::shared_ptr<RangeGate> gate;
  // kHost: already page-locked host memory, copied directly (no slot).
  const void* src = nullptr;
};

// Set from any thread to stop running pipelines (they clean up and throw CancelledError).
class CancelFlag {
 public:
  void set() {
    flag_.store(true);
    subscribers_.notify_all();
  }
  bool is_set() const noexcept { return flag_.load(); }
  void subscribe(const std::shared_ptr<Notifier>& n) { subscribers_.add(n); }

 private:
  std::atomic<bool> flag_{false};
  Subscribers subscribers_;
};

struct PipelineOptions {
  bool crc = false;         // crc32c of every op's bytes (PipelineResult::crcs)
  size_t crc_threads = 4;   // workers computing them; 0: on the loop's thread
  std::chrono::nanoseconds crc_test_delay{0};  // test hook: each worker checksum sleeps first
  size_t max_slots = 0;     // slots this pipeline may hold at once; 0: no limit
  size_t host_window = 16;  // host-op copies in flight at most (>= 1)
  // How long a read may wait for its gate (from when it is next in line); beyond: WaitTimeout.
  std::chrono::nanoseconds gate_timeout = std::chrono::nanoseconds::max();
  // While reads and copies are both in flight, copies are polled this often.
  std::chrono::nanoseconds copy_poll = std::chrono::microseconds(100);
  // Polled about every 50 ms; returning true stops the run like the cancel flag (the bindings
  // check for Ctrl-C here).
  std::function<bool()> interrupted;
};

struct PipelineResult {
  std::vector<uint32_t> crcs;  // per op (0 for empty ops), when options.crc
  uint64_t copies = 0;
  uint64_t max_copies_in_flight = 0;  // issued and not yet seen complete
  uint64_t max_reads_in_flight = 0;
  uint64_t bytes_staged = 0;  // read ops: bytes read into slots and copied
  uint64_t bytes_host = 0;    // host ops: bytes copied
  double read_wait_s = 0;     // blocked while reads were in flight
  double copy_wait_s = 0;     // blocked on a copy before the end (slots or host window full)
  double gate_wait_s = 0;     // blocked on a gate
  double slot_wait_s = 0;     // blocked holding no slot, waiting for the source to lend one
  double drain_s = 0;         // waiting for the last copies
  double total_s = 0;
  uint64_t slots_used = 0;    // distinct slots borrowed
  bool slot_starved = false;  // a ready read waited because every slot held was copying
};

// Runs `ops` to completion. Throws std::invalid_argument for a bad op (before anything runs),
// IoError for a failed read or gate, DeviceError for a failed copy, WaitTimeout for a gate
// timeout, CancelledError when cancelled (the flag, the slot source closing, `interrupted`, the
// engine closing). On every exit the pipeline has stopped its reads, waited for every copy it
// issued and given back every slot: nothing of it still touches a slot or a destination.
PipelineResult run_pipeline(EngineCore& engine, const std::vector<CopyOp>& ops,
                            SlotSource& slots, CopyBackend& backend,
                            const PipelineOptions& options, CancelFlag* cancel);

}  // namespace fastckpt

#include "copy/pipeline.hpp"

#include <algorithm>
#include <deque>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "checksum.hpp"
#include "common.hpp"
#include "copy/crc_pool.hpp"

namespace fastckpt {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kSlice = std::chrono::milliseconds(50);  // longest blind wait (cancel, Ctrl-C)
constexpr auto kNoLimit = std::chrono::hours(24 * 365);  // a gate timeout this long: none

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string op_name(size_t i) { return "op " + std::to_string(i); }

class Pipeline {
 public:
  Pipeline(EngineCore& engine, const std::vector<CopyOp>& ops, SlotSource& slots,
           CopyBackend& backend, const PipelineOptions& opts, CancelFlag* cancel)
      : engine_(engine),
        ops_(ops),
        source_(slots),
        be_(backend),
        opts_(opts),
        cancel_(cancel),
        notifier_(std::make_shared<Notifier>()) {}

  PipelineResult run();

 private:
  struct Reading {
    size_t op;
    Slot slot;
    std::shared_ptr<BatchState> batch;
  };
  struct Copying {
    size_t op;
    bool has_slot;
    Slot slot;
    bool has_event;
    Event event;
  };
  enum class Blocked { kNone, kGate, kSlot, kHostWindow };

  void validate() const;
  void loop();
  void check_stop();
  bool recycle();
  bool harvest();
  bool issue_host();
  bool submit_reads();
  void issue_copy(size_t op, const void* src, const Slot* slot);
  void block(uint64_t seen);
  void finish_copy(const Copying& c);
  void drain();
  void stop() noexcept;

  EngineCore& engine_;
  const std::vector<CopyOp>& ops_;
  SlotSource& source_;
  CopyBackend& be_;
  const PipelineOptions& opts_;
  CancelFlag* cancel_;
  std::shared_ptr<Notifier> notifier_;

  std::vector<size_t> read_ops_, host_ops_;  // op indices by kind, in op order
  size_t next_read_ = 0, next_host_ = 0;     // cursors into them
  std::vector<Reading> reading_;             // in submission order
  std::deque<Copying> copying_;              // in issue order
  size_t held_slots_ = 0;
  size_t host_in_flight_ = 0;
  int next_stream_ = 0;
  Blocked read_blocked_ = Blocked::kNone;
  bool host_blocked_ = false;
  Clock::time_point gate_since_{};  // when the read next in line started waiting on its gate
  Clock::time_point last_interrupt_check_{};
  std::unique_ptr<CrcPool> crc_pool_;  // checksum workers (options.crc with crc_threads > 0)
  std::vector<bool> stream_busy_;  // recycle(): a stream whose oldest pending event is not done
  std::unordered_set<uint32_t> used_;
  PipelineResult res_;
};

void Pipeline::validate() const {
  std::unordered_map<const FileHandle*, uint64_t> sizes;
  for (size_t i = 0; i < ops_.size(); ++i) {
    const CopyOp& op = ops_[i];
    if (op.nbytes > 0 && op.dst == 0)
      throw std::invalid_argument(op_name(i) + ": the destination address is 0");
    if (op.nbytes > UINT64_MAX - op.dst)
      throw std::invalid_argument(op_name(i) + ": the destination range overflows");
    if (op.kind == CopyOp::Kind::kHost) {
      if (op.nbytes > 0 && op.src == nullptr)
        throw std::invalid_argument(op_name(i) + ": the host source address is 0");
      continue;
    }
    if (!op.file) throw std::invalid_argument(op_name(i) + ": the file is closed");
    if (op.nbytes > source_.slot_nbytes())
      throw std::invalid_argument(op_name(i) + ": a read of " + std::to_string(op.nbytes) +
                                  " bytes is larger than a staging slot (" +
                                  std::to_string(source_.slot_nbytes()) +
                                  " bytes); split it into slot-sized reads");
    if (op.nbytes > UINT64_MAX - op.offset)
      throw std::invalid_argument(op_name(i) + ": the file range overflows");
    if (op.gate) continue;  // a gated file may still be growing: the engine checks at submit
    auto it = sizes.find(op.file.get());
    if (it == sizes.end()) it = sizes.emplace(op.file.get(), op.file->current_size()).first;
    if (op.offset + op.nbytes > it->second)
      throw std::invalid_argument(op_name(i) + " (file '" + op.file->path() + "', offset " +
                                  std::to_string(op.offset) + ", nbytes " +
                                  std::to_string(op.nbytes) + "): the range ends at byte " +
                                  std::to_string(op.offset + op.nbytes) + " but the file is " +
                                  std::to_string(it->second) + " bytes long");
  }
}

PipelineResult Pipeline::run() {
  const auto t0 = Clock::now();
  be_.check_process();
  if (opts_.host_window == 0) throw std::invalid_argument("host_window must be >= 1");
  if (be_.streams() < 1) throw std::invalid_argument("the copy backend has no streams");
  validate();
  for (size_t i = 0; i < ops_.size(); ++i)
    (ops_[i].kind == CopyOp::Kind::kRead ? read_ops_ : host_ops_).push_back(i);
  if (opts_.crc) {
    res_.crcs.assign(ops_.size(), 0);
    if (opts_.crc_threads > 0)
      crc_pool_ = std::make_unique<CrcPool>(opts_.crc_threads, res_.crcs, notifier_,
                                            opts_.crc_test_delay);
  }
  stream_busy_.assign(static_cast<size_t>(be_.streams()), false);
  last_interrupt_check_ = t0;
  source_.begin_pipeline();  // CancelledError when closed
  try {
    source_.subscribe(notifier_);
    if (cancel_ != nullptr) cancel_->subscribe(notifier_);
    loop();
    drain();
  } catch (...) {
    stop();
    source_.end_pipeline();
    throw;
  }
  source_.end_pipeline();
  crc_pool_.reset();  // idle since drain(); it refers to res_.crcs, which is moved out below
  res_.slots_used = used_.size();
  res_.total_s = seconds(Clock::now() - t0);
  return std::move(res_);
}

void Pipeline::loop() {
  for (;;) {
    const uint64_t seen = notifier_->generation();
    check_stop();
    bool progress = recycle();
    progress |= harvest();
    progress |= issue_host();
    progress |= submit_reads();
    if (next_read_ == read_ops_.size() && next_host_ == host_ops_.size() && reading_.empty())
      return;  // every op issued; drain() waits for the copies
    if (!progress) block(seen);
  }
}

void Pipeline::check_stop() {
  if (cancel_ != nullptr && cancel_->is_set())
    throw CancelledError("the copy pipeline was cancelled");
  if (source_.cancelled())
    throw CancelledError("the staging slots were closed while the copy pipeline ran");
  if (opts_.interrupted) {
    const auto now = Clock::now();
    if (now - last_interrupt_check_ >= kSlice) {
      last_interrupt_check_ = now;
      if (opts_.interrupted()) throw CancelledError("the copy pipeline was interrupted");
    }
  }
}

void Pipeline::finish_copy(const Copying& c) {
  if (c.has_event) be_.release(c.event);
  if (c.has_slot) {
    source_.give(c.slot);
    --held_slots_;
  } else {
    --host_in_flight_;
  }
}

bool Pipeline::recycle() {
  // Events of one stream complete in order: after the first pending one, skip that stream.
  bool progress = false;
  std::fill(stream_busy_.begin(), stream_busy_.end(), false);
  for (auto it = copying_.begin(); it != copying_.end();) {
    const auto s = static_cast<size_t>(it->event.stream);
    if (crc_pool_ && !crc_pool_->done(it->op)) {  // still being checksummed: keep the slot
      ++it;
      continue;
    }
    if (stream_busy_[s] || !be_.query(it->event)) {
      stream_busy_[s] = true;
      ++it;
      continue;
    }
    finish_copy(*it);
    it = copying_.erase(it);
    progress = true;
  }
  return progress;
}

void Pipeline::issue_copy(size_t op, const void* src, const Slot* slot) {
  const CopyOp& o = ops_[op];
  const int stream = next_stream_;
  next_stream_ = (next_stream_ + 1) % be_.streams();
  // Not yet enqueued when copy_async throws: the caller still owns the slot.
  be_.copy_async(stream, o.dst, src, o.nbytes);
  Copying c{op, slot != nullptr, slot != nullptr ? *slot : Slot{}, false, Event{}};
  c.event.stream = stream;
  try {
    c.event = be_.record(stream);
    c.has_event = true;
  } catch (...) {
    copying_.push_back(c);  // enqueued without an event: stop() waits for its stream
    throw;
  }
  copying_.push_back(c);
  ++res_.copies;
  res_.max_copies_in_flight = std::max<uint64_t>(res_.max_copies_in_flight, copying_.size());
  // The checksum reads the source while the device copies it: both only read.
  if (crc_pool_)
    crc_pool_->submit(op, src, o.nbytes);
  else if (opts_.crc)
    res_.crcs[op] = crc32c(0, src, o.nbytes);
}

bool Pipeline::harvest() {
  bool progress = false;
  for (size_t i = 0; i < reading_.size();) {
    BatchState& b = *reading_[i].batch;
    const bool finished = b.finished();
    if (b.cancelled()) {
      // A failed read (or a closed engine): wait for its other pieces, then raise its error.
      engine_.cancel(b, "the copy pipeline stopped");
      b.throw_stopped();
    }
    if (!finished) {
      ++i;
      continue;
    }
    const Reading r = reading_[i];
    reading_.erase(reading_.begin() + static_cast<std::ptrdiff_t>(i));
    try {
      issue_copy(r.op, r.slot.ptr, &r.slot);
    } catch (...) {
      const bool enqueued = !copying_.empty() && copying_.back().op == r.op;
      if (!enqueued) {
        source_.give(r.slot);
        --held_slots_;
      }
      throw;
    }
    res_.bytes_staged += ops_[r.op].nbytes;
    progress = true;
  }
  return progress;
}

bool Pipeline::issue_host() {
  bool progress = false;
  host_blocked_ = false;
  while (next_host_ < host_ops_.size()) {
    const size_t op = host_ops_[next_host_];
    const CopyOp& o = ops_[op];
    if (o.nbytes > 0) {
      if (host_in_flight_ >= opts_.host_window) {
        host_blocked_ = true;
        break;
      }
      ++host_in_flight_;
      try {
        issue_copy(op, o.src, nullptr);
      } catch (...) {
        const bool enqueued = !copying_.empty() && copying_.back().op == op;
        if (!enqueued) --host_in_flight_;
        throw;
      }
      res_.bytes_host += o.nbytes;
    }
    ++next_host_;
    progress = true;
  }
  return progress;
}

bool Pipeline::submit_reads() {
  bool progress = false;
  read_blocked_ = Blocked::kNone;
  while (next_read_ < read_ops_.size()) {
    const size_t op = read_ops_[next_read_];
    const CopyOp& o = ops_[op];
    if (o.nbytes == 0) {
      ++next_read_;
      progress = true;
      continue;
    }
    if (o.gate) {
      bool ready = o.gate->ready(o.offset, o.offset + o.nbytes);  // IoError when failed
      if (!ready) {
        o.gate->subscribe(notifier_);  // then look again: a mark_ready in between is not lost
        ready = o.gate->ready(o.offset, o.offset + o.nbytes);
      }
      if (!ready) {
        const auto now = Clock::now();
        if (gate_since_ == Clock::time_point{}) gate_since_ = now;
        if (now - gate_since_ >= opts_.gate_timeout)
          throw WaitTimeout(op_name(op) + ": timed out after " +
                            std::to_string(seconds(now - gate_since_)) +
                            " s waiting for bytes [" + std::to_string(o.offset) + ", " +
                            std::to_string(o.offset + o.nbytes) + ") of '" + o.gate->name() +
                            "'");
        read_blocked_ = Blocked::kGate;
        break;
      }
    }
    if (opts_.max_slots != 0 && held_slots_ >= opts_.max_slots) {
      read_blocked_ = Blocked::kSlot;
      break;
    }
    const std::optional<Slot> slot = source_.try_take();
    if (!slot) {
      read_blocked_ = Blocked::kSlot;
      break;
    }
    ++held_slots_;
    used_.insert(slot->id);
    ReadSpec r;
    r.file = o.file;
    r.offset = o.offset;
    r.nbytes = o.nbytes;
    r.dest = slot->ptr;
    r.dest_len = slot->nbytes;
    r.tag = static_cast<int64_t>(op);
    std::shared_ptr<BatchState> batch;
    try {
      batch = engine_.submit({r}, true, notifier_);
    } catch (const std::invalid_argument& e) {
      source_.give(*slot);
      --held_slots_;
      throw std::invalid_argument(op_name(op) + ": " + e.what());
    } catch (...) {
      source_.give(*slot);
      --held_slots_;
      throw;
    }
    reading_.push_back(Reading{op, *slot, std::move(batch)});
    res_.max_reads_in_flight = std::max<uint64_t>(res_.max_reads_in_flight, reading_.size());
    gate_since_ = Clock::time_point{};
    ++next_read_;
    progress = true;
  }
  return progress;
}

void Pipeline::block(uint64_t seen) {
  const auto t0 = Clock::now();
  const bool reads = !reading_.empty();
  const bool copies = !copying_.empty();
  // A completed copy would let something proceed: a slot this pipeline holds, or the window.
  const bool want_copy = (read_blocked_ == Blocked::kSlot && held_slots_ > 0) || host_blocked_;
  // With checksums pending, the oldest copy may be done while its slot is not: wait on the
  // notifier (the checksum workers signal it) and poll the copies.
  const bool checksums = crc_pool_ && !crc_pool_->idle();
  if (!reads && copies && want_copy && !checksums) {
    // Every slot this pipeline holds (or the host window) waits on a copy: wait for the oldest.
    be_.synchronize(copying_.front().event);
    res_.copy_wait_s += seconds(Clock::now() - t0);
    if (read_blocked_ == Blocked::kSlot) res_.slot_starved = true;
    return;
  }
  // Reads, a gate or the slot source signal the notifier. Copies are polled meanwhile when a
  // completed one would let something proceed (a slot or the host window is full).
  auto slice = std::chrono::duration_cast<Clock::duration>(kSlice);
  if (copies && want_copy)
    slice = std::min(slice, std::chrono::duration_cast<Clock::duration>(opts_.copy_poll));
  if (read_blocked_ == Blocked::kGate && opts_.gate_timeout < kNoLimit) {
    const auto deadline =
        gate_since_ + std::chrono::duration_cast<Clock::duration>(opts_.gate_timeout);
    slice = std::max(Clock::duration::zero(), std::min(slice, deadline - t0));
  }
  notifier_->wait(seen, t0 + slice);
  const double waited = seconds(Clock::now() - t0);
  if (reads)
    res_.read_wait_s += waited;
  else if (read_blocked_ == Blocked::kGate)
    res_.gate_wait_s += waited;
  else if (read_blocked_ == Blocked::kSlot && held_slots_ == 0)
    res_.slot_wait_s += waited;
  else
    res_.copy_wait_s += waited;
}

void Pipeline::drain() {
  const auto t0 = Clock::now();
  if (crc_pool_) crc_pool_->wait_all();
  while (!copying_.empty()) {
    Copying& c = copying_.front();
    be_.synchronize(c.event);
    finish_copy(c);
    copying_.pop_front();
  }
  res_.drain_s = seconds(Clock::now() - t0);
}

void Pipeline::stop() noexcept {
  // 1. No read of this pipeline may still write into a slot.
  for (Reading& r : reading_) {
    try {
      engine_.cancel(*r.batch, "the copy pipeline stopped");
    } catch (...) {
    }
    r.batch->wait_quiescent();
    source_.give(r.slot);
  }
  reading_.clear();
  // 2. No copy it issued may still read a slot or write a destination: an event recorded now on
  //    each stream follows every copy enqueued there (also one whose own event failed).
  bool all_synced = true;
  for (int s = 0; s < be_.streams(); ++s) {
    try {
      const Event e = be_.record(s);
      be_.synchronize(e);
      be_.release(e);
    } catch (...) {
      all_synced = false;
    }
  }
  if (!all_synced) {
    for (const Copying& c : copying_) {
      if (!c.has_event) continue;
      try {
        be_.synchronize(c.event);
      } catch (...) {  // the device failed for good: its copies no longer run
      }
    }
  }
  // 3. No checksum worker may still read a slot or a host source.
  if (crc_pool_) crc_pool_->cancel_and_wait();
  // 4. Every slot goes back.
  for (const Copying& c : copying_) {
    if (c.has_event) be_.release(c.event);
    if (c.has_slot) source_.give(c.slot);
  }
  copying_.clear();
}

}  // namespace

PipelineResult run_pipeline(EngineCore& engine, const std::vector<CopyOp>& ops,
                            SlotSource& slots, CopyBackend& backend,
                            const PipelineOptions& options, CancelFlag* cancel) {
  return Pipeline(engine, ops, slots, backend, options, cancel).run();
}

}  // namespace fastckpt

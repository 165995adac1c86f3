// The staging slots of a ring: pinned host buffers of one size that copy pipelines borrow and
// give back. Thread-safe; slots may be added while pipelines run (background pinning grows the
// ring) and running pipelines pick them up. A pipeline gives a slot back only once the last copy
// out of it has completed, so a free slot is always safe to overwrite.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "copy/pinned.hpp"
#include "notifier.hpp"

namespace fastckpt {

struct Slot {
  char* ptr = nullptr;
  uint64_t nbytes = 0;
  uint32_t id = 0;  // index in the source (stable)
};

class SlotSource {
 public:
  // Throws std::invalid_argument when slot_nbytes is 0.
  explicit SlotSource(uint64_t slot_nbytes);
  ~SlotSource() = default;
  SlotSource(const SlotSource&) = delete;
  SlotSource& operator=(const SlotSource&) = delete;

  // Carves `mem` into floor(size / slot_nbytes) slots (the source keeps the memory alive) and
  // wakes waiting pipelines; returns how many slots were added. Throws std::invalid_argument
  // when `mem` is smaller than one slot, already lent to a source, or the source is closed.
  size_t add(std::shared_ptr<PinnedMemory> mem);

  // ---- pipeline side ----
  // Registers a running pipeline; throws CancelledError when the source is closed.
  void begin_pipeline();
  void end_pipeline();
  std::optional<Slot> try_take();
  void give(const Slot& slot);
  // True once close(cancel_running=true) was called: running pipelines must stop.
  bool cancelled() const;
  void subscribe(const std::shared_ptr<Notifier>& n) { subscribers_.add(n); }

  // Refuses new pipelines (and, with `cancel_running`, stops the running ones at their next
  // step), waits up to `timeout` for every slot to come back, then drops the source's
  // references to its memory (freed and unpinned when no one else holds it). Returns false on
  // timeout (slots still borrowed; the source stays closed and close can be called again).
  bool close(bool cancel_running, std::chrono::nanoseconds timeout);

  uint64_t slot_nbytes() const noexcept { return slot_nbytes_; }
  size_t total() const;      // slots
  size_t available() const;  // slots not borrowed
  size_t running() const;    // pipelines
  bool closed() const;

 private:
  const uint64_t slot_nbytes_;
  mutable std::mutex m_;
  std::condition_variable cv_;  // a slot came back, a pipeline ended
  std::vector<std::shared_ptr<PinnedMemory>> memory_;
  std::vector<Slot> all_;
  std::vector<Slot> free_;  // LIFO: the most recently used slot is the warmest
  size_t running_ = 0;
  bool closed_ = false;
  bool cancelled_ = false;
  Subscribers subscribers_;
};

}  // namespace fastckpt

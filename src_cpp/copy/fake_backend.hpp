// The test device: "device memory" is host memory, each stream is a worker thread running its
// commands in order. It checks what a real device cannot: every copy hashes its source when it is
// enqueued and the bytes that landed when it ran; a difference means the source was overwritten
// (a staging slot reused) before its copy completed, and is counted as a violation.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "buffer.hpp"
#include "copy/copy_backend.hpp"

namespace fastckpt {

struct FakeCopyStats {
  uint64_t copies = 0;          // copies executed
  uint64_t bytes = 0;           // bytes they copied
  uint64_t enqueued = 0;        // copies enqueued
  uint64_t pending = 0;         // enqueued, not yet executed
  uint64_t max_in_flight = 0;   // most copies enqueued and not yet executed at once
  uint64_t violations = 0;      // copies whose source changed before they ran
  std::vector<std::string> violation_notes;  // the first few, described
  uint64_t pins = 0;
  uint64_t unpins = 0;
  uint64_t host_allocs = 0;
  uint64_t host_frees = 0;
  uint64_t events_recorded = 0;
};

class FakeCopyBackend final : public CopyBackend {
 public:
  // `delay` is slept before each copy (a slow link); `fail_after_copies` >= 0 makes copy_async
  // throw DeviceError once that many copies were enqueued (a test hook for failed copies).
  // Without `check` no copy is hashed; without `copy` nothing is copied either (a device that
  // costs nothing: what remains is the pipeline's own overhead, for benchmarks).
  FakeCopyBackend(int streams, std::chrono::nanoseconds delay, int64_t fail_after_copies = -1,
                  bool check = true, bool copy = true);
  ~FakeCopyBackend() override;
  FakeCopyBackend(const FakeCopyBackend&) = delete;
  FakeCopyBackend& operator=(const FakeCopyBackend&) = delete;

  const char* name() const noexcept override { return "fake"; }
  int streams() const noexcept override { return static_cast<int>(streams_.size()); }
  void copy_async(int stream, uint64_t dst, const void* src, uint64_t n) override;
  Event record(int stream) override;
  bool query(const Event& e) override;
  void synchronize(const Event& e) override;
  void release(const Event&) noexcept override {}
  void pin(void* p, uint64_t n) override;
  void unpin(void* p) noexcept override;
  void* host_alloc(uint64_t n) override;
  void host_free(void* p, uint64_t n) noexcept override;

  FakeCopyStats stats() const;
  // Blocks until every enqueued command has run (tests).
  void drain();
  // Test hook: while paused no stream starts a command (copies and events stay pending).
  void set_paused(bool paused);

 private:
  struct Command {
    bool is_copy = false;
    uint64_t dst = 0;
    const void* src = nullptr;
    uint64_t n = 0;
    uint32_t crc = 0;    // of the source at copy_async
    uint64_t seq = 0;    // copy number, or the event's ticket on its stream
  };
  struct Stream {
    std::mutex m;
    std::condition_variable cv;       // new work, or progress (for synchronize)
    std::deque<Command> queue;
    uint64_t tickets = 0;             // events recorded on this stream
    uint64_t passed = 0;              // events the worker has passed
    bool stop = false;
    std::thread worker;
  };
  Stream& stream_at(int stream);
  void run(Stream& s, int index);
  void execute(const Command& c, int stream);

  std::vector<std::unique_ptr<Stream>> streams_;
  std::chrono::nanoseconds delay_;
  int64_t fail_after_copies_;
  bool check_;
  bool copy_;
  std::atomic<bool> paused_{false};
  mutable std::mutex stats_m_;  // guards stats_ and allocs_
  FakeCopyStats stats_;
  std::unordered_map<void*, std::unique_ptr<AlignedBuffer>> allocs_;
};

}  // namespace fastckpt

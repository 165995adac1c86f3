// The device side of the read -> host-to-device copy pipeline: a small submit/wait interface.
// CudaCopyBackend drives a GPU through the CUDA driver API loaded at run time; FakeCopyBackend is
// a host "device" (memcpy on worker threads) that lets CI test slot reuse and shutdown on CPU.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastckpt {

// A point on one stream after the copies enqueued before it. Handed back with release() once
// the caller is done with it (backends pool them).
struct Event {
  uint64_t handle = 0;  // backend-specific
  uint64_t seq = 0;     // backend-specific
  int stream = -1;
};

// A device call failed (a CUDA error, a copy the fake device refused). Python: RuntimeError.
class DeviceError : public std::runtime_error {
 public:
  explicit DeviceError(const std::string& message) : std::runtime_error(message) {}
};

class CopyBackend {
 public:
  virtual ~CopyBackend() = default;
  virtual const char* name() const noexcept = 0;
  virtual int streams() const noexcept = 0;
  // Enqueues a host -> device copy of `n` bytes on `stream`; returns at once. `src` must stay
  // unchanged until an event recorded after it has completed.
  virtual void copy_async(int stream, uint64_t dst, const void* src, uint64_t n) = 0;
  // An event after every copy enqueued so far on `stream`.
  virtual Event record(int stream) = 0;
  // True when the event has completed (never blocks).
  virtual bool query(const Event& e) = 0;
  // Blocks until the event has completed.
  virtual void synchronize(const Event& e) = 0;
  // Returns the event to the backend's pool. Only for completed events (or after synchronize).
  virtual void release(const Event& e) noexcept = 0;

  // Page-locks existing host memory for fast (DMA) copies / undoes it.
  virtual void pin(void* p, uint64_t n) = 0;
  virtual void unpin(void* p) noexcept = 0;
  // Allocates / frees page-locked host memory.
  virtual void* host_alloc(uint64_t n) = 0;
  virtual void host_free(void* p, uint64_t n) noexcept = 0;

  // The process that created the backend: its threads and device state exist only there.
  int owner_pid() const noexcept { return pid_; }
  // Throws std::invalid_argument in a child process of the one that created the backend.
  void check_process() const;

 protected:
  CopyBackend();

 private:
  int pid_;
};

}  // namespace fastckpt

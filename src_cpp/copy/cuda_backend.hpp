// The GPU copy backend: the CUDA driver API, loaded at run time (dlopen("libcuda.so.1")), so the
// engine library never links CUDA and the CPU build is unchanged.
//
// Streams are the caller's (torch's) streams, passed as their integer handles
// (torch.cuda.Stream().cuda_stream). torch works in each device's primary context; the backend
// retains that context and makes it current around each of its calls, on whatever thread makes
// them, restoring the thread's previous context afterwards (torch's notion of the current device
// is untouched).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "copy/copy_backend.hpp"

namespace fastckpt {

struct CudaDriver;  // the loaded entry points (cuda_backend.cpp)

class CudaCopyBackend final : public CopyBackend {
 public:
  // Throws DeviceError when the driver cannot be loaded ("CUDA driver libcuda.so.1 not found:
  // ...") or a call fails, std::invalid_argument for no streams or too many.
  CudaCopyBackend(int device, std::vector<uint64_t> stream_handles);
  ~CudaCopyBackend() override;
  CudaCopyBackend(const CudaCopyBackend&) = delete;
  CudaCopyBackend& operator=(const CudaCopyBackend&) = delete;

  const char* name() const noexcept override { return "cuda"; }
  int streams() const noexcept override { return static_cast<int>(streams_.size()); }
  void copy_async(int stream, uint64_t dst, const void* src, uint64_t n) override;
  Event record(int stream) override;
  bool query(const Event& e) override;
  void synchronize(const Event& e) override;
  void release(const Event& e) noexcept override;
  void pin(void* p, uint64_t n) override;
  void unpin(void* p) noexcept override;
  void* host_alloc(uint64_t n) override;
  void host_free(void* p, uint64_t n) noexcept override;

  int device() const noexcept { return device_; }

 private:
  class Current;  // makes the primary context current for one call, then restores
  void* stream_at(int stream) const;

  const CudaDriver& drv_;
  int device_;
  int cu_device_ = 0;
  void* ctx_ = nullptr;  // CUcontext (retained primary context)
  std::vector<void*> streams_;  // CUstream
  std::mutex events_m_;
  std::vector<void*> free_events_;  // CUevent, pooled
  std::vector<void*> all_events_;
};

// Whether libcuda.so.1 can be loaded here ("" when it can, else why not). Never throws.
std::string cuda_driver_problem();

}  // namespace fastckpt

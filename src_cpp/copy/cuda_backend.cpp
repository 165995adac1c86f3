#include "copy/cuda_backend.hpp"

#include <dlfcn.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>

namespace fastckpt {

// The few driver types and constants used here, as cuda.h declares them (no CUDA headers on the
// build machine; the driver's ABI for these has been stable since CUDA 4).
using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUstream = void*;
using CUevent = void*;
using CUdeviceptr = unsigned long long;  // NOLINT(runtime/int): the ABI type

namespace {
constexpr CUresult kSuccess = 0;
constexpr CUresult kNotReady = 600;               // CUDA_ERROR_NOT_READY
constexpr unsigned kEventDisableTiming = 0x2;     // CU_EVENT_DISABLE_TIMING
constexpr unsigned kHostRegisterPortable = 0x1;   // CU_MEMHOSTREGISTER_PORTABLE
constexpr unsigned kHostAllocPortable = 0x1;      // CU_MEMHOSTALLOC_PORTABLE
constexpr const char* kLibrary = "libcuda.so.1";
}  // namespace

struct CudaDriver {
  std::string problem;  // why the driver cannot be used ("" when it can)
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice) = nullptr;
  CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*cuCtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream) = nullptr;
  CUresult (*cuEventCreate)(CUevent*, unsigned) = nullptr;
  CUresult (*cuEventRecord)(CUevent, CUstream) = nullptr;
  CUresult (*cuEventQuery)(CUevent) = nullptr;
  CUresult (*cuEventSynchronize)(CUevent) = nullptr;
  CUresult (*cuEventDestroy)(CUevent) = nullptr;
  CUresult (*cuMemHostRegister)(void*, size_t, unsigned) = nullptr;
  CUresult (*cuMemHostUnregister)(void*) = nullptr;
  CUresult (*cuMemHostAlloc)(void**, size_t, unsigned) = nullptr;
  CUresult (*cuMemFreeHost)(void*) = nullptr;
  CUresult (*cuGetErrorName)(CUresult, const char**) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
};

namespace {

template <class F>
bool bind(void* lib, const char* symbol, F& fn, std::string& problem) {
  void* p = ::dlsym(lib, symbol);
  if (p == nullptr) {
    if (problem.empty())
      problem = std::string("CUDA driver ") + kLibrary + " has no " + symbol +
                " (driver too old?)";
    return false;
  }
  static_assert(sizeof(fn) == sizeof(p), "function and object pointers differ in size");
  std::memcpy(&fn, &p, sizeof fn);  // dlsym's documented use; a cast would be non-portable
  return true;
}

CudaDriver load_driver() {
  CudaDriver d;
  // Loaded once and never closed: the driver keeps threads and state for the process's life.
  void* lib = ::dlopen(kLibrary, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = ::dlerror();
    d.problem = std::string("CUDA driver ") + kLibrary +
                " not found: " + (why != nullptr ? why : "dlopen failed");
    return d;
  }
  std::string& p = d.problem;
  bind(lib, "cuInit", d.cuInit, p);
  bind(lib, "cuDeviceGet", d.cuDeviceGet, p);
  bind(lib, "cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain, p);
  bind(lib, "cuDevicePrimaryCtxRelease_v2", d.cuDevicePrimaryCtxRelease, p);
  bind(lib, "cuCtxGetCurrent", d.cuCtxGetCurrent, p);
  bind(lib, "cuCtxSetCurrent", d.cuCtxSetCurrent, p);
  bind(lib, "cuMemcpyHtoDAsync_v2", d.cuMemcpyHtoDAsync, p);
  bind(lib, "cuEventCreate", d.cuEventCreate, p);
  bind(lib, "cuEventRecord", d.cuEventRecord, p);
  bind(lib, "cuEventQuery", d.cuEventQuery, p);
  bind(lib, "cuEventSynchronize", d.cuEventSynchronize, p);
  bind(lib, "cuEventDestroy_v2", d.cuEventDestroy, p);
  bind(lib, "cuMemHostRegister_v2", d.cuMemHostRegister, p);
  bind(lib, "cuMemHostUnregister", d.cuMemHostUnregister, p);
  bind(lib, "cuMemHostAlloc", d.cuMemHostAlloc, p);
  bind(lib, "cuMemFreeHost", d.cuMemFreeHost, p);
  bind(lib, "cuGetErrorName", d.cuGetErrorName, p);
  bind(lib, "cuGetErrorString", d.cuGetErrorString, p);
  return d;
}

const CudaDriver& driver() {
  static const CudaDriver d = load_driver();  // thread-safe initialisation
  return d;
}

std::string describe(const CudaDriver& d, CUresult r) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (d.cuGetErrorName == nullptr || d.cuGetErrorName(r, &name) != kSuccess) name = nullptr;
  if (d.cuGetErrorString == nullptr || d.cuGetErrorString(r, &text) != kSuccess) text = nullptr;
  std::string out = name != nullptr ? name : "CUresult " + std::to_string(r);
  if (text != nullptr) out += std::string(" (") + text + ")";
  return out;
}

void check(const CudaDriver& d, CUresult r, const char* call) {
  if (r != kSuccess) throw DeviceError(std::string(call) + " failed: " + describe(d, r));
}

const CudaDriver& usable_driver() {
  const CudaDriver& d = driver();
  if (!d.problem.empty()) throw DeviceError(d.problem);
  return d;
}

}  // namespace

std::string cuda_driver_problem() { return driver().problem; }

class CudaCopyBackend::Current {
 public:
  explicit Current(const CudaCopyBackend& b) : drv_(b.drv_) {
    check(drv_, drv_.cuCtxGetCurrent(&prev_), "cuCtxGetCurrent");
    if (prev_ != b.ctx_) {
      check(drv_, drv_.cuCtxSetCurrent(b.ctx_), "cuCtxSetCurrent");
      switched_ = true;
    }
  }
  ~Current() {
    if (switched_) (void)drv_.cuCtxSetCurrent(prev_);
  }
  Current(const Current&) = delete;
  Current& operator=(const Current&) = delete;

 private:
  const CudaDriver& drv_;
  CUcontext prev_ = nullptr;
  bool switched_ = false;
};

CudaCopyBackend::CudaCopyBackend(int device, std::vector<uint64_t> stream_handles)
    : drv_(usable_driver()), device_(device) {
  if (device < 0)
    throw std::invalid_argument("device index must be >= 0, got " + std::to_string(device));
  if (stream_handles.empty() || stream_handles.size() > 64)
    throw std::invalid_argument("a CUDA copy backend needs 1 to 64 streams, got " +
                                std::to_string(stream_handles.size()));
  check(drv_, drv_.cuInit(0), "cuInit");
  check(drv_, drv_.cuDeviceGet(&cu_device_, device), "cuDeviceGet");
  check(drv_, drv_.cuDevicePrimaryCtxRetain(&ctx_, cu_device_), "cuDevicePrimaryCtxRetain");
  for (uint64_t h : stream_handles) streams_.push_back(reinterpret_cast<CUstream>(h));
}

CudaCopyBackend::~CudaCopyBackend() {
  if (static_cast<int>(::getpid()) != owner_pid()) return;  // a fork child: no CUDA here
  try {
    Current cur(*this);
    for (void* e : all_events_) (void)drv_.cuEventDestroy(e);
  } catch (...) {  // the context is gone (driver shutting down): nothing left to destroy
  }
  (void)drv_.cuDevicePrimaryCtxRelease(cu_device_);
}

void* CudaCopyBackend::stream_at(int stream) const {
  if (stream < 0 || stream >= streams())
    throw std::invalid_argument("stream " + std::to_string(stream) + ": the backend has " +
                                std::to_string(streams()) + " streams");
  return streams_[static_cast<size_t>(stream)];
}

void CudaCopyBackend::copy_async(int stream, uint64_t dst, const void* src, uint64_t n) {
  CUstream s = stream_at(stream);
  Current cur(*this);
  check(drv_, drv_.cuMemcpyHtoDAsync(dst, src, n, s), "cuMemcpyHtoDAsync_v2");
}

Event CudaCopyBackend::record(int stream) {
  CUstream s = stream_at(stream);
  Current cur(*this);
  CUevent ev = nullptr;
  {
    std::lock_guard<std::mutex> lock(events_m_);
    if (!free_events_.empty()) {
      ev = free_events_.back();
      free_events_.pop_back();
    }
  }
  if (ev == nullptr) {
    check(drv_, drv_.cuEventCreate(&ev, kEventDisableTiming), "cuEventCreate");
    std::lock_guard<std::mutex> lock(events_m_);
    all_events_.push_back(ev);
  }
  const CUresult r = drv_.cuEventRecord(ev, s);
  if (r != kSuccess) {
    std::lock_guard<std::mutex> lock(events_m_);
    free_events_.push_back(ev);
  }
  check(drv_, r, "cuEventRecord");
  Event e;
  e.handle = reinterpret_cast<uint64_t>(ev);
  e.stream = stream;
  return e;
}

bool CudaCopyBackend::query(const Event& e) {
  Current cur(*this);
  const CUresult r = drv_.cuEventQuery(reinterpret_cast<CUevent>(e.handle));
  if (r == kNotReady) return false;
  check(drv_, r, "cuEventQuery");
  return true;
}

void CudaCopyBackend::synchronize(const Event& e) {
  Current cur(*this);
  check(drv_, drv_.cuEventSynchronize(reinterpret_cast<CUevent>(e.handle)),
        "cuEventSynchronize");
}

void CudaCopyBackend::release(const Event& e) noexcept {
  if (e.handle == 0) return;
  try {
    std::lock_guard<std::mutex> lock(events_m_);
    free_events_.push_back(reinterpret_cast<CUevent>(e.handle));
  } catch (...) {  // out of memory growing the pool: the event stays owned by all_events_
  }
}

void CudaCopyBackend::pin(void* p, uint64_t n) {
  Current cur(*this);
  check(drv_, drv_.cuMemHostRegister(p, n, kHostRegisterPortable), "cuMemHostRegister_v2");
}

void CudaCopyBackend::unpin(void* p) noexcept {
  if (static_cast<int>(::getpid()) != owner_pid()) return;
  try {
    Current cur(*this);
    (void)drv_.cuMemHostUnregister(p);
  } catch (...) {  // no context (driver shutting down): nothing to undo
  }
}

void* CudaCopyBackend::host_alloc(uint64_t n) {
  Current cur(*this);
  void* p = nullptr;
  check(drv_, drv_.cuMemHostAlloc(&p, n, kHostAllocPortable), "cuMemHostAlloc");
  return p;
}

void CudaCopyBackend::host_free(void* p, uint64_t) noexcept {
  if (static_cast<int>(::getpid()) != owner_pid()) return;
  try {
    Current cur(*this);
    (void)drv_.cuMemFreeHost(p);
  } catch (...) {
  }
}

}  // namespace fastckpt

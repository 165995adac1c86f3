#include "pagecache.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <vector>

#include "common.hpp"

namespace fastckpt {
namespace {

#ifdef __NR_cachestat
constexpr long kCachestat = __NR_cachestat;
#else
constexpr long kCachestat = 451;  // same number on every architecture
#endif

struct CachestatRange {
  uint64_t off;
  uint64_t len;
};
struct Cachestat {
  uint64_t nr_cache;
  uint64_t nr_dirty;
  uint64_t nr_writeback;
  uint64_t nr_evicted;
  uint64_t nr_recently_evicted;
};

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

[[noreturn]] void fail(int err, const std::string& what, const std::string& path) {
  throw IoError(err, what + ": " + errno_text(err), path);
}

// Pages of [off, off + len) in the cache (len 0: to the end of the file), or -1 with errno
// when cachestat is unavailable.
int64_t cachestat_pages(int fd, uint64_t off = 0, uint64_t len = 0) {
  CachestatRange range{off, len};
  Cachestat cs{};
  if (::syscall(kCachestat, fd, &range, &cs, 0) != 0) return -1;
  return static_cast<int64_t>(cs.nr_cache);
}

uint64_t mincore_pages(int fd, uint64_t size, const std::string& path) {
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  constexpr uint64_t kWindow = uint64_t{1} << 30;  // map at most 1 GiB at a time
  std::vector<unsigned char> vec;
  uint64_t resident = 0;
  for (uint64_t off = 0; off < size; off += kWindow) {
    const uint64_t len = std::min(kWindow, size - off);
    void* m = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(off));
    if (m == MAP_FAILED) fail(errno, "cannot map to query the page cache", path);
    const uint64_t pages = (len + page - 1) / page;
    vec.resize(pages);
    const int rc = ::mincore(m, len, vec.data());
    const int err = errno;
    ::munmap(m, len);
    if (rc != 0) fail(err, "mincore failed", path);
    for (unsigned char v : vec) resident += v & 1u;
  }
  return resident;
}

// Resident pages among `windows` evenly spaced windows of `window` bytes; sets *queried to the
// number of pages asked about. Uses cachestat, else one mapping of the file and mincore.
uint64_t sampled_pages(int fd, uint64_t size, uint32_t windows, uint64_t window, uint64_t page,
                       bool use_cachestat, uint64_t* queried, const std::string& path) {
  const uint64_t stride = size / windows;
  uint64_t resident = 0;
  *queried = 0;
  void* m = nullptr;
  std::vector<unsigned char> vec(window / page);
  if (!use_cachestat) {
    m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) fail(errno, "cannot map to query the page cache", path);
  }
  for (uint32_t i = 0; i < windows; ++i) {
    const uint64_t off = (i * stride) / page * page;
    const uint64_t len = std::min(window, size - off);
    const uint64_t pages = (len + page - 1) / page;
    *queried += pages;
    if (use_cachestat) {
      const int64_t r = cachestat_pages(fd, off, len);
      if (r < 0) fail(errno, "cachestat(2) failed", path);
      resident += static_cast<uint64_t>(r);
    } else {
      const int rc = ::mincore(static_cast<char*>(m) + off, len, vec.data());
      if (rc != 0) {
        const int err = errno;
        ::munmap(m, size);
        fail(err, "mincore failed", path);
      }
      for (uint64_t k = 0; k < pages; ++k) resident += vec[k] & 1u;
    }
  }
  if (m != nullptr) ::munmap(m, size);
  return resident;
}

}  // namespace

bool cachestat_available() {
  static const bool ok = [] {
    const int fd = ::open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    const bool r = cachestat_pages(fd) >= 0;
    ::close(fd);
    return r;
  }();
  return ok;
}

double residency(const std::string& path, ResidencyMethod method, uint32_t sample_windows) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (fd.get() < 0) fail(errno, "cannot open", path);
  return residency_fd(fd.get(), path, method, sample_windows);
}

double residency_fd(int raw_fd, const std::string& path, ResidencyMethod method,
                    uint32_t sample_windows) {
  struct FdView {
    int fd;
    int get() const { return fd; }
  } fd{raw_fd};
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail(errno, "cannot stat", path);
  if (!S_ISREG(st.st_mode)) throw IoError(S_ISDIR(st.st_mode) ? EISDIR : EINVAL,
                                          "not a regular file", path);
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size == 0) return 1.0;
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t total = (size + page - 1) / page;
  constexpr uint64_t kWindow = 64 * 1024;
  if (sample_windows > 0 && size > uint64_t{sample_windows} * kWindow * 4) {
    const bool use_cachestat =
        method == ResidencyMethod::kCachestat ||
        (method == ResidencyMethod::kAuto && cachestat_available());
    uint64_t queried = 0;
    const uint64_t hit =
        sampled_pages(fd.get(), size, sample_windows, kWindow, page, use_cachestat, &queried, path);
    return queried ? std::min(1.0, static_cast<double>(hit) / static_cast<double>(queried)) : 1.0;
  }
  int64_t resident = -1;
  if (method != ResidencyMethod::kMincore) {
    resident = cachestat_pages(fd.get());
    if (resident < 0 && method == ResidencyMethod::kCachestat)
      fail(errno, "cachestat(2) failed", path);
  }
  if (resident < 0) resident = static_cast<int64_t>(mincore_pages(fd.get(), size, path));
  return std::min(1.0, static_cast<double>(resident) / static_cast<double>(total));
}

void drop_page_cache(const std::string& path) {
  int raw = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  const bool writable = raw >= 0;
  if (!writable) raw = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  Fd fd(raw);
  if (fd.get() < 0) fail(errno, "cannot open", path);
  if (writable && ::fsync(fd.get()) != 0) fail(errno, "fsync failed", path);
  const int rc = ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
  if (rc != 0) fail(rc, "posix_fadvise(DONTNEED) failed", path);
}

}  // namespace fastckpt

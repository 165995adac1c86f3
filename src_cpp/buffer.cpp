#include "buffer.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <string>

#include "common.hpp"

namespace fastckpt {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
alignas(4096) char g_empty[1];  // a valid, aligned address for zero-byte buffers

}  // namespace

AlignedBuffer::AlignedBuffer(size_t nbytes, bool huge_pages) : nbytes_(nbytes) {
  if (nbytes == 0) {
    data_ = g_empty;
    return;
  }
  const size_t page = 4096;
  if (nbytes > SIZE_MAX - 2 * kHugePage)
    throw IoError(ENOMEM, "cannot allocate " + std::to_string(nbytes) + " bytes", "");
  const bool want_huge = huge_pages && nbytes >= kHugePage;
  const size_t len = (nbytes + page - 1) / page * page;
  const size_t extra = want_huge ? kHugePage : 0;
  void* m = ::mmap(nullptr, len + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    const int err = errno;
    throw IoError(err, "cannot map " + std::to_string(nbytes) + " bytes: " + errno_text(err), "");
  }
  auto start = reinterpret_cast<uintptr_t>(m);
  if (want_huge) {
    // Trim the over-allocation so the buffer starts on a 2 MiB boundary.
    const uintptr_t aligned = (start + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
    const size_t head = aligned - start;
    const size_t tail = extra - head;
    if (head) ::munmap(m, head);
    if (tail) ::munmap(reinterpret_cast<void*>(aligned + len), tail);
    start = aligned;
    huge_ = ::madvise(reinterpret_cast<void*>(start), len, MADV_HUGEPAGE) == 0;
  }
  map_ = reinterpret_cast<void*>(start);
  map_len_ = len;
  data_ = static_cast<char*>(map_);
}

AlignedBuffer::~AlignedBuffer() {
  if (map_ != nullptr) ::munmap(map_, map_len_);
}

}  // namespace fastckpt

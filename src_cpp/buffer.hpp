// Page-aligned anonymous memory for read destinations and staging rings.
#pragma once

#include <cstddef>

namespace fastckpt {

class AlignedBuffer {
 public:
  // Maps `nbytes` (0 allowed) of zeroed anonymous memory. With `huge_pages`, buffers of 2 MiB or
  // more are 2 MiB-aligned and advised for transparent huge pages (fewer TLB misses, cheaper
  // pinning). Throws IoError (ENOMEM...) when the mapping fails.
  explicit AlignedBuffer(size_t nbytes, bool huge_pages = true);
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  char* data() const noexcept { return data_; }
  size_t size() const noexcept { return nbytes_; }
  bool huge_pages() const noexcept { return huge_; }

 private:
  void* map_ = nullptr;
  size_t map_len_ = 0;
  char* data_ = nullptr;
  size_t nbytes_ = 0;
  bool huge_ = false;
};

}  // namespace fastckpt

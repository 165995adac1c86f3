// Page-cache queries and control for whole files.
#pragma once

#include <cstdint>
#include <string>

namespace fastckpt {

enum class ResidencyMethod { kAuto, kCachestat, kMincore };

// Fraction (0..1) of the file's pages that are in the page cache; 1.0 for an empty file.
// kAuto uses cachestat(2) (Linux 6.5+) and falls back to mmap + mincore(2). Throws IoError.
//
// sample_windows > 0 estimates instead of counting: only that many evenly spaced 64 KiB windows
// are queried (the cost of an exact count grows with the file: ~4 ms per GiB measured). Files
// too small to sample are counted exactly.
double residency(const std::string& path, ResidencyMethod method = ResidencyMethod::kAuto,
                 uint32_t sample_windows = 0);

// The same for an open descriptor (kept open); `path` is only for messages.
double residency_fd(int fd, const std::string& path, ResidencyMethod method = ResidencyMethod::kAuto,
                    uint32_t sample_windows = 0);

// True when the running kernel answers cachestat(2).
bool cachestat_available();

// Writes back dirty pages (when the file can be opened for writing) and asks the kernel to drop
// the file's cached pages (posix_fadvise DONTNEED). Throws IoError.
void drop_page_cache(const std::string& path);

}  // namespace fastckpt

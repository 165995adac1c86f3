// Page-cache queries and control for whole files.
#pragma once

#include <string>

namespace fastckpt {

enum class ResidencyMethod { kAuto, kCachestat, kMincore };

// Fraction (0..1) of the file's pages that are in the page cache; 1.0 for an empty file.
// kAuto uses cachestat(2) (Linux 6.5+) and falls back to mmap + mincore(2). Throws IoError.
double residency(const std::string& path, ResidencyMethod method = ResidencyMethod::kAuto);

// True when the running kernel answers cachestat(2).
bool cachestat_available();

// Writes back dirty pages (when the file can be opened for writing) and asks the kernel to drop
// the file's cached pages (posix_fadvise DONTNEED). Throws IoError.
void drop_page_cache(const std::string& path);

}  // namespace fastckpt

// CRC32C (Castagnoli). Hardware SSE4.2 path when the CPU has it, table-driven otherwise.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastckpt {

// Extends `crc` (0 for a fresh checksum) over `len` bytes at `data`.
uint32_t crc32c(uint32_t crc, const void* data, size_t len) noexcept;

// The portable table-driven path (what CPUs without SSE4.2 use); for tests.
uint32_t crc32c_software(uint32_t crc, const void* data, size_t len) noexcept;

// CRC32C of A || B from crc(A), crc(B) and |B| (the same stitching the 3-way path uses).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) noexcept;

// True when the hardware instruction path is in use.
bool crc32c_hardware() noexcept;

}  // namespace fastckpt

#include "checksum.hpp"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define FASTCKPT_X86 1
#endif

namespace fastckpt {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
  }
};

const Tables& tables() {
  static const Tables tb;
  return tb;
}

uint32_t crc_soft(uint32_t crc, const unsigned char* p, size_t n) noexcept {
  const auto& t = tables().t;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7u)) {
    crc = t[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= crc;
    crc = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^
          t[4][(w >> 24) & 0xFF] ^ t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^
          t[1][(w >> 48) & 0xFF] ^ t[0][(w >> 56) & 0xFF];
    p += 8;
    n -= 8;
  }
  while (n--) crc = t[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
  return crc;
}

#ifdef FASTCKPT_X86
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t crc, const unsigned char* p,
                                                   size_t n) noexcept {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7u)) {
    crc = _mm_crc32_u8(crc, *p++);
    --n;
  }
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c);
  while (n--) crc = _mm_crc32_u8(crc, *p++);
  return crc;
}

bool detect_hw() noexcept { return __builtin_cpu_supports("sse4.2"); }
#else
bool detect_hw() noexcept { return false; }
#endif

}  // namespace

bool crc32c_hardware() noexcept {
  static const bool hw = detect_hw();
  return hw;
}

uint32_t crc32c(uint32_t crc, const void* data, size_t len) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
#ifdef FASTCKPT_X86
  if (crc32c_hardware()) return ~crc_hw(crc, p, len);
#endif
  return ~crc_soft(crc, p, len);
}

}  // namespace fastckpt

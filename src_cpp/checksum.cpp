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

// GF(2) arithmetic on reflected CRC registers, used to stitch independently computed stripes.
// mul_mod_p(a, b) = a * b mod P; bit 31 is the coefficient of x^0.
uint32_t mul_mod_p(uint32_t a, uint32_t b) noexcept {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;  // b *= x
  }
  return product;
}

// x^(8 * nbytes) mod P: multiplying a register by it appends `nbytes` zero bytes.
uint32_t zeros_operator(size_t nbytes) noexcept {
  uint32_t result = 1u << 31;  // x^0
  uint32_t square = 1u << 23;  // x^8, then x^16, x^32, ...
  for (; nbytes != 0; nbytes >>= 1) {
    if (nbytes & 1u) result = mul_mod_p(square, result);
    square = mul_mod_p(square, square);
  }
  return result;
}

#ifdef FASTCKPT_X86
// Three independent crc32 chains hide the instruction's 3-cycle latency. Each round covers three
// adjacent stripes; the second and third start from a zero register and are merged with
// crc(A || B) = crc(A) * x^(8|B|) + crc_from_zero(B).
constexpr size_t kStripe = 16384;

__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t crc, const unsigned char* p,
                                                   size_t n) noexcept {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7u)) {
    crc = _mm_crc32_u8(crc, *p++);
    --n;
  }
  if (n >= 3 * kStripe) {
    static const uint32_t shift = zeros_operator(kStripe);
    do {
      uint64_t c0 = crc;
      uint64_t c1 = 0;
      uint64_t c2 = 0;
      for (size_t i = 0; i < kStripe; i += 8) {
        uint64_t w0;
        uint64_t w1;
        uint64_t w2;
        std::memcpy(&w0, p + i, 8);
        std::memcpy(&w1, p + kStripe + i, 8);
        std::memcpy(&w2, p + 2 * kStripe + i, 8);
        c0 = _mm_crc32_u64(c0, w0);
        c1 = _mm_crc32_u64(c1, w1);
        c2 = _mm_crc32_u64(c2, w2);
      }
      crc = mul_mod_p(shift, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
      crc = mul_mod_p(shift, crc) ^ static_cast<uint32_t>(c2);
      p += 3 * kStripe;
      n -= 3 * kStripe;
    } while (n >= 3 * kStripe);
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

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) noexcept {
  if (len_b == 0) return crc_a;
  return mul_mod_p(zeros_operator(static_cast<size_t>(len_b)), crc_a) ^ crc_b;
}

uint32_t crc32c_software(uint32_t crc, const void* data, size_t len) noexcept {
  return ~crc_soft(~crc, static_cast<const unsigned char*>(data), len);
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

// Uniform asymmetric integer codes: the per-group affine parameters, the codes, and their tight
// bit packing. Shared by the quantized cache stores and any side code that stores small integers.
//
// Affine parameters are held as fp16. The zero point is the group minimum rounded *down* to fp16
// and the scale is (max - zero) / (2^b - 1) rounded *up* to fp16, so the grid
// zero + scale * {0 .. 2^b - 1} covers the group's range and every element is reconstructed
// within scale / 2 (up to float32 rounding). A constant group whose value is an fp16 number gets
// scale 0 and is reproduced exactly, and so is any value lying on the grid.
//
// Packing: codes of b bits (b in {2, 3, 4, 8}) are packed 8 at a time into b bytes; code i of a
// run of 8 occupies bits [b·i, b·(i+1)) of that little-endian b-byte word (3-bit: 8 codes in
// 3 bytes). A run of n codes (n % 8 == 0) takes n·b/8 bytes.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <span>

#include "visikv/core/half.h"

namespace visikv::int_codes {

// The fp16 number nearest to x that is <= x (>= x for round_up); x finite.
inline uint16_t fp16_round_down(float x) {
  uint16_t h = float_to_fp16(x);
  if (fp16_to_float(h) > x)
    h = (h & 0x8000u) ? static_cast<uint16_t>(h + 1)   // more negative
                      : static_cast<uint16_t>(h - 1);  // smaller positive
  if (h == 0x8000u) h = 0;                             // -0 -> +0, the same number
  return h;
}
inline uint16_t fp16_round_up(float x) {
  const uint16_t negated = fp16_round_down(-x);
  return negated == 0 ? uint16_t{0} : static_cast<uint16_t>(negated ^ 0x8000u);
}

struct Affine {
  uint16_t scale, zero;  // fp16
};

// Parameters for a group whose elements lie in [lo, hi], at `bits` bits.
inline Affine affine_for_range(float lo, float hi, int bits) {
  const uint16_t zero = fp16_round_down(lo);
  const double levels = static_cast<double>((1 << bits) - 1);
  const double step = (static_cast<double>(hi) - fp16_to_float(zero)) / levels;
  // Round the exact step up to float, then up to fp16: the grid then reaches hi.
  float step_f = static_cast<float>(step);
  if (static_cast<double>(step_f) < step) step_f = std::nextafter(step_f, INFINITY);
  return {fp16_round_up(step_f), zero};
}

// The code of x on the grid zero + scale * k, k in [0, levels]; ties round up.
inline uint8_t affine_code(float x, float scale, float zero, int levels) {
  if (!(scale > 0.0f)) return 0;
  const float k = std::floor((x - zero) / scale + 0.5f);
  return static_cast<uint8_t>(k <= 0.0f ? 0.0f : k >= static_cast<float>(levels) ? levels : k);
}

// Quantizes one group (the numbers sharing one scale and zero) at `bits` bits: codes[i] is the
// code of values[i]. Returns the group's fp16 parameters.
inline Affine quantize_group(std::span<const float> values, int bits, std::span<uint8_t> codes) {
  float lo = INFINITY, hi = -INFINITY;
  for (float x : values) {
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  const Affine affine = affine_for_range(lo, hi, bits);
  const float scale = fp16_to_float(affine.scale), zero = fp16_to_float(affine.zero);
  const int levels = (1 << bits) - 1;
  for (size_t i = 0; i < values.size(); ++i) codes[i] = affine_code(values[i], scale, zero, levels);
  return affine;
}

// Bytes of n packed b-bit codes (n % 8 == 0).
constexpr int64_t packed_bytes(int64_t n, int bits) { return n / 8 * bits; }

// Packs codes (each < 2^bits, codes.size() % 8 == 0) into out (packed_bytes(...) bytes).
inline void pack(std::span<const uint8_t> codes, int bits, std::span<uint8_t> out) {
  for (size_t run = 0; run * 8 < codes.size(); ++run) {
    uint64_t word = 0;
    for (int i = 0; i < 8; ++i) word |= uint64_t{codes[run * 8 + i]} << (bits * i);
    for (int byte = 0; byte < bits; ++byte)
      out[run * bits + byte] = static_cast<uint8_t>(word >> (8 * byte));
  }
}

// Eight codes of the run starting at `packed`, widened to float32 lanes.
template <int kBits>
inline __m256 unpack8(const uint8_t* packed) {
  static_assert(kBits == 2 || kBits == 3 || kBits == 4 || kBits == 8);
  if constexpr (kBits == 8) {
    return _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed))));
  } else {
    // Exactly the run's bytes, never past them, assembled in a register (a partial store to
    // memory followed by a 4-byte load would stall store forwarding).
    uint32_t word = packed[0] | uint32_t{packed[1]} << 8;
    if constexpr (kBits >= 3) word |= uint32_t{packed[2]} << 16;
    if constexpr (kBits == 4) word |= uint32_t{packed[3]} << 24;
    const __m256i shifts = _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits,
                                             6 * kBits, 7 * kBits);
    const __m256i codes =
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                         _mm256_set1_epi32((1 << kBits) - 1));
    return _mm256_cvtepi32_ps(codes);
  }
}

}  // namespace visikv::int_codes

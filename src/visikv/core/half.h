// IEEE half and bfloat16 conversions (bit-exact, round-to-nearest-even on the way down). x86
// builds convert halfs with the F16C instructions (part of the AVX2 baseline); other builds use
// the portable forms below, which give the same bits (tests compare them over every half and
// every rounding case).
#pragma once

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <bit>
#include <cmath>
#include <cstdint>

namespace visikv {

inline float portable_fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0)  // zero or subnormal: mantissa · 2^-24, exact in float
    return std::bit_cast<float>(sign |
                                std::bit_cast<uint32_t>(static_cast<float>(mantissa) * 0x1p-24f));
  if (exponent == 31)  // infinity, or a NaN quieted with its payload kept (as F16C does)
    return std::bit_cast<float>(sign | (mantissa == 0 ? 0x7f800000u : 0x7fc00000u) |
                                mantissa << 13);
  return std::bit_cast<float>(sign | (exponent + 112) << 23 | mantissa << 13);
}

inline uint16_t portable_float_to_fp16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u)  // NaN: quieted, the payload's top bits kept
    return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (magnitude < 0x38800000u)  // below 2^-14: a subnormal half (or 0 or 2^-14), |f| · 2^24
    return static_cast<uint16_t>(
        sign | static_cast<uint16_t>(std::nearbyint(std::bit_cast<float>(magnitude) * 0x1p24f)));
  // Rebias the exponent (127 -> 15) and drop 13 mantissa bits, rounding to nearest even.
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

#if defined(__F16C__)
inline float fp16_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t float_to_fp16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
inline float fp16_to_float(uint16_t h) { return portable_fp16_to_float(h); }
inline uint16_t float_to_fp16(float f) { return portable_float_to_fp16(f); }
#endif

inline float bf16_to_float(uint16_t b) { return std::bit_cast<float>(uint32_t{b} << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace visikv

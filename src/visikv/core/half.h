// IEEE half and bfloat16 conversions (bit-exact, round-to-nearest-even on the way down).
#pragma once

#include <immintrin.h>

#include <bit>
#include <cstdint>

namespace visikv {

inline float fp16_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t float_to_fp16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

inline float bf16_to_float(uint16_t b) { return std::bit_cast<float>(uint32_t{b} << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace visikv

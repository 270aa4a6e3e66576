// Half-precision conversions (core/half.h): the portable forms, which non-x86 builds use, against
// a reference written from the IEEE definition (every half, and floats at every rounding boundary
// of the half grid), and against the F16C instructions x86 builds use.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "visikv/core/half.h"

namespace visikv {
namespace {

// The value of half bits h from the definition: (-1)^s · 2^(e-15) · (1 + m/1024), subnormals
// 2^-14 · m/1024.
double half_value(uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  if (exponent == 31)
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity()
                         : std::numeric_limits<double>::quiet_NaN();
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

// The half nearest to x (finite or infinite, not NaN), ties to the even mantissa, overflow to
// infinity at 65520 (the midpoint between the largest half and 2^16).
uint16_t nearest_half(float x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::abs(static_cast<double>(x));
  if (a >= 65520.0) return sign | 0x7c00;
  // Positive finite halfs 0x0000 .. 0x7bff are increasing in their bits.
  uint16_t lo = 0, hi = 0x7bff;
  while (lo < hi) {  // the largest half <= a
    const uint16_t mid = static_cast<uint16_t>((lo + hi + 1) / 2);
    if (half_value(mid) <= a)
      lo = mid;
    else
      hi = static_cast<uint16_t>(mid - 1);
  }
  if (lo == 0x7bff || half_value(lo) == a) return sign | lo;
  const double below = a - half_value(lo), above = half_value(lo + 1) - a;
  if (below < above || (below == above && (lo & 1) == 0)) return sign | lo;
  return static_cast<uint16_t>(sign | (lo + 1));
}

TEST(Half, EveryHalfWidensExactly) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float got = portable_fp16_to_float(static_cast<uint16_t>(h));
    const double want = half_value(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << h;
      // A NaN keeps its sign and payload and comes out quiet.
      ASSERT_EQ(std::bit_cast<uint32_t>(got),
                (h & 0x8000u) << 16 | 0x7fc00000u | (h & 0x3ffu) << 13)
          << h;
      ASSERT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(fp16_to_float(h))) << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(got), want) << h;
    ASSERT_EQ(std::signbit(got), (h & 0x8000) != 0) << h;
    ASSERT_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(fp16_to_float(h))) << h;
  }
}

// Floats whose low 12 bits take boundary patterns (0: exactly on the half grid or on a midpoint;
// 1 and 0xfff: just beside it) under every pattern of the upper 20 bits, so every tie and
// near-tie of the half grid (normal and subnormal) is met, plus random floats.
TEST(Half, EveryRoundingBoundaryNarrowsToTheNearestHalf) {
  std::vector<uint32_t> patterns;
  for (uint32_t upper = 0; upper < (1u << 20); ++upper)
    for (uint32_t low : {0x000u, 0x001u, 0xfffu, 0x800u}) patterns.push_back(upper << 12 | low);
  std::mt19937 rng(11);
  for (int i = 0; i < 200000; ++i) patterns.push_back(static_cast<uint32_t>(rng()));
  for (uint32_t bits : patterns) {
    const float x = std::bit_cast<float>(bits);
    const uint16_t got = portable_float_to_fp16(x);
    ASSERT_EQ(got, float_to_fp16(x)) << std::hex << bits;
    if (std::isnan(x)) {
      ASSERT_EQ(got & 0x7e00, 0x7e00) << std::hex << bits;  // a quiet NaN
      ASSERT_EQ(got & 0x8000, (bits >> 16) & 0x8000) << std::hex << bits;
      continue;
    }
    ASSERT_EQ(got, nearest_half(x)) << std::hex << bits << " = " << x;
  }
}

}  // namespace
}  // namespace visikv

// The weight kernels of weight_kernels.h: this file is compiled once per instruction set by
// Highway's foreach_target (AVX-512, AVX2 and the portable EMU128 on x86; NEON on Arm) and
// HWY_DYNAMIC_DISPATCH picks the best one the CPU supports.
//
// One kernel body (DotTokens) and one small entry per weight type (the *Format structs below,
// in the manner of ggml's per-type trait table): a format says how many values a block holds, how
// many bytes it takes, and how to widen 32 of its values ("a unit") into float vectors.

// The portable fallback is compiled even though the rest of the program needs AVX2, so that the
// tests can run it; SSSE3/SSE4 would add nothing between it and AVX2, and the SVE targets have
// no fixed vector length (the kernels assume one).
#ifndef HWY_COMPILE_ALL_ATTAINABLE
#define HWY_COMPILE_ALL_ATTAINABLE
#endif
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS \
  (HWY_SSSE3 | HWY_SSE4 | HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128)
#endif

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "visikv/model/weight_kernels.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// Highway's own headers must follow foreach_target.h.
#include <hwy/highway.h>

#include <cstdint>
#include <cstring>

#include "visikv/core/half.h"
#include "visikv/formats/tensor.h"

HWY_BEFORE_NAMESPACE();
namespace visikv {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// At most 16 float lanes, so that a unit of 32 values is a whole number of vectors (2 on AVX-512,
// 4 on AVX2, 8 on 128-bit targets) and no vector straddles two scale groups of 16 (Q6_K).
using DF = hn::CappedTag<float, 16>;
using DI = hn::RebindToSigned<DF>;
using DU = hn::RebindToUnsigned<DF>;
using DU8 = hn::Rebind<uint8_t, DF>;
using DI8 = hn::Rebind<int8_t, DF>;
using DU16 = hn::Rebind<uint16_t, DF>;
using VF = hn::Vec<DF>;
using VU = hn::Vec<DU>;

constexpr int kLanes = static_cast<int>(hn::MaxLanes(DF()));
constexpr int kUnit = 32;                 // values widened per unpack
constexpr int kVectors = kUnit / kLanes;  // vectors per unit
static_assert(kVectors * kLanes == kUnit, "a unit must be a whole number of vectors");

float LoadHalf(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return fp16_to_float(bits);
}

// kLanes bytes as unsigned 32-bit lanes.
HWY_INLINE VU Bytes(const uint8_t* p) { return hn::PromoteTo(DU(), hn::LoadU(DU8(), p)); }
// The low or high nibbles of kLanes bytes as unsigned 32-bit lanes.
template <bool kHigh>
HWY_INLINE VU Nibbles(const uint8_t* p) {
  const auto bytes = hn::LoadU(DU8(), p);
  const auto nibbles = kHigh ? hn::ShiftRight<4>(bytes) : hn::And(bytes, hn::Set(DU8(), 0x0F));
  return hn::PromoteTo(DU(), nibbles);
}
HWY_INLINE VF ToFloat(VU v) { return hn::ConvertTo(DF(), hn::BitCast(DI(), v)); }
HWY_INLINE VF ToFloat(VU v, int offset) {
  return hn::ConvertTo(DF(), hn::Sub(hn::BitCast(DI(), v), hn::Set(DI(), offset)));
}

// Legacy blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1): byte j holds value j in its low nibble and value
// 16 + j in its high nibble. Vector k covers values [k * kLanes, (k + 1) * kLanes).
template <int k>
HWY_INLINE VU LegacyNibbles(const uint8_t* qs) {
  constexpr int first = k * kLanes;
  if constexpr (first < 16)
    return Nibbles<false>(qs + first);
  else
    return Nibbles<true>(qs + first - 16);
}
// Q5_0 / Q5_1: value e's fifth bit is bit e of a 32-bit word.
template <int k>
HWY_INLINE VU FifthBits(uint32_t qh) {
  const VU shifted = hn::Shr(hn::Set(DU(), qh), hn::Iota(DU(), k * kLanes));
  return hn::ShiftLeft<4>(hn::And(shifted, hn::Set(DU(), 1)));
}

template <int... k, typename F>
HWY_INLINE void ForEachVector(std::integer_sequence<int, k...>, F f) {
  (f(std::integral_constant<int, k>()), ...);
}
template <typename F>
HWY_INLINE void ForEachVector(F f) {
  ForEachVector(std::make_integer_sequence<int, kVectors>(), f);
}

// --- one entry per weight type: kValues and kBytes per block, Unpack(block, unit, w) ---------

struct F32Format {
  static constexpr int kValues = kUnit, kBytes = 4 * kUnit;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const auto* p = reinterpret_cast<const float*>(block);
    ForEachVector([&](auto k) { w[k] = hn::LoadU(DF(), p + k * kLanes); });
  }
};

struct F16Format {
  static constexpr int kValues = kUnit, kBytes = 2 * kUnit;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    const auto* p = reinterpret_cast<const hwy::float16_t*>(block);
    ForEachVector([&](auto k) { w[k] = hn::PromoteTo(DF(), hn::LoadU(dh, p + k * kLanes)); });
  }
};

struct BF16Format {
  static constexpr int kValues = kUnit, kBytes = 2 * kUnit;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const auto* p = reinterpret_cast<const uint16_t*>(block);
    ForEachVector([&](auto k) {
      const VU bits = hn::PromoteTo(DU(), hn::LoadU(DU16(), p + k * kLanes));
      w[k] = hn::BitCast(DF(), hn::ShiftLeft<16>(bits));
    });
  }
};

// fp16 d, 32 int8 values: d * q.
struct Q8_0Format {
  static constexpr int kValues = 32, kBytes = 34;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block));
    const auto* qs = reinterpret_cast<const int8_t*>(block + 2);
    ForEachVector([&](auto k) {
      w[k] =
          hn::Mul(d, hn::ConvertTo(DF(), hn::PromoteTo(DI(), hn::LoadU(DI8(), qs + k * kLanes))));
    });
  }
};

// fp16 d, 16 bytes of nibbles: d * (q - 8).
struct Q4_0Format {
  static constexpr int kValues = 32, kBytes = 18;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block));
    ForEachVector([&](auto k) { w[k] = hn::Mul(d, ToFloat(LegacyNibbles<k>(block + 2), 8)); });
  }
};

// fp16 d, fp16 m, 16 bytes of nibbles: d * q + m.
struct Q4_1Format {
  static constexpr int kValues = 32, kBytes = 20;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block)), m = hn::Set(DF(), LoadHalf(block + 2));
    ForEachVector([&](auto k) { w[k] = hn::MulAdd(d, ToFloat(LegacyNibbles<k>(block + 4)), m); });
  }
};

// fp16 d, 32 fifth bits, 16 bytes of nibbles: d * (q - 16).
struct Q5_0Format {
  static constexpr int kValues = 32, kBytes = 22;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block));
    uint32_t qh;
    std::memcpy(&qh, block + 2, sizeof(qh));
    ForEachVector([&](auto k) {
      w[k] = hn::Mul(d, ToFloat(hn::Or(LegacyNibbles<k>(block + 6), FifthBits<k>(qh)), 16));
    });
  }
};

// fp16 d, fp16 m, 32 fifth bits, 16 bytes of nibbles: d * q + m.
struct Q5_1Format {
  static constexpr int kValues = 32, kBytes = 24;
  static void Unpack(const uint8_t* block, int, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block)), m = hn::Set(DF(), LoadHalf(block + 2));
    uint32_t qh;
    std::memcpy(&qh, block + 4, sizeof(qh));
    ForEachVector([&](auto k) {
      w[k] = hn::MulAdd(d, ToFloat(hn::Or(LegacyNibbles<k>(block + 8), FifthBits<k>(qh))), m);
    });
  }
};

// The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4).
void ScaleMinK4(int j, const uint8_t* q, int& scale, int& min) {
  if (j < 4) {
    scale = q[j] & 63;
    min = q[j + 4] & 63;
  } else {
    scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Super-blocks of 256 = 8 units of 32, each with its own scale and min: d * sc * q - dmin * m.
// Unit u's values are the low (u even) or high (u odd) nibbles of the 32 bytes at 32 * (u / 2).
// d * sc * q is a product of an fp16 value and integers below 2^12, exact in float32, so the fused
// multiply-add rounds once, as dequantize()'s multiply-then-subtract does.
struct Q4_KFormat {
  static constexpr int kValues = 256, kBytes = 144;
  static void Unpack(const uint8_t* block, int unit, VF* w) {
    int sc, m;
    ScaleMinK4(unit, block + 4, sc, m);
    const VF scale = hn::Set(DF(), LoadHalf(block) * static_cast<float>(sc));
    const VF neg_min = hn::Set(DF(), -(LoadHalf(block + 2) * static_cast<float>(m)));
    const uint8_t* q = block + 16 + 32 * (unit / 2);
    ForEachVector([&](auto k) {
      const VU nibbles =
          (unit & 1) ? Nibbles<true>(q + k * kLanes) : Nibbles<false>(q + k * kLanes);
      w[k] = hn::MulAdd(scale, ToFloat(nibbles), neg_min);
    });
  }
};

// As Q4_K with a fifth bit per value: bit `unit` of byte l of the 32 bytes of high bits.
struct Q5_KFormat {
  static constexpr int kValues = 256, kBytes = 176;
  static void Unpack(const uint8_t* block, int unit, VF* w) {
    int sc, m;
    ScaleMinK4(unit, block + 4, sc, m);
    const VF scale = hn::Set(DF(), LoadHalf(block) * static_cast<float>(sc));
    const VF neg_min = hn::Set(DF(), -(LoadHalf(block + 2) * static_cast<float>(m)));
    const uint8_t* qh = block + 16;
    const uint8_t* ql = block + 48 + 32 * (unit / 2);
    const VU one = hn::Set(DU(), 1);
    ForEachVector([&](auto k) {
      const VU low = (unit & 1) ? Nibbles<true>(ql + k * kLanes) : Nibbles<false>(ql + k * kLanes);
      const VU fifth =
          hn::ShiftLeft<4>(hn::And(hn::ShiftRightSame(Bytes(qh + k * kLanes), unit), one));
      w[k] = hn::MulAdd(scale, ToFloat(hn::Or(low, fifth)), neg_min);
    });
  }
};

// Super-blocks of 256 in two halves of 128: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8
// scales (one per 16 values), fp16 d: d * sc * (q - 32). In half h, unit uu = u % 4 takes nibbles
// of the 32 bytes at 32 * (uu & 1) (high nibbles for uu >= 2) and bits 2 uu of the high bytes.
struct Q6_KFormat {
  static constexpr int kValues = 256, kBytes = 210;
  static void Unpack(const uint8_t* block, int unit, VF* w) {
    const int half = unit / 4, uu = unit % 4;
    const uint8_t* ql = block + 64 * half + 32 * (uu & 1);
    const uint8_t* qh = block + 128 + 32 * half;
    const auto* scales = reinterpret_cast<const int8_t*>(block + 192 + 8 * half + 2 * uu);
    const float d = LoadHalf(block + 208);
    const VU three = hn::Set(DU(), 3);
    ForEachVector([&](auto k) {
      const VU low = uu >= 2 ? Nibbles<true>(ql + k * kLanes) : Nibbles<false>(ql + k * kLanes);
      const VU high =
          hn::ShiftLeft<4>(hn::And(hn::ShiftRightSame(Bytes(qh + k * kLanes), 2 * uu), three));
      const VF scale = hn::Set(DF(), d * static_cast<float>(scales[k * kLanes / 16]));
      w[k] = hn::Mul(scale, ToFloat(hn::Or(low, high), 32));
    });
  }
};

// --- the one kernel body ------------------------------------------------------------------------

// Adds a token's accumulators in a fixed tree: pairs of vectors, then halves of the lanes. On
// AVX2 this is the order of the earlier hand-written kernel (and of vec::horizontal_sum).
HWY_INLINE float Reduce(const VF* acc) {
  VF sums[kVectors];
  for (int k = 0; k < kVectors; ++k) sums[k] = acc[k];
  for (int width = kVectors / 2; width >= 1; width /= 2)
    for (int k = 0; k < width; ++k) sums[k] = hn::Add(sums[2 * k], sums[2 * k + 1]);
  HWY_ALIGN float lanes[kLanes];
  hn::Store(sums[0], DF(), lanes);
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  return lanes[0];
}

template <int kTokens, typename Format>
void DotTokens(const uint8_t* row, int64_t units, const float* x, int64_t x_stride, float* y,
               int64_t y_stride) {
  constexpr int kUnitsPerBlock = Format::kValues / kUnit;
  VF acc[kTokens][kVectors];
  for (auto& token : acc)
    for (VF& a : token) a = hn::Zero(DF());
  for (int64_t u = 0; u < units; ++u) {
    VF w[kVectors];
    Format::Unpack(row + (u / kUnitsPerBlock) * Format::kBytes,
                   static_cast<int>(u % kUnitsPerBlock), w);
    for (int t = 0; t < kTokens; ++t) {
      const float* xu = x + t * x_stride + u * kUnit;
      for (int k = 0; k < kVectors; ++k)
        acc[t][k] = hn::MulAdd(w[k], hn::LoadU(DF(), xu + k * kLanes), acc[t][k]);
    }
  }
  for (int t = 0; t < kTokens; ++t) y[t * y_stride] = Reduce(acc[t]);
}

template <typename Format>
void DotAnyTokens(const uint8_t* row, int64_t units, const float* x, int64_t x_stride,
                  int64_t tokens, float* y, int64_t y_stride) {
  constexpr int kMaxTokens = 4;
  int64_t t = 0;
  for (; t + kMaxTokens <= tokens; t += kMaxTokens)
    DotTokens<kMaxTokens, Format>(row, units, x + t * x_stride, x_stride, y + t * y_stride,
                                  y_stride);
  const float* xt = x + t * x_stride;
  float* yt = y + t * y_stride;
  switch (tokens - t) {
    case 3:
      return DotTokens<3, Format>(row, units, xt, x_stride, yt, y_stride);
    case 2:
      return DotTokens<2, Format>(row, units, xt, x_stride, yt, y_stride);
    case 1:
      return DotTokens<1, Format>(row, units, xt, x_stride, yt, y_stride);
    default:
      return;
  }
}

// Float rows need not be a whole number of units: the last values are added one at a time.
template <typename Format, typename Element, typename Widen>
void DotFloatRow(const uint8_t* row, int64_t n, const float* x, int64_t x_stride, int64_t tokens,
                 float* y, int64_t y_stride, Widen widen) {
  const int64_t units = n / kUnit;
  DotAnyTokens<Format>(row, units, x, x_stride, tokens, y, y_stride);
  if (units * kUnit == n) return;
  const auto* values = reinterpret_cast<const Element*>(row);
  for (int64_t t = 0; t < tokens; ++t) {
    float sum = y[t * y_stride];
    for (int64_t i = units * kUnit; i < n; ++i) sum += widen(values[i]) * x[t * x_stride + i];
    y[t * y_stride] = sum;
  }
}

void DotRowTokens(DType type, const std::byte* stored_row, int64_t n, const float* x,
                  int64_t x_stride, int64_t tokens, float* y, int64_t y_stride) {
  const auto* row = reinterpret_cast<const uint8_t*>(stored_row);
  const int64_t units = n / kUnit;
  switch (type) {
    case DType::F32:
      return DotFloatRow<F32Format, float>(row, n, x, x_stride, tokens, y, y_stride,
                                           [](float v) { return v; });
    case DType::F16:
      return DotFloatRow<F16Format, uint16_t>(row, n, x, x_stride, tokens, y, y_stride,
                                              [](uint16_t v) { return fp16_to_float(v); });
    case DType::BF16:
      return DotFloatRow<BF16Format, uint16_t>(row, n, x, x_stride, tokens, y, y_stride,
                                               [](uint16_t v) { return bf16_to_float(v); });
    case DType::Q8_0:
      return DotAnyTokens<Q8_0Format>(row, units, x, x_stride, tokens, y, y_stride);
    case DType::Q4_0:
      return DotAnyTokens<Q4_0Format>(row, units, x, x_stride, tokens, y, y_stride);
    case DType::Q4_1:
      return DotAnyTokens<Q4_1Format>(row, units, x, x_stride, tokens, y, y_stride);
    case DType::Q5_0:
      return DotAnyTokens<Q5_0Format>(row, units, x, x_stride, tokens, y, y_stride);
    case DType::Q5_1:
      return DotAnyTokens<Q5_1Format>(row, units, x, x_stride, tokens, y, y_stride);
    case DType::Q4_K:
      return DotAnyTokens<Q4_KFormat>(row, units, x, x_stride, tokens, y, y_stride);
    case DType::Q5_K:
      return DotAnyTokens<Q5_KFormat>(row, units, x, x_stride, tokens, y, y_stride);
    case DType::Q6_K:
      return DotAnyTokens<Q6_KFormat>(row, units, x, x_stride, tokens, y, y_stride);
  }
}

int64_t CompiledTarget() { return HWY_TARGET; }

}  // namespace HWY_NAMESPACE
}  // namespace visikv
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <string>

#include "visikv/core/error.h"
#include "visikv/model/weight_kernels.h"

namespace visikv {

HWY_EXPORT(DotRowTokens);
HWY_EXPORT(CompiledTarget);

void dot_row_tokens(DType type, const std::byte* row, int64_t elements, const float* x,
                    int64_t x_stride, int64_t tokens, float* y, int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(DotRowTokens)(type, row, elements, x, x_stride, tokens, y, y_stride);
}

std::string weight_kernel_target() {
  return hwy::TargetName(HWY_DYNAMIC_DISPATCH(CompiledTarget)());
}

void set_weight_kernel_target(const std::string& name) {
  // Highway's target bits: a lower bit is a better target, so "at most X" keeps X's bit and every
  // higher one.
  int64_t allowed;
  if (name == "native")
    allowed = ~int64_t{0};
  else if (name == "avx512")
    allowed = ~(HWY_AVX3 - 1);
  else if (name == "avx2")
    allowed = ~(HWY_AVX2 - 1);
  else if (name == "generic")
    allowed = ~(HWY_EMU128 - 1);
  else
    fail("unknown SIMD target '", name, "' (expected native, avx512, avx2 or generic)");
  hwy::SetSupportedTargetsForTest(0);  // back to what the CPU supports
  const int64_t supported = hwy::SupportedTargets();
  const int64_t chosen = supported & allowed;
  require(chosen != 0, "SIMD target '", name, "' is not available on this CPU");
  hwy::SetSupportedTargetsForTest(chosen == supported ? 0 : chosen);
}

namespace {
// VISIKV_SIMD=avx2 (for example) limits the kernels from the start.
const bool kTargetFromEnvironment = [] {
  if (const char* name = std::getenv("VISIKV_SIMD"); name != nullptr && *name != '\0')
    set_weight_kernel_target(name);
  return true;
}();
}  // namespace

}  // namespace visikv
#endif  // HWY_ONCE

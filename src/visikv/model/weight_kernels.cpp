// The weight kernels of weight_kernels.h: this file is compiled once per instruction set by
// Highway's foreach_target (AVX-512, AVX2 and the portable EMU128 on x86; NEON on Arm) and
// HWY_DYNAMIC_DISPATCH picks the best one the CPU supports.
//
// One kernel body (DotTokens) and one small entry per weight type (the *Format structs below,
// in the manner of ggml's per-type trait table): a format says how many values a block holds, how
// many bytes it takes, and how to widen 32 of its values ("a unit") into float vectors.

// The portable fallback is compiled even though the rest of the program needs AVX2, so that the
// tests can run it (core/simd_targets.h: the targets left out).
// AVX-512 with VNNI (Ice Lake and later, Zen 4): 8- and 16-bit dot products for the int8 and int16
// paths.
#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL
#endif
#ifndef HWY_COMPILE_ALL_ATTAINABLE
#define HWY_COMPILE_ALL_ATTAINABLE
#endif
#include "visikv/core/simd_targets.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "visikv/model/weight_kernels.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// Highway's own headers must follow foreach_target.h.
#include <hwy/aligned_allocator.h>
#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#if HWY_ARCH_X86
#include <immintrin.h>
#endif

#include "visikv/core/aligned.h"
#include "visikv/core/half.h"
#include "visikv/formats/tensor.h"
#include "visikv/model/amx_products.h"
#include "visikv/model/weight_kernels.h"

HWY_BEFORE_NAMESPACE();
#if HWY_TARGET == HWY_AVX3_DL
// Highway 1.0's AVX3_DL target (chosen for CPUs with AVX-512 VNNI) names the VEX "avxvnni"
// feature but not "avx512vnni", whose 512-bit dot products the int8 and int16 paths use.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512vnni"))), apply_to = function)
#else
#pragma GCC target("avx512vnni")
#endif
#define VISIKV_VNNI_ATTR __attribute__((target(HWY_TARGET_STR ",avx512vnni")))
#endif
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

// 16-bit integer lanes, twice as many as the float lanes (the int16 products of the super-block
// types: a unit of 32 values is one vector on AVX-512, two on AVX2, four on 128-bit targets). The
// one-lane HWY_SCALAR target (the portable fallback of GCC builds) has no pairs of 16-bit lanes
// and takes plain loops instead.
#define VISIKV_SUPER_VECTORS (HWY_TARGET != HWY_SCALAR)
// The tile products (AMX) run from the AVX-512 VNNI target, the only one chosen on CPUs with AMX.
#define VISIKV_TILE_PRODUCTS (HWY_TARGET == HWY_AVX3_DL && VISIKV_AMX_COMPILED)
#if VISIKV_SUPER_VECTORS
using DI16 = hn::Repartition<int16_t, DI>;
using DU8ForI16 = hn::Rebind<uint8_t, DI16>;
using VI = hn::Vec<DI>;
using VI16 = hn::Vec<DI16>;
constexpr int kLanes16 = 2 * kLanes;
constexpr int kVectors16 = kUnit / kLanes16;
#endif

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

// On 16-lane targets a 4-bit code is widened by looking its value up in a vector holding the
// values of all 16 codes (one permute, built with one multiply-add per unit): the table holds
// exactly what the arithmetic computes per value (the same rounding), so results are unchanged.
// Narrower targets convert and multiply.
constexpr bool kNibbleTables = kLanes == 16;
HWY_INLINE VF CodeValues(VF scale, VF offset) {
  return hn::MulAdd(scale, hn::ConvertTo(DF(), hn::Iota(DI(), 0)), offset);
}
HWY_INLINE VF LookUp(VF table, VU codes) {
  return hn::TableLookupLanes(table, hn::IndicesFromVec(DF(), hn::BitCast(DI(), codes)));
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
#if VISIKV_SUPER_VECTORS
template <typename F>
HWY_INLINE void ForEachVector16(F f) {
  ForEachVector(std::make_integer_sequence<int, kVectors16>(), f);
}
#endif

template <int... k, typename F>
HWY_INLINE void ForEachUnit(std::integer_sequence<int, k...>, F f) {
  (f(std::integral_constant<int, k>()), ...);
}

// --- one entry per weight type ------------------------------------------------------------------
// kValues and kBytes per block; Prepare(block) decodes what the block's units share (scales,
// mins) once; Unpack<unit>(block, scales, w) widens unit `unit` (a compile-time index, so shifts
// and offsets are constants) into kVectors float vectors.

// Formats whose units need nothing decoded ahead.
struct NoScales {
  struct Scales {};
  static Scales Prepare(const uint8_t*) { return {}; }
};

struct F32Format : NoScales {
  static constexpr int kValues = kUnit, kBytes = 4 * kUnit;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const auto* p = reinterpret_cast<const float*>(block);
    ForEachVector([&](auto k) HWY_ATTR { w[k] = hn::LoadU(DF(), p + k * kLanes); });
  }
};

struct F16Format : NoScales {
  static constexpr int kValues = kUnit, kBytes = 2 * kUnit;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    const auto* p = reinterpret_cast<const hwy::float16_t*>(block);
    ForEachVector([&](auto k)
                      HWY_ATTR { w[k] = hn::PromoteTo(DF(), hn::LoadU(dh, p + k * kLanes)); });
  }
};

struct BF16Format : NoScales {
  static constexpr int kValues = kUnit, kBytes = 2 * kUnit;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const auto* p = reinterpret_cast<const uint16_t*>(block);
    ForEachVector([&](auto k) HWY_ATTR {
      const VU bits = hn::PromoteTo(DU(), hn::LoadU(DU16(), p + k * kLanes));
      w[k] = hn::BitCast(DF(), hn::ShiftLeft<16>(bits));
    });
  }
};

// fp16 d, 32 int8 values: d * q.
struct Q8_0Format : NoScales {
  static constexpr int kValues = 32, kBytes = 34;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block));
    const auto* qs = reinterpret_cast<const int8_t*>(block + 2);
    ForEachVector([&](auto k) HWY_ATTR {
      w[k] =
          hn::Mul(d, hn::ConvertTo(DF(), hn::PromoteTo(DI(), hn::LoadU(DI8(), qs + k * kLanes))));
    });
  }
};

// fp16 d, 16 bytes of nibbles: d * (q - 8).
struct Q4_0Format : NoScales {
  static constexpr int kValues = 32, kBytes = 18;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block));
    if constexpr (kNibbleTables) {
      const VF table = hn::Mul(d, hn::ConvertTo(DF(), hn::Iota(DI(), -8)));
      ForEachVector([&](auto k) HWY_ATTR { w[k] = LookUp(table, LegacyNibbles<k>(block + 2)); });
    } else {
      ForEachVector([&](auto k)
                        HWY_ATTR { w[k] = hn::Mul(d, ToFloat(LegacyNibbles<k>(block + 2), 8)); });
    }
  }
};

// fp16 d, fp16 m, 16 bytes of nibbles: d * q + m.
struct Q4_1Format : NoScales {
  static constexpr int kValues = 32, kBytes = 20;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block)), m = hn::Set(DF(), LoadHalf(block + 2));
    if constexpr (kNibbleTables) {
      const VF table = CodeValues(d, m);
      ForEachVector([&](auto k) HWY_ATTR { w[k] = LookUp(table, LegacyNibbles<k>(block + 4)); });
    } else {
      ForEachVector(
          [&](auto k) HWY_ATTR { w[k] = hn::MulAdd(d, ToFloat(LegacyNibbles<k>(block + 4)), m); });
    }
  }
};

// fp16 d, 32 fifth bits, 16 bytes of nibbles: d * (q - 16).
struct Q5_0Format : NoScales {
  static constexpr int kValues = 32, kBytes = 22;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block));
    uint32_t qh;
    std::memcpy(&qh, block + 2, sizeof(qh));
    ForEachVector([&](auto k) HWY_ATTR {
      w[k] = hn::Mul(d, ToFloat(hn::Or(LegacyNibbles<k>(block + 6), FifthBits<k>(qh)), 16));
    });
  }
};

// fp16 d, fp16 m, 32 fifth bits, 16 bytes of nibbles: d * q + m.
struct Q5_1Format : NoScales {
  static constexpr int kValues = 32, kBytes = 24;
  template <int>
  static void Unpack(const uint8_t* block, const Scales&, VF* w) {
    const VF d = hn::Set(DF(), LoadHalf(block)), m = hn::Set(DF(), LoadHalf(block + 2));
    uint32_t qh;
    std::memcpy(&qh, block + 4, sizeof(qh));
    ForEachVector([&](auto k) HWY_ATTR {
      w[k] = hn::MulAdd(d, ToFloat(hn::Or(LegacyNibbles<k>(block + 8), FifthBits<k>(qh))), m);
    });
  }
};

// Super-blocks of 256 = 8 units of 32, each with its own scale and min: d * sc * q - dmin * m.
// Unit u's values are the low (u even) or high (u odd) nibbles of the 32 bytes at 32 * (u / 2).
// d * sc * q is a product of an fp16 value and integers below 2^12, exact in float32, so the fused
// multiply-add rounds once, as dequantize()'s multiply-then-subtract does.
// The eight scales and negated mins of a Q4_K/Q5_K super-block, as float32, in one array so
// that one vector pass converts them all.
struct ScalesK4 {
  HWY_ALIGN float values[16];  // d * scale_j for j < 8, then -(dmin * min_j)
  float scale(int j) const { return values[j]; }
  float neg_min(int j) const { return values[8 + j]; }
};

// The 6-bit scales and mins of a Q4_K/Q5_K super-block are packed into 12 bytes: bytes 0-3 hold
// scales 0-3 in their low six bits, bytes 4-7 mins 0-3, bytes 8-11 the low four bits of scales
// 4-7 (low nibble) and mins 4-7 (high nibble), whose top two bits are the top bits of bytes 0-3
// (scales) and 4-7 (mins). Unpacking the three words at once gives the sixteen bytes in order
// (scales 0-7, then mins 0-7); profiles showed the byte-by-byte unpacking taking as long as the
// products themselves on Q4_K models. The products d * scale and dmin * min are exact in float32
// (an 11-bit significand times a 6-bit integer), so the order of the unpacking cannot change them.
struct ScaleMinWords {
  uint32_t scales[2], mins[2];  // bytes 0-3 and 4-7 of each: the sixteen bytes in order
};
HWY_INLINE ScaleMinWords ScaleMinWordsK4(const uint8_t* packed) {
  uint32_t word[3];
  std::memcpy(word, packed, sizeof(word));
  constexpr uint32_t kLow6 = 0x3F3F3F3F, kLow4 = 0x0F0F0F0F, kLow2 = 0x03030303;
  return {{word[0] & kLow6, (word[2] & kLow4) | (((word[0] >> 6) & kLow2) << 4)},
          {word[1] & kLow6, ((word[2] >> 4) & kLow4) | (((word[1] >> 6) & kLow2) << 4)}};
}
#if VISIKV_SUPER_VECTORS
using D8x16 = hn::Full128<uint8_t>;

// ScaleMinWordsK4 in one 128-bit vector (the same sixteen bytes): lanes of 32 bits hold the words
// w0 w1 w2 of the packed scales; lanes 0 and 2 of the result are w0 and w1's low six bits, lanes 1
// and 3 the low (scales) or high (mins) nibbles of w2 with the top two bits of w0 or w1 above
// them. Reads the 16 bytes at `packed` (the last 4 belong to the block's codes).
HWY_INLINE hn::Vec<D8x16> ScaleMinBytesK4(const uint8_t* packed) {
  const hn::Full128<uint32_t> d32;
  const auto words = hn::LoadU(d32, reinterpret_cast<const uint32_t*>(packed));
  const auto low_words = hn::InterleaveLower(d32, words, words);  // w0 w0 w1 w1
  // w2 w2 w2 w2 >> (0 0 0 4): the nibbles of lanes 1 and 3 at the bottom of each byte.
  alignas(16) static constexpr uint32_t kNibbleShift[4] = {0, 0, 0, 4};
  const auto high_words = hn::Shr(hn::Broadcast<2>(words), hn::Load(d32, kNibbleShift));
  const auto six_bits = hn::And(low_words, hn::Set(d32, 0x3F3F3F3Fu));
  const auto split = hn::Or(hn::And(high_words, hn::Set(d32, 0x0F0F0F0Fu)),
                            hn::And(hn::ShiftRight<2>(low_words), hn::Set(d32, 0x30303030u)));
  alignas(16) static constexpr uint32_t kOdd[4] = {0, ~0u, 0, ~0u};
  return hn::BitCast(D8x16(),
                     hn::IfThenElse(hn::MaskFromVec(hn::Load(d32, kOdd)), split, six_bits));
}
#endif

HWY_INLINE ScalesK4 PrepareK4(const uint8_t* block) {
  ScalesK4 s;
  HWY_ALIGN const ScaleMinWords words = ScaleMinWordsK4(block + 4);
  const auto* bytes = reinterpret_cast<const uint8_t*>(&words);
  const VF d = hn::Set(DF(), LoadHalf(block)), neg_dmin = hn::Set(DF(), -LoadHalf(block + 2));
  for (int i = 0; i < 16; i += kLanes) {
    const auto is_scale = hn::Lt(hn::Iota(DI(), i), hn::Set(DI(), 8));
    const VF factor = hn::IfThenElse(hn::RebindMask(DF(), is_scale), d, neg_dmin);
    hn::Store(hn::Mul(factor, ToFloat(Bytes(bytes + i))), DF(), s.values + i);
  }
  return s;
}

struct Q4_KFormat {
  static constexpr int kValues = 256, kBytes = 144;
  using Scales = ScalesK4;
  static Scales Prepare(const uint8_t* block) { return PrepareK4(block); }
  template <int unit>
  static void Unpack(const uint8_t* block, const Scales& s, VF* w) {
    const VF scale = hn::Set(DF(), s.scale(unit)), neg_min = hn::Set(DF(), s.neg_min(unit));
    const uint8_t* q = block + 16 + 32 * (unit / 2);
    if constexpr (kNibbleTables) {
      const VF table = CodeValues(scale, neg_min);
      ForEachVector(
          [&](auto k) HWY_ATTR { w[k] = LookUp(table, Nibbles<(unit & 1) != 0>(q + k * kLanes)); });
    } else {
      ForEachVector([&](auto k) HWY_ATTR {
        w[k] = hn::MulAdd(scale, ToFloat(Nibbles<(unit & 1) != 0>(q + k * kLanes)), neg_min);
      });
    }
  }
};

// As Q4_K with a fifth bit per value: bit `unit` of byte l of the 32 bytes of high bits.
struct Q5_KFormat {
  static constexpr int kValues = 256, kBytes = 176;
  using Scales = ScalesK4;
  static Scales Prepare(const uint8_t* block) { return PrepareK4(block); }
  template <int unit>
  static void Unpack(const uint8_t* block, const Scales& s, VF* w) {
    const VF scale = hn::Set(DF(), s.scale(unit)), neg_min = hn::Set(DF(), s.neg_min(unit));
    const uint8_t* qh = block + 16;
    const uint8_t* ql = block + 48 + 32 * (unit / 2);
    const VU one = hn::Set(DU(), 1);
    ForEachVector([&](auto k) HWY_ATTR {
      const VU low = Nibbles<(unit & 1) != 0>(ql + k * kLanes);
      const VU fifth = hn::ShiftLeft<4>(hn::And(hn::ShiftRight<unit>(Bytes(qh + k * kLanes)), one));
      w[k] = hn::MulAdd(scale, ToFloat(hn::Or(low, fifth)), neg_min);
    });
  }
};

// Super-blocks of 256 in two halves of 128: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8
// scales (one per 16 values), fp16 d: d * sc * (q - 32). In half h, unit uu = u % 4 takes nibbles
// of the 32 bytes at 32 * (uu & 1) (high nibbles for uu >= 2) and bits 2 uu of the high bytes.
struct Q6_KFormat {
  static constexpr int kValues = 256, kBytes = 210;
  struct Scales {
    HWY_ALIGN float scale[16];  // d * sc, one per 16 values
  };
  static Scales Prepare(const uint8_t* block) {
    Scales s;
    const VF d = hn::Set(DF(), LoadHalf(block + 208));
    const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
    for (int i = 0; i < 16; i += kLanes)
      hn::Store(hn::Mul(d, hn::ConvertTo(DF(), hn::PromoteTo(DI(), hn::LoadU(DI8(), sc + i)))),
                DF(), s.scale + i);
    return s;
  }
  template <int unit>
  static void Unpack(const uint8_t* block, const Scales& s, VF* w) {
    constexpr int half = unit / 4, uu = unit % 4;
    const uint8_t* ql = block + 64 * half + 32 * (uu & 1);
    const uint8_t* qh = block + 128 + 32 * half;
    const VU three = hn::Set(DU(), 3);
    ForEachVector([&](auto k) HWY_ATTR {
      const VU low = Nibbles<(uu >= 2)>(ql + k * kLanes);
      const VU high =
          hn::ShiftLeft<4>(hn::And(hn::ShiftRight<2 * uu>(Bytes(qh + k * kLanes)), three));
      const VF scale = hn::Set(DF(), s.scale[2 * unit + k * kLanes / 16]);
      w[k] = hn::Mul(scale, ToFloat(hn::Or(low, high), 32));
    });
  }
};

// --- the one kernel body ------------------------------------------------------------------------

// Adds a token's accumulators in a fixed tree: pairs of vectors, then halves of the lanes. On
// AVX2 this is the order of the earlier hand-written kernel.
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

// The weights stream from memory once per token in decode: software prefetches run ahead of the
// block being read (rows are contiguous, so this runs into the next rows). Into L2, not L1: a core
// has few L1 miss buffers, and prefetches into L1 kept so few lines in flight that decode waited
// on memory and on its own arithmetic in turn; into L2, 16 KB ahead, one-thread decode of the 1.5B
// Q4_K_M model went from 10.3 to 13.9 tokens/s on a Zen 4 core, two threads from 19.7 to 25.6,
// and the default model's decode from 163 to 181 (int16). 32 KB measured alike, 64 KB slower, and
// without prefetching the 1.5B model decodes at 6.4.
constexpr int64_t kPrefetchBytes = 16384;
// Every cache line of the `bytes` bytes at `p`, kPrefetchBytes ahead. Blocks larger than a line
// (the super-block types: 144-210 bytes) need one prefetch per line: with one per block, half
// their lines arrived only on demand, and one-thread decode of a Q4_K model waited on them.
HWY_INLINE void PrefetchAhead(const uint8_t* p, int bytes) {
  for (int offset = 0; offset < bytes; offset += 64)
    __builtin_prefetch(p + kPrefetchBytes + offset, /*read*/ 0, /*into L2*/ 2);
}

// kRows rows (row_bytes apart) times kTokens tokens: acc[r][t] holds row r's sums for token t, in
// the same order for every r, so each output is the one-row kernel's. Several rows at once give
// the core independent chains of multiply-adds and loads (decode reads each weight once per
// token, so it waits on memory unless several rows are in flight).
template <int kRows, int kTokens, typename Format>
void DotTokens(const uint8_t* row, int64_t row_bytes, int64_t units, const float* x,
               int64_t x_stride, float* y, int64_t y_stride) {
  constexpr int kUnitsPerBlock = Format::kValues / kUnit;
  VF acc[kRows][kTokens][kVectors];
  for (auto& r : acc)
    for (auto& token : r)
      for (VF& a : token) a = hn::Zero(DF());
  for (int64_t b = 0; b < units / kUnitsPerBlock; ++b) {
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* block = row + r * row_bytes + b * Format::kBytes;
      PrefetchAhead(block, Format::kBytes);
      const typename Format::Scales scales = Format::Prepare(block);
      ForEachUnit(std::make_integer_sequence<int, kUnitsPerBlock>(), [&](auto unit) HWY_ATTR {
        VF w[kVectors];
        Format::template Unpack<unit>(block, scales, w);
        for (int t = 0; t < kTokens; ++t) {
          const float* xu = x + t * x_stride + (b * kUnitsPerBlock + unit) * kUnit;
          for (int k = 0; k < kVectors; ++k)
            acc[r][t][k] = hn::MulAdd(w[k], hn::LoadU(DF(), xu + k * kLanes), acc[r][t][k]);
        }
      });
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) y[t * y_stride + r] = Reduce(acc[r][t]);
}

// Calls step(std::integral_constant<int, K>{}, t) for the tokens [t, t + K) of [0, tokens): groups
// of four, then one of the remaining 1-3, so the kernels are instantiated for 1 to 4 tokens.
template <typename Step>
HWY_INLINE void InTokenGroups(int64_t tokens, const Step& step) {
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4) step(std::integral_constant<int, 4>{}, t);
  switch (tokens - t) {
    case 3:
      return step(std::integral_constant<int, 3>{}, t);
    case 2:
      return step(std::integral_constant<int, 2>{}, t);
    case 1:
      return step(std::integral_constant<int, 1>{}, t);
    default:
      return;
  }
}

template <typename Format>
void DotAnyTokens(const uint8_t* row, int64_t units, const float* x, int64_t x_stride,
                  int64_t tokens, float* y, int64_t y_stride) {
  InTokenGroups(tokens, [&](auto count, int64_t t) HWY_ATTR {
    DotTokens<1, decltype(count)::value, Format>(row, 0, units, x + t * x_stride, x_stride,
                                                 y + t * y_stride, y_stride);
  });
}

// --- the blocked product (many tokens)
// ------------------------------------------------------------ A range of rows times many tokens as
// a cache-blocked product. The rows are taken a step of kStepValues values at a time: the step of
// every row is widened once into a float32 panel (128 KB for 32 rows, in L2), then each group of
// kGroupTokens tokens (their step of the input, 16 KB, copied into an aligned block in L1) meets
// every row of the panel, two rows at a time, and the accumulators wait in memory between steps.
// The widened values are the ones the row kernel multiplies, and each output is summed in
// DotTokens' order, so the result equals the row kernel's bit for bit; what changes is that a
// weight is unpacked once per call instead of once per four tokens, and an input vector loaded once
// serves two rows. Steps of 256 and 512 values (panels in L1) measured about 5% slower on AVX-512
// (bench/bench_weight_kernels.cpp).

// A buffer aligned to cache lines that grows and keeps its memory.
template <typename T>
class AlignedBuffer {
 public:
  T* Reserve(int64_t count) {
    if (count > capacity_) {
      data_ = hwy::AllocateAligned<T>(static_cast<size_t>(count));
      capacity_ = count;
    }
    return data_.get();
  }

 private:
  hwy::AlignedFreeUniquePtr<T[]> data_;
  int64_t capacity_ = 0;
};

constexpr int kGroupTokens = 4;
constexpr int64_t kStepValues = 1024;  // a whole number of blocks of every type
constexpr int64_t kStateFloats = kGroupTokens * kVectors * kLanes;  // one (row, group)'s sums

// Values [first_block, end_block) of a row, widened to float32 into `out`.
template <typename Format>
HWY_INLINE void WidenBlocks(const uint8_t* row, int64_t first_block, int64_t end_block,
                            float* out) {
  constexpr int kUnitsPerBlock = Format::kValues / kUnit;
  for (int64_t b = first_block; b < end_block; ++b) {
    const uint8_t* block = row + b * Format::kBytes;
    const typename Format::Scales scales = Format::Prepare(block);
    float* block_out = out + (b - first_block) * Format::kValues;
    ForEachUnit(std::make_integer_sequence<int, kUnitsPerBlock>(), [&](auto unit) HWY_ATTR {
      VF w[kVectors];
      Format::template Unpack<unit>(block, scales, w);
      for (int k = 0; k < kVectors; ++k)
        hn::StoreU(w[k], DF(), block_out + unit * kUnit + k * kLanes);
    });
  }
}

// kRows widened rows (kStepValues apart) times kTokens tokens over `units` units, continuing (or,
// if `start`, starting) the sums kept in `state` (kStateFloats apart per row). Per output the
// same multiply-adds in the same order as DotTokens; a weight vector loaded once serves kTokens
// tokens and an input vector kRows rows.
// Compilers fold a vector load into each multiply-add that uses it; an input vector that serves
// several rows is then loaded once per row, and the loads, not the multiply-adds, bound the loop.
// An empty asm statement that "modifies" the register makes the value opaque, so it is loaded once.
HWY_INLINE void KeepInRegister(VF& v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && (defined(__GNUC__) || defined(__clang__))
  asm("" : "+v"(v.raw));
#else
  (void)v;
#endif
}

template <int kRows, int kTokens>
HWY_INLINE void PanelStep(const float* widened, int64_t units, const float* x, int64_t x_stride,
                          bool start, float* state) {
  VF acc[kRows][kTokens][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t)
      for (int k = 0; k < kVectors; ++k)
        acc[r][t][k] =
            start ? hn::Zero(DF())
                  : hn::LoadU(DF(), state + r * kStateFloats + (t * kVectors + k) * kLanes);
  for (int64_t u = 0; u < units; ++u) {
    VF w[kRows][kVectors];
    for (int r = 0; r < kRows; ++r)
      for (int k = 0; k < kVectors; ++k)
        w[r][k] = hn::LoadU(DF(), widened + r * kStepValues + u * kUnit + k * kLanes);
    for (int t = 0; t < kTokens; ++t)
      for (int k = 0; k < kVectors; ++k) {
        VF xv = hn::LoadU(DF(), x + t * x_stride + u * kUnit + k * kLanes);
        if constexpr (kRows > 1) KeepInRegister(xv);
        for (int r = 0; r < kRows; ++r) acc[r][t][k] = hn::MulAdd(w[r][k], xv, acc[r][t][k]);
      }
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t)
      for (int k = 0; k < kVectors; ++k)
        hn::StoreU(acc[r][t][k], DF(), state + r * kStateFloats + (t * kVectors + k) * kLanes);
}

// Two rows at a time where the registers hold their 2 x 4 tokens' sums (32 vector registers of
// AVX-512); one row at a time on AVX2, whose 16 registers one row's sums already fill.
constexpr int kPanelRows = kVectors <= 2 && HWY_TARGET != HWY_EMU128 ? 2 : 1;

template <int kRows, int kTokens = kGroupTokens>
HWY_INLINE void PanelStepTokens(int64_t count, const float* widened, int64_t units, const float* x,
                                int64_t x_stride, bool start, float* state) {
  if constexpr (kTokens > 1)
    if (count < kTokens)
      return PanelStepTokens<kRows, kTokens - 1>(count, widened, units, x, x_stride, start, state);
  PanelStep<kRows, kTokens>(widened, units, x, x_stride, start, state);
}

// Asks for ownership of the lines that a blocked product's outputs (y[t * y_stride + r], r < rows,
// t < tokens) will be stored to, before the products that take longest: a prefill's outputs (up to
// 18 MB for one matrix of the 1.5B model) are in no cache, and the stores at the end waited on
// every line (one-thread prefill of 512 tokens of the 1.5B model with the tile products, four
// interleaved pairs: 58.0 -> 61.1 tokens/s on average).
HWY_INLINE void PrefetchOutputs(float* y, int64_t y_stride, int64_t rows, int64_t tokens) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < rows; r += 16) __builtin_prefetch(y + t * y_stride + r, 1, 2);
    __builtin_prefetch(y + t * y_stride + rows - 1, 1, 2);
  }
}

template <typename Format>
void BlockedRows(const uint8_t* first, int64_t row_bytes, int64_t rows, int64_t n, const float* x,
                 int64_t x_stride, int64_t tokens, float* y, int64_t y_stride) {
  PrefetchOutputs(y, y_stride, rows, tokens);
  constexpr int64_t kStepBlocks = kStepValues / Format::kValues;
  static_assert(kStepBlocks * Format::kValues == kStepValues);
  const int64_t blocks = n / Format::kValues;
  const int64_t groups = (tokens + kGroupTokens - 1) / kGroupTokens;
  // Grow to the largest call and are then reused: nothing is allocated on the hot path. Aligned
  // to whole cache lines, so that no vector load is split over two of them.
  thread_local AlignedBuffer<float> state_buffer, panel_buffer, input_buffer;
  float* state = state_buffer.Reserve(rows * groups * kStateFloats);
  float* panel = panel_buffer.Reserve(rows * kStepValues);
  float* input = input_buffer.Reserve(kGroupTokens * kStepValues);
  // An input whose rows start on cache lines (the decoder's buffers) is read in place; any other
  // is copied, a group's step at a time, into an aligned block the rows share. Either way the
  // products see the same values.
  const bool in_place = reinterpret_cast<uintptr_t>(x) % kCacheLine == 0 &&
                        (x_stride * sizeof(float)) % kCacheLine == 0;
  for (int64_t b0 = 0; b0 < blocks; b0 += kStepBlocks) {
    const int64_t b1 = std::min(blocks, b0 + kStepBlocks);
    for (int64_t r = 0; r < rows; ++r)
      WidenBlocks<Format>(first + r * row_bytes, b0, b1, panel + r * kStepValues);
    const int64_t values = (b1 - b0) * Format::kValues, units = values / kUnit;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t count = std::min<int64_t>(kGroupTokens, tokens - g * kGroupTokens);
      const float* group_input = x + g * kGroupTokens * x_stride + b0 * Format::kValues;
      int64_t group_stride = x_stride;
      if (!in_place) {
        for (int64_t t = 0; t < count; ++t)
          std::memcpy(input + t * kStepValues, group_input + t * x_stride,
                      static_cast<size_t>(values) * sizeof(float));
        group_input = input;
        group_stride = kStepValues;
      }
      int64_t r = 0;
      for (; r + kPanelRows <= rows; r += kPanelRows)
        PanelStepTokens<kPanelRows>(count, panel + r * kStepValues, units, group_input,
                                    group_stride, b0 == 0, state + (g * rows + r) * kStateFloats);
      for (; r < rows; ++r)
        PanelStepTokens<1>(count, panel + r * kStepValues, units, group_input, group_stride,
                           b0 == 0, state + (g * rows + r) * kStateFloats);
    }
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = g * kGroupTokens; t < std::min(tokens, (g + 1) * kGroupTokens); ++t) {
        const float* s =
            state + (g * rows + r) * kStateFloats + (t - g * kGroupTokens) * kVectors * kLanes;
        VF acc[kVectors];
        for (int k = 0; k < kVectors; ++k) acc[k] = hn::LoadU(DF(), s + k * kLanes);
        y[t * y_stride + r] = Reduce(acc);
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

// Rows of one token go kDecodeRows at a time (their sums fill 8 of AVX-512's 32 registers, or 8
// of AVX2's 16 with two rows).
template <typename Format>
constexpr int kDecodeRows = Format::kValues > kUnit ? 1 : (kVectors <= 2 ? 4 : 2);

// Each row of a range: the per-type switch and the dispatch happen once per range.
template <typename Format>
void DotBlockRows(const uint8_t* first, int64_t row_bytes, int64_t rows, int64_t n, const float* x,
                  int64_t x_stride, int64_t tokens, float* y, int64_t y_stride) {
  if (tokens > kGroupTokens && rows > 1)
    return BlockedRows<Format>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
  int64_t r = 0;
  if (tokens == 1 && kDecodeRows < Format >> 1)
    for (; r + kDecodeRows<Format> <= rows; r += kDecodeRows<Format>)
      DotTokens<kDecodeRows<Format>, 1, Format>(first + r * row_bytes, row_bytes, n / kUnit, x,
                                                x_stride, y + r, y_stride);
  for (; r < rows; ++r)
    DotAnyTokens<Format>(first + r * row_bytes, n / kUnit, x, x_stride, tokens, y + r, y_stride);
}

template <typename Format, typename Element, typename Widen>
void DotFloatRows(const uint8_t* first, int64_t row_bytes, int64_t rows, int64_t n, const float* x,
                  int64_t x_stride, int64_t tokens, float* y, int64_t y_stride, Widen widen) {
  if (tokens > kGroupTokens && rows > 1 && n % kUnit == 0)
    return BlockedRows<Format>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
  for (int64_t r = 0; r < rows; ++r)
    DotFloatRow<Format, Element>(first + r * row_bytes, n, x, x_stride, tokens, y + r, y_stride,
                                 widen);
}

void DotRowsTokens(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                   int64_t n, const float* x, int64_t x_stride, int64_t tokens, float* y,
                   int64_t y_stride) {
  const auto* first = reinterpret_cast<const uint8_t*>(first_row);
  switch (type) {
    case DType::F32:
      return DotFloatRows<F32Format, float>(first, row_bytes, rows, n, x, x_stride, tokens, y,
                                            y_stride, [](float v) { return v; });
    case DType::F16:
      return DotFloatRows<F16Format, uint16_t>(first, row_bytes, rows, n, x, x_stride, tokens, y,
                                               y_stride,
                                               [](uint16_t v) { return fp16_to_float(v); });
    case DType::BF16:
      return DotFloatRows<BF16Format, uint16_t>(first, row_bytes, rows, n, x, x_stride, tokens, y,
                                                y_stride,
                                                [](uint16_t v) { return bf16_to_float(v); });
    case DType::Q8_0:
      return DotBlockRows<Q8_0Format>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
    case DType::Q4_0:
      return DotBlockRows<Q4_0Format>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
    case DType::Q4_1:
      return DotBlockRows<Q4_1Format>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
    case DType::Q5_0:
      return DotBlockRows<Q5_0Format>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
    case DType::Q5_1:
      return DotBlockRows<Q5_1Format>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
    case DType::Q4_K:
      return DotBlockRows<Q4_KFormat>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
    case DType::Q5_K:
      return DotBlockRows<Q5_KFormat>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
    case DType::Q6_K:
      return DotBlockRows<Q6_KFormat>(first, row_bytes, rows, n, x, x_stride, tokens, y, y_stride);
  }
}

// --- int8 products: weight codes times 8-bit activation codes --------------------------------
// One entry per block type: Prepare(block) gives a scale and an offset per 16 values (w_j =
// scale[j / 16] * code_j + offset[j / 16]; kUnitScale: one scale per unit of 32, as every type
// but Q6_K has);
// Codes<unit> writes unit `unit`'s 32 integer codes, in [0, 63] (or [-128, 127] for Q8_0, kSigned);
// on x86 Codes256<unit> returns them as one vector.

template <int kGroups>
struct GroupScales {
  float scale[kGroups], offset[kGroups];
};
using LegacyScales = GroupScales<2>;
inline LegacyScales Uniform(float scale, float offset) {
  return {{scale, scale}, {offset, offset}};
}

// Legacy nibble layout: value j < 16 is the low nibble of byte j, value 16 + j its high nibble.
inline int LegacyNibble(const uint8_t* qs, int j) {
  return j < 16 ? qs[j] & 0x0F : qs[j - 16] >> 4;
}

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
#define VISIKV_X86_INT8 1
inline __m256i LegacyNibbles256(const uint8_t* qs) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask),
                          _mm_and_si128(bytes, mask));
}
// Byte j: 16 when bit j of `bits` is set, else 0.
inline __m256i FifthBits256(uint32_t bits) {
  const __m256i spread =
      _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
                          _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101,
                                             0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                          _mm256_set1_epi8(16));
}
// (bytes >> kShift) & mask, byte by byte.
template <int kShift>
inline __m256i ShiftMask256(__m256i bytes, int mask) {
  return _mm256_and_si256(_mm256_srli_epi16(bytes, kShift),
                          _mm256_set1_epi8(static_cast<char>(mask)));
}
inline __m256i Load256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
#if HWY_TARGET == HWY_AVX3_DL
// acc + the 256-bit VNNI dot product of unsigned with signed bytes, in its EVEX (AVX-512 VNNI)
// encoding. Highway 1.0's AVX3_DL target also enables the VEX "avxvnni" feature, and compilers
// then emit the shorter VEX form of _mm256_dpbusd_epi32, an illegal instruction on CPUs with
// AVX-512 VNNI but without AVX-VNNI (AMD Zen 4).
inline __m256i DotBytes256(__m256i acc, __m256i u8, __m256i s8) {
#if defined(__GNUC__) || defined(__clang__)
  asm("%{evex%} vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
#else
  return _mm256_dpbusd_epi32(acc, u8, s8);
#endif
}
#endif
#else
#define VISIKV_X86_INT8 0
#endif

struct Q8_0Codes {
  static constexpr int kValues = 32, kBytes = 34;
  static constexpr bool kSigned = true, kHasOffset = false, kUnitScale = true;
  using Scales = LegacyScales;
  static Scales Prepare(const uint8_t* block) { return Uniform(LoadHalf(block), 0.0f); }
  template <int>
  static void Codes(const uint8_t* block, int8_t* codes) {
    std::memcpy(codes, block + 2, 32);
  }
#if VISIKV_X86_INT8
  template <int>
  static __m256i Codes256(const uint8_t* block) {
    return Load256(block + 2);
  }
#endif
};

// Q4_0 (q - 8) * d and Q4_1 q * d + m.
template <bool kHasMin>
struct Q4Codes {
  static constexpr int kValues = 32, kBytes = kHasMin ? 20 : 18;
  static constexpr bool kSigned = false, kHasOffset = true, kUnitScale = true;
  static constexpr int kNibbleBytes = kHasMin ? 4 : 2;  // where the 16 bytes of nibbles start
  using Scales = LegacyScales;
  static Scales Prepare(const uint8_t* block) {
    const float d = LoadHalf(block);
    return Uniform(d, kHasMin ? LoadHalf(block + 2) : -8.0f * d);
  }
  template <int>
  static void Codes(const uint8_t* block, int8_t* codes) {
    for (int j = 0; j < 32; ++j)
      codes[j] = static_cast<int8_t>(LegacyNibble(block + (kHasMin ? 4 : 2), j));
  }
#if VISIKV_X86_INT8
  template <int>
  static __m256i Codes256(const uint8_t* block) {
    return LegacyNibbles256(block + (kHasMin ? 4 : 2));
  }
#endif
};

// Q5_0 (q - 16) * d and Q5_1 q * d + m, the fifth bit of value j being bit j of a 32-bit word.
template <bool kHasMin>
struct Q5Codes {
  static constexpr int kValues = 32, kBytes = kHasMin ? 24 : 22;
  static constexpr bool kSigned = false, kHasOffset = true, kUnitScale = true;
  using Scales = LegacyScales;
  static Scales Prepare(const uint8_t* block) {
    const float d = LoadHalf(block);
    return Uniform(d, kHasMin ? LoadHalf(block + 2) : -16.0f * d);
  }
  static uint32_t FifthBits(const uint8_t* block) {
    uint32_t qh;
    std::memcpy(&qh, block + (kHasMin ? 4 : 2), sizeof(qh));
    return qh;
  }
  template <int>
  static void Codes(const uint8_t* block, int8_t* codes) {
    const uint32_t qh = FifthBits(block);
    for (int j = 0; j < 32; ++j)
      codes[j] =
          static_cast<int8_t>(LegacyNibble(block + (kHasMin ? 8 : 6), j) | (((qh >> j) & 1) << 4));
  }
#if VISIKV_X86_INT8
  template <int>
  static __m256i Codes256(const uint8_t* block) {
    return _mm256_or_si256(LegacyNibbles256(block + (kHasMin ? 8 : 6)),
                           FifthBits256(FifthBits(block)));
  }
#endif
};

// The int16 products of the super-block types (Q4_K, Q5_K, Q6_K) take one activation scale per
// super-block of 256 values, so that a block's integer scales can be folded into its weight codes
// (16-bit products of at most 4096 in magnitude) and the whole block summed as integers before one
// float multiply-add: w_j = d * (scale_g * code_j) + offset_g for value j of group g (16 values).
// SuperScales is what a block's units share; Codes16<unit> (in each format below) writes unit
// `unit`'s 32 values of scale_g * code_j as kVectors16 vectors. The scales are kept as 16-bit
// lanes, which a unit's scale vector is taken from with one permute (AVX-512) or broadcast.
struct SuperScales {
  float d;
  HWY_ALIGN float offsets[16];  // Q4_K/Q5_K: -dmin * min of each group of 16 (unused for Q6_K)
  HWY_ALIGN int16_t group_scale[16];  // scale_g
};

#if VISIKV_SUPER_VECTORS
using DI16x16 = hn::Rebind<int16_t, D8x16>;  // 16 lanes: 256 bits on AVX2 and AVX-512

// 16 bytes (as unsigned or signed) widened to the 16 group scales in one vector on AVX2 and
// AVX-512 (256 bits); 128-bit targets widen each half. (The test is on the target, not on the
// tag's MaxLanes: Highway's EMU128 reports 16 lanes for a 16-lane tag it stores in 8.)
template <typename Byte>
HWY_INLINE void StoreGroupScales(hn::Vec<hn::Full128<Byte>> bytes, int16_t* out) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  hn::Store(hn::PromoteTo(DI16x16(), bytes), DI16x16(), out);
#else
  const hn::Full128<Byte> d8;
  const hn::Full128<int16_t> d16;
  hn::Store(hn::PromoteTo(d16, hn::LowerHalf(bytes)), d16, out);
  hn::Store(hn::PromoteTo(d16, hn::UpperHalf(hn::Half<decltype(d8)>(), bytes)), d16, out + 8);
#endif
}
#endif

// The eight bytes b0 .. b7 of two words as b0 b0 b1 b1 .. b7 b7 in four: the K4 scales or mins
// (one per 32 values) as one per group of 16.
struct SpreadWords {
  uint32_t words[4];
};
constexpr SpreadWords SpreadPairs(const uint32_t (&bytes)[2]) {
  const auto spread = [](uint32_t low16) {
    return ((low16 | (low16 << 8)) & 0x00FF00FF) * 0x0101;  // b0 b1 -> b0 b0 b1 b1
  };
  return {{spread(bytes[0] & 0xFFFF), spread(bytes[0] >> 16), spread(bytes[1] & 0xFFFF),
           spread(bytes[1] >> 16)}};
}

#if VISIKV_SUPER_VECTORS
// kLanes16 bytes as 16-bit lanes.
HWY_INLINE VI16 Bytes16(const uint8_t* p) {
  return hn::PromoteTo(DI16(), hn::LoadU(DU8ForI16(), p));
}

// scale_g for vector k of unit `unit`: one group per vector on targets of at most 16 lanes of 16
// bits, two (lanes 0-15 and 16-31) on AVX-512.
// On AVX-512 both come from the 16 scales with one permute (two broadcasts and a blend, each
// broadcast first moving its scale through a general register, took a third of Q6_K's decode).
template <int unit, int k>
HWY_INLINE VI16 GroupScales16(const SuperScales& s) {
  constexpr int group = (unit * kUnit + k * kLanes16) / 16;
  if constexpr (kLanes16 <= 16) {
    return hn::Set(DI16(), s.group_scale[group]);
  } else {
#if HWY_TARGET <= HWY_AVX3
    alignas(64) static constexpr auto kIndices = [] {
      std::array<int16_t, 32> lanes{};
      for (int i = 0; i < 32; ++i) lanes[i] = static_cast<int16_t>(group + i / 16);
      return lanes;
    }();
    const __m512i scales =
        _mm512_castsi256_si512(_mm256_load_si256(reinterpret_cast<const __m256i*>(s.group_scale)));
    return VI16{_mm512_permutexvar_epi16(_mm512_load_si512(kIndices.data()), scales)};
#else
    return hn::IfThenElse(hn::FirstN(DI16(), 16), hn::Set(DI16(), s.group_scale[group]),
                          hn::Set(DI16(), s.group_scale[group + 1]));
#endif
  }
}
#endif

// Q4_K and Q5_K: unit u takes the low (u even) or high nibbles of the 32 bytes at 32 * (u / 2),
// and for Q5_K bit u of the 32 high-bit bytes; sc * d * q - m * dmin.
template <bool kFifthBit>
struct QK45Codes {
  static constexpr int kValues = 256, kBytes = kFifthBit ? 176 : 144;
  static constexpr bool kSigned = false, kHasOffset = true, kUnitScale = true;
  static constexpr int kMaxWeight16 = 63 * (kFifthBit ? 31 : 15);  // |scale_g * code_j|
  static constexpr int kCodeOffset = 0;        // what Codes() gives is code_j + kCodeOffset
  static constexpr bool kSuperOffsets = true;  // SuperScales::offsets are used
  static SuperScales PrepareSuper(const uint8_t* block) {
    // Decode unpacks every block once per token, so this runs as often as the products: in
    // vectors (16 scalar conversions, and later the same work in whole words, each took about as
    // many instructions as the block's products).
    SuperScales s;
    s.d = LoadHalf(block);
    const VF neg_dmin = hn::Set(DF(), -LoadHalf(block + 2));
#if VISIKV_SUPER_VECTORS
    // One vector of the scales 0-7 and mins 0-7, each byte then doubled (one per group of 16) by
    // interleaving the vector with itself.
    const auto bytes = ScaleMinBytesK4(block + 4);
    StoreGroupScales<uint8_t>(hn::InterleaveLower(D8x16(), bytes, bytes), s.group_scale);
    HWY_ALIGN uint8_t mins[16];
    hn::Store(hn::InterleaveUpper(D8x16(), bytes, bytes), D8x16(), mins);
#else
    const ScaleMinWords words = ScaleMinWordsK4(block + 4);
    const SpreadWords scales = SpreadPairs(words.scales);
    const auto* scale_bytes = reinterpret_cast<const uint8_t*>(scales.words);
    for (int g = 0; g < 16; ++g) s.group_scale[g] = scale_bytes[g];
    HWY_ALIGN const SpreadWords spread_mins = SpreadPairs(words.mins);
    const auto* mins = reinterpret_cast<const uint8_t*>(spread_mins.words);
#endif
    // offsets[g] = -dmin * min_{g / 2}, exact in float32.
    for (int g = 0; g < 16; g += kLanes)
      hn::Store(hn::Mul(neg_dmin, ToFloat(Bytes(mins + g))), DF(), s.offsets + g);
    return s;
  }
#if VISIKV_SUPER_VECTORS
  template <int unit>
  static void Codes16(const uint8_t* block, const SuperScales& s, VI16* w) {
    ForEachVector16([&](auto k) HWY_ATTR {
      const VI16 bytes = Bytes16(block + (kFifthBit ? 48 : 16) + 32 * (unit / 2) + k * kLanes16);
      VI16 code = (unit & 1) != 0 ? hn::ShiftRight<4>(bytes) : hn::And(bytes, hn::Set(DI16(), 15));
      if constexpr (kFifthBit)
        code = hn::Or(
            code, hn::ShiftLeft<4>(hn::And(hn::ShiftRight<unit>(Bytes16(block + 16 + k * kLanes16)),
                                           hn::Set(DI16(), 1))));
      w[k] = hn::Mul(code, GroupScales16<unit, k>(s));  // both groups of the unit share one
    });
  }
#endif
  using Scales = GroupScales<16>;
  static Scales Prepare(const uint8_t* block) {
    const ScalesK4 k4 = PrepareK4(block);
    Scales s;
    for (int g = 0; g < 16; ++g) s.scale[g] = k4.scale(g / 2), s.offset[g] = k4.neg_min(g / 2);
    return s;
  }
  static const uint8_t* Nibbles(const uint8_t* block, int unit) {
    return block + (kFifthBit ? 48 : 16) + 32 * (unit / 2);
  }
  template <int unit>
  static void Codes(const uint8_t* block, int8_t* codes) {
    const uint8_t* q = Nibbles(block, unit);
    for (int l = 0; l < 32; ++l) {
      int code = (q[l] >> ((unit & 1) * 4)) & 0x0F;
      if constexpr (kFifthBit) code |= ((block[16 + l] >> unit) & 1) << 4;
      codes[l] = static_cast<int8_t>(code);
    }
  }
#if VISIKV_X86_INT8
  template <int unit>
  static __m256i Codes256(const uint8_t* block) {
    const __m256i codes = ShiftMask256<(unit & 1) * 4>(Load256(Nibbles(block, unit)), 0x0F);
    if constexpr (!kFifthBit) return codes;
    return _mm256_or_si256(codes, _mm256_slli_epi16(ShiftMask256<unit>(Load256(block + 16), 1), 4));
  }
#endif
};

// Q6_K: in half h = u / 4, unit uu = u % 4 takes nibbles of the 32 bytes at 32 * (uu & 1) (high
// ones for uu >= 2) and bits 2 uu of the 32 high-bit bytes; d * sc * (q - 32), sc per 16 values.
struct Q6_KCodes {
  static constexpr int kValues = 256, kBytes = 210;
  static constexpr bool kSigned = false, kHasOffset = true, kUnitScale = false;
  static constexpr int kMaxWeight16 = 128 * 32;  // |sc * (q - 32)|
  static constexpr int kCodeOffset = 32;
  // -32 is folded into the codes: with unsigned codes and -32 * sc in the offsets, the products'
  // bound doubles and the int32 lanes would be flushed every four units instead of once per
  // super-block (measured: decode alike, 64-token products 18% slower).
  static constexpr bool kSuperOffsets = false;
  static SuperScales PrepareSuper(const uint8_t* block) {
    SuperScales s;
    s.d = LoadHalf(block + 208);
    const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
#if VISIKV_SUPER_VECTORS
    StoreGroupScales<int8_t>(hn::LoadU(hn::Full128<int8_t>(), sc), s.group_scale);
#else
    for (int g = 0; g < 16; ++g) s.group_scale[g] = sc[g];
#endif
    return s;
  }
#if VISIKV_SUPER_VECTORS
  template <int unit>
  static void Codes16(const uint8_t* block, const SuperScales& s, VI16* w) {
    constexpr int half = unit / 4, uu = unit % 4;
    ForEachVector16([&](auto k) HWY_ATTR {
      const VI16 ql = Bytes16(block + 64 * half + 32 * (uu & 1) + k * kLanes16);
      const VI16 qh = Bytes16(block + 128 + 32 * half + k * kLanes16);
      const VI16 low = uu >= 2 ? hn::ShiftRight<4>(ql) : hn::And(ql, hn::Set(DI16(), 15));
      // Bits 2 uu and 2 uu + 1 of the high byte moved to bits 4 and 5 with at most one shift.
      VI16 high_bits;
      if constexpr (uu == 0)
        high_bits = hn::ShiftLeft<4>(qh);
      else if constexpr (uu == 1)
        high_bits = hn::ShiftLeft<2>(qh);
      else if constexpr (uu == 2)
        high_bits = qh;
      else
        high_bits = hn::ShiftRight<2>(qh);
      const VI16 code = hn::Or(low, hn::And(high_bits, hn::Set(DI16(), 0x30)));
      w[k] = hn::Mul(hn::Sub(code, hn::Set(DI16(), 32)), GroupScales16<unit, k>(s));
    });
  }
#endif
  using Scales = GroupScales<16>;
  static Scales Prepare(const uint8_t* block) {
    Scales s;
    const float d = LoadHalf(block + 208);
    const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
    for (int g = 0; g < 16; ++g) {
      s.scale[g] = d * static_cast<float>(sc[g]);
      s.offset[g] = -32.0f * s.scale[g];
    }
    return s;
  }
  template <int unit>
  static void Codes(const uint8_t* block, int8_t* codes) {
    constexpr int half = unit / 4, uu = unit % 4;
    const uint8_t* ql = block + 64 * half + 32 * (uu & 1);
    const uint8_t* qh = block + 128 + 32 * half;
    for (int l = 0; l < 32; ++l)
      codes[l] = static_cast<int8_t>(((ql[l] >> (uu >= 2 ? 4 : 0)) & 0x0F) |
                                     (((qh[l] >> (2 * uu)) & 3) << 4));
  }
#if VISIKV_X86_INT8
  template <int unit>
  static __m256i Codes256(const uint8_t* block) {
    constexpr int half = unit / 4, uu = unit % 4;
    const __m256i low =
        ShiftMask256 < uu >= 2 ? 4 : 0 > (Load256(block + 64 * half + 32 * (uu & 1)), 0x0F);
    const __m256i high = ShiftMask256<2 * uu>(Load256(block + 128 + 32 * half), 3);
    return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
  }
#endif
};

// The int8 kernel body: kTokens tokens (their codes from token `first` of x) times one row.
template <int kTokens, typename Format>
void DotInt8Tokens(const uint8_t* row, int64_t units, const Int8Activations& x, int64_t first,
                   float* y, int64_t y_stride) {
  constexpr int kUnitsPerBlock = Format::kValues / kUnit, kGroups = Format::kValues / 16;
  const int64_t n = x.elements;
  const int8_t* codes[kTokens];
  const float* scales[kTokens];
  const float* sums16[kTokens];
  for (int t = 0; t < kTokens; ++t) {
    codes[t] = x.codes.data() + (first + t) * n;
    scales[t] = x.scales.data() + (first + t) * units;
    sums16[t] = x.sums16.data() + (first + t) * 2 * units;
  }
  // The offsets multiply exact float sums of the activations, per group of 16.
  float offsets[kTokens][kGroups] = {};
#if VISIKV_X86_INT8
  // u8 x i8 products summed in pairs (maddubs; no saturation: |code| <= 128, |x code| <= 127),
  // then in fours: int32 lanes 0-3 hold values 0-15, lanes 4-7 values 16-31.
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kTokens];
  for (__m256& a : acc) a = _mm256_setzero_ps();
#else
  float acc[kTokens] = {};
#endif
#if VISIKV_X86_INT8 && HWY_TARGET == HWY_AVX3_DL
  // With VNNI, units go in pairs through 512-bit dot products: int32 lane i holds the sum of
  // group i / 4 (16 values) of the pair, and its scale and activation scale are spread to match.
  constexpr bool kPairs = kUnitsPerBlock % 2 == 0;
  static_assert(!kPairs || !Format::kSigned, "signed codes take the 256-bit path");
  __m512 acc_pairs[kTokens];
  for (__m512& a : acc_pairs) a = _mm512_setzero_ps();
  const __m512i group_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i unit_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
#else
  constexpr bool kPairs = false;
#endif
  for (int64_t b = 0; b < units / kUnitsPerBlock; ++b) {
    const uint8_t* block = row + b * Format::kBytes;
    PrefetchAhead(block, Format::kBytes);
    const typename Format::Scales s = Format::Prepare(block);
#if VISIKV_X86_INT8 && HWY_TARGET == HWY_AVX3_DL
    if constexpr (kPairs) {
      ForEachUnit(
          std::make_integer_sequence<int, kUnitsPerBlock / 2>(), [&](auto pair) VISIKV_VNNI_ATTR {
            constexpr int first_unit = 2 * pair;
            const __m512i w = _mm512_inserti64x4(
                _mm512_castsi256_si512(Format::template Codes256<first_unit>(block)),
                Format::template Codes256<first_unit + 1>(block), 1);
            const __m512 scale = _mm512_permutexvar_ps(
                group_of_lane, _mm512_castps128_ps512(_mm_loadu_ps(&s.scale[2 * first_unit])));
            const int64_t u = b * kUnitsPerBlock + first_unit;
            for (int t = 0; t < kTokens; ++t) {
              const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                       _mm512_loadu_si512(codes[t] + u * kUnit));
              const __m512 activation_scale = _mm512_permutexvar_ps(
                  unit_of_lane,
                  _mm512_castps128_ps512(_mm_setr_ps(scales[t][u], scales[t][u + 1], 0, 0)));
              acc_pairs[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums),
                                             _mm512_mul_ps(scale, activation_scale), acc_pairs[t]);
            }
          });
    }
#endif
    if constexpr (!kPairs)
      ForEachUnit(std::make_integer_sequence<int, kUnitsPerBlock>(), [&](auto unit) HWY_ATTR {
        const int64_t u = b * kUnitsPerBlock + unit;
#if VISIKV_X86_INT8
        const __m256i w = Format::template Codes256<unit>(block);
        const __m256i w_unsigned = Format::kSigned ? _mm256_sign_epi8(w, w) : w;
        const __m256 scale =
            _mm256_setr_m128(_mm_set1_ps(s.scale[2 * unit]), _mm_set1_ps(s.scale[2 * unit + 1]));
        for (int t = 0; t < kTokens; ++t) {
          __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes[t] + u * kUnit));
          if constexpr (Format::kSigned) xq = _mm256_sign_epi8(xq, w);
#if HWY_TARGET == HWY_AVX3_DL
          const __m256i sums = DotBytes256(_mm256_setzero_si256(), w_unsigned, xq);
#else
        const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w_unsigned, xq), ones);
#endif
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums),
                                   _mm256_mul_ps(scale, _mm256_set1_ps(scales[t][u])), acc[t]);
        }
#else
      int8_t w[kUnit];
      Format::template Codes<unit>(block, w);
      for (int t = 0; t < kTokens; ++t) {
        const int8_t* xq = codes[t] + u * kUnit;
        int32_t group[2] = {0, 0};
        for (int j = 0; j < kUnit; ++j) group[j / 16] += int32_t{w[j]} * xq[j];
        acc[t] += scales[t][u] * (s.scale[2 * unit] * static_cast<float>(group[0]) +
                                  s.scale[2 * unit + 1] * static_cast<float>(group[1]));
      }
#endif
      });
    if constexpr (Format::kHasOffset)
      for (int t = 0; t < kTokens; ++t)
        for (int g = 0; g < kGroups; ++g) offsets[t][g] += s.offset[g] * sums16[t][b * kGroups + g];
  }
  for (int t = 0; t < kTokens; ++t) {
#if VISIKV_X86_INT8
    const __m128 halves =
        _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
    __m128 sum4 = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
    float total = _mm_cvtss_f32(sum4);
#if HWY_TARGET == HWY_AVX3_DL
    if constexpr (kPairs) total += _mm512_reduce_add_ps(acc_pairs[t]);
#endif
#else
    float total = acc[t];
#endif
    for (int g = 0; g < kGroups; ++g) total += offsets[t][g];
    y[t * y_stride] = total;
  }
}

// Lambdas of the int16 kernels that use VNNI's 512-bit dot products name the feature themselves:
// clang does not extend the target pragma above to them.
#if HWY_TARGET == HWY_AVX3_DL
#define VISIKV_INT16_ATTR VISIKV_VNNI_ATTR
#else
#define VISIKV_INT16_ATTR HWY_ATTR
#endif

#if VISIKV_X86_INT8 && HWY_TARGET <= HWY_AVX3
// The int16 products on AVX-512 for the blocks of 32 (activations in blocks of 32): blocks go in
// pairs (a, b), so that two 16-bit dot products, one of values 0-15 of both blocks and one of
// values 16-31, leave block a's sum in lanes 0-7 and block b's in lanes 8-15 (four products per
// lane), and one conversion and one multiply-add by [scale a x 8, scale b x 8] serve both: half
// the float work per value of one block at a time, which bounded prefill. With VNNI the second dot
// product accumulates onto the first (vpdpwssd); without, vpmaddwd and an add give the same sums.
// A row with an odd number of blocks ends with a half-empty pair.

// Weight codes of blocks a and b as 16-bit lanes: `low` holds values 0-15 of a then of b, `high`
// values 16-31.
template <typename Format>
HWY_INLINE void PairCodes(const uint8_t* block_a, const uint8_t* block_b, __m512i& low,
                          __m512i& high) {
  if constexpr (requires { Format::kNibbleBytes; }) {
    // Q4_0/Q4_1: value j < 16 is the low nibble of byte j, 16 + j its high nibble, so the two
    // blocks' 16 bytes widened to 16 bits give both halves with one mask and one shift.
    const __m256i bytes = _mm256_inserti128_si256(
        _mm256_castsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(block_a + Format::kNibbleBytes))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(block_b + Format::kNibbleBytes)), 1);
    const __m512i words = _mm512_cvtepu8_epi16(bytes);
    low = _mm512_and_si512(words, _mm512_set1_epi16(0x0F));
    high = _mm512_srli_epi16(words, 4);
  } else {
    const __m256i a = Format::template Codes256<0>(block_a);
    const __m256i b = Format::template Codes256<0>(block_b);
    low = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(a, b, 0x20));
    high = _mm512_cvtepi8_epi16(_mm256_permute2x128_si256(a, b, 0x31));
  }
}

// [a x 8, b x 8].
HWY_INLINE __m512 PairScales(float a, float b) {
  return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}

template <int kRows, int kTokens, typename Format>
void DotInt16Pairs(const uint8_t* row, int64_t row_bytes, int64_t units, const Int16Activations& x,
                   int64_t first, float* y, int64_t y_stride) {
  static_assert(Format::kValues == kUnit && Format::kUnitScale);
  const int64_t n = x.elements;
  const int16_t* codes[kTokens];
  const float* scales[kTokens];
  const float* sums16[kTokens];
  for (int t = 0; t < kTokens; ++t) {
    codes[t] = x.codes.data() + (first + t) * n;
    scales[t] = x.scales.data() + (first + t) * units;
    sums16[t] = x.sums16.data() + (first + t) * 2 * units;
  }
  __m512 acc[kRows][kTokens];
  for (auto& r : acc)
    for (__m512& a : r) a = _mm512_setzero_ps();
  // Units ua and ua + 1 with their weights, weight scales and offsets (per row: lanes 0-3 the
  // offsets of the pair's four groups of 16, the other lanes 0); `single`: ua is a row's last
  // unit, alone. The offsets meet the activations' sums of 16 in lanes 0-3 of the same
  // accumulators (one multiply-add, where a separate sum per group took more time than the
  // products of the codes).
  const auto pair = [&](int64_t ua, const __m512i* low, const __m512i* high, const __m512* w_scale,
                        const __m512* w_offset, bool single) VISIKV_INT16_ATTR {
    for (int t = 0; t < kTokens; ++t) {
      const int16_t* xa = codes[t] + ua * kUnit;
      const auto half = [](const int16_t* p) HWY_ATTR {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      };
      __m512i x_low, x_high;
      __m512 x_scale, x_sums;
      if (single) {
        x_low = _mm512_zextsi256_si512(half(xa));
        x_high = _mm512_zextsi256_si512(half(xa + 16));
        x_scale = PairScales(scales[t][ua], 0.0f);
        x_sums = _mm512_zextps128_ps512(
            _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sums16[t] + 2 * ua))));
      } else {
        x_low = _mm512_inserti64x4(_mm512_castsi256_si512(half(xa)), half(xa + kUnit), 1);
        x_high =
            _mm512_inserti64x4(_mm512_castsi256_si512(half(xa + 16)), half(xa + kUnit + 16), 1);
        x_scale = PairScales(scales[t][ua], scales[t][ua + 1]);
        x_sums = _mm512_zextps128_ps512(_mm_loadu_ps(sums16[t] + 2 * ua));
      }
      for (int r = 0; r < kRows; ++r) {
#if HWY_TARGET == HWY_AVX3_DL
        const __m512i sums = _mm512_dpwssd_epi32(
            _mm512_dpwssd_epi32(_mm512_setzero_si512(), low[r], x_low), high[r], x_high);
#else
        const __m512i sums =
            _mm512_add_epi32(_mm512_madd_epi16(low[r], x_low), _mm512_madd_epi16(high[r], x_high));
#endif
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(w_scale[r], x_scale),
                                    acc[r][t]);
        if constexpr (Format::kHasOffset)
          acc[r][t] = _mm512_fmadd_ps(w_offset[r], x_sums, acc[r][t]);
      }
    }
  };
  // The offsets of the two groups of 16 of blocks a and b.
  const auto offsets4 = [](const float* a, const float* b) HWY_ATTR {
    return _mm512_zextps128_ps512(_mm_setr_ps(a[0], a[1], b[0], b[1]));
  };
  for (int64_t b = 0; b < units; b += 2) {
    const bool single = b + 1 == units;
    __m512i low[kRows], high[kRows];
    __m512 w_scale[kRows], w_offset[kRows];
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* block_a = row + r * row_bytes + b * Format::kBytes;
      const uint8_t* block_b = single ? block_a : block_a + Format::kBytes;
      PrefetchAhead(block_a, (single ? 1 : 2) * Format::kBytes);
      PairCodes<Format>(block_a, block_b, low[r], high[r]);
      if constexpr (requires { Format::kNibbleBytes; }) {
        // Q4_0/Q4_1: both blocks' fp16 d (and m) converted at once, [d_a, m_a, d_b, m_b]
        // (the same floats as Prepare's, every fp16 value being exact in float32), then
        // spread: scales [d_a x 8, d_b x 8], offsets [m_a, m_a, m_b, m_b] or -8 d for Q4_0.
        uint32_t head_a, head_b;
        std::memcpy(&head_a, block_a, sizeof(head_a));
        std::memcpy(&head_b, block_b, sizeof(head_b));
        const __m512 dm = _mm512_castps128_ps512(
            _mm_cvtph_ps(_mm_setr_epi32(static_cast<int>(head_a), static_cast<int>(head_b), 0, 0)));
        const __mmask16 pair_lanes = single ? 0x00FF : 0xFFFF, offset_lanes = single ? 0x3 : 0xF;
        w_scale[r] = _mm512_maskz_permutexvar_ps(
            pair_lanes, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), dm);
        if constexpr (Format::kNibbleBytes == 4)
          w_offset[r] = _mm512_maskz_permutexvar_ps(
              offset_lanes, _mm512_setr_epi32(1, 1, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), dm);
        else
          w_offset[r] = _mm512_mul_ps(
              _mm512_set1_ps(-8.0f),
              _mm512_maskz_permutexvar_ps(
                  offset_lanes, _mm512_setr_epi32(0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
                  dm));
      } else {
        const typename Format::Scales sa = Format::Prepare(block_a), sb = Format::Prepare(block_b);
        w_scale[r] = PairScales(sa.scale[0], single ? 0.0f : sb.scale[0]);
        const float none[2] = {0.0f, 0.0f};
        w_offset[r] = offsets4(sa.offset, single ? none : sb.offset);
      }
    }
    pair(b, low, high, w_scale, w_offset, single);
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) y[t * y_stride + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#else
template <typename Format>
constexpr bool kInt16Pairs = false;
#endif

// The int16 kernel body for blocks of 32: kRows rows (row_bytes apart) times kTokens tokens (on
// AVX-512 DotInt16Pairs). Weight codes (all within int8) are sign-extended to 16 bits and
// multiplied with the 16-bit activation codes in pairs summed to int32 (|sum| <= 32 * 128 * 32767 <
// 2^31, so exact, and the same sums on every target): AVX2 takes the two halves of 16 with
// vpmaddwd. The block's int32 sum is converted once and multiplied by weight scale times
// activation scale. acc[r][t]
// holds row r's sums for token t in the same order whatever kRows and kTokens are, so every output
// is the one-row, one-token result; several rows share each activation load and give the core
// independent chains (decode reads each weight once per token, as DotTokens).
template <int kRows, int kTokens, typename Format>
void DotInt16Tokens(const uint8_t* row, int64_t row_bytes, int64_t units, const Int16Activations& x,
                    int64_t first, float* y, int64_t y_stride) {
#if VISIKV_X86_INT8 && HWY_TARGET <= HWY_AVX3
  return DotInt16Pairs<kRows, kTokens, Format>(row, row_bytes, units, x, first, y, y_stride);
#else
  static_assert(Format::kValues == kUnit && Format::kUnitScale);
  constexpr int kUnitsPerBlock = Format::kValues / kUnit, kGroups = Format::kValues / 16;
  const int64_t n = x.elements;
  const int16_t* codes[kTokens];
  const float* scales[kTokens];
  const float* sums16[kTokens];
  for (int t = 0; t < kTokens; ++t) {
    codes[t] = x.codes.data() + (first + t) * n;
    scales[t] = x.scales.data() + (first + t) * units;
    sums16[t] = x.sums16.data() + (first + t) * 2 * units;
  }
  float offsets[kRows][kTokens][kGroups] = {};
#if VISIKV_X86_INT8
  __m256 acc[kRows][kTokens];
  for (auto& r : acc)
    for (__m256& a : r) a = _mm256_setzero_ps();
#else
  float acc[kRows][kTokens] = {};
#endif
  for (int64_t b = 0; b < units / kUnitsPerBlock; ++b) {
    const uint8_t* blocks[kRows];
    typename Format::Scales s[kRows];
    for (int r = 0; r < kRows; ++r) {
      blocks[r] = row + r * row_bytes + b * Format::kBytes;
      PrefetchAhead(blocks[r], Format::kBytes);
      s[r] = Format::Prepare(blocks[r]);
    }
    ForEachUnit(
        std::make_integer_sequence<int, kUnitsPerBlock>(), [&](auto unit) VISIKV_INT16_ATTR {
          const int64_t u = b * kUnitsPerBlock + unit;
#if VISIKV_X86_INT8
          __m256i w_low[kRows], w_high[kRows];
          for (int r = 0; r < kRows; ++r) {
            const __m256i w8 = Format::template Codes256<unit>(blocks[r]);
            w_low[r] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w8));
            w_high[r] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w8, 1));
          }
          for (int t = 0; t < kTokens; ++t) {
            const auto* xq = reinterpret_cast<const __m256i*>(codes[t] + u * kUnit);
            const __m256i x_low = _mm256_loadu_si256(xq), x_high = _mm256_loadu_si256(xq + 1);
            const float activation_scale = scales[t][u];
            for (int r = 0; r < kRows; ++r) {
              const __m256i low = _mm256_madd_epi16(w_low[r], x_low);
              const __m256i high = _mm256_madd_epi16(w_high[r], x_high);
              // One scale for the block: its two halves summed as integers (exact), then one
              // conversion and one multiply-add.
              acc[r][t] =
                  _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(low, high)),
                                  _mm256_set1_ps(s[r].scale[0] * activation_scale), acc[r][t]);
            }
          }
#else
      for (int r = 0; r < kRows; ++r) {
        int8_t w[kUnit];
        Format::template Codes<unit>(blocks[r], w);
        for (int t = 0; t < kTokens; ++t) {
          const int16_t* xq = codes[t] + u * kUnit;
          int32_t group[2] = {0, 0};
          for (int j = 0; j < kUnit; ++j) group[j / 16] += int32_t{w[j]} * xq[j];
          const float unit_sum = std::fma(s[r].scale[2 * unit], static_cast<float>(group[0]),
                                          s[r].scale[2 * unit + 1] * static_cast<float>(group[1]));
          acc[r][t] = std::fma(scales[t][u], unit_sum, acc[r][t]);
        }
      }
#endif
        });
    // Explicit fused multiply-adds: a plain `+= a * b` is contracted or not at the compiler's
    // choice, which differed between token counts (AVX2, K types) and broke chunk equality.
    if constexpr (Format::kHasOffset)
      for (int r = 0; r < kRows; ++r)
        for (int t = 0; t < kTokens; ++t)
          for (int g = 0; g < kGroups; ++g)
            offsets[r][t][g] =
                std::fma(s[r].offset[g], sums16[t][b * kGroups + g], offsets[r][t][g]);
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) {
#if VISIKV_X86_INT8
      const __m128 halves =
          _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
      __m128 sum4 = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
      sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
      float total = _mm_cvtss_f32(sum4);
#else
      float total = acc[r][t];
#endif
      for (int g = 0; g < kGroups; ++g) total += offsets[r][t][g];
      y[t * y_stride + r] = total;
    }
#endif
}

// --- int16 products of the super-block types ---------------------------------------------------
// Activations in blocks of 256 (one scale each, x.block == 256). Per row and token, every
// super-block's weight codes times scales (Codes16) meet the activation codes in 16-bit products
// summed in pairs into int32 lanes. The int32 lanes are exact: a lane takes 32 / kLanes products
// per unit, each at most kMaxWeight16 * 32767 in magnitude, and kFlushUnits is the most units
// whose sum stays below 2^31 (a whole super-block on AVX-512; Q6_K flushes every four units on
// AVX2 and every two on 128-bit targets). What happens to them at a flush is one of two
// definitions, each kept by every path that runs it, so that decode and prefill agree bit for bit:
// - lanes (kExactTotals false; every CPU without the tile products): the lanes are converted and
//   added to float32 lanes with one multiply-add by d times the activation scale, each group's
//   offset meets the group's float sum of rounded activations in the same lanes, and the output
//   is their sum in a fixed order. Cheapest for vectors, but the result depends on which lane
//   summed which products, which tiles cannot reproduce.
// - exact totals (kExactTotals true; where the tile products run, amx_products.h, decode and the
//   vector blocked product included): the lanes are added in 64 bits into the super-block's exact
//   integer T_b; the products term P = sum_b T_b * (d_b * s_b) in double, one fused multiply-add
//   per super-block in block order (d_b * s_b, fp16 times float, is exact in double); the offsets
//   term in float lanes as above (lane g: group g of every super-block, in block order); the
//   output float(P + their sum), the lanes added by halves (HalvingSum).
//   Any engine may sum T_b in any order, so the tiles give the vectors' bits.

#if VISIKV_SUPER_VECTORS
// a * b summed in pairs of 16-bit lanes onto the 32-bit lanes of `sum`: VNNI's vpdpwssd where
// there is one, vpmaddwd and an add otherwise (the same exact sums); targets without a pairwise
// product keep the odd products apart in `odd` (added back by PairSums).
HWY_INLINE VISIKV_INT16_ATTR VI MulPairs(VI16 a, VI16 b, VI sum, VI& odd) {
#if HWY_TARGET == HWY_AVX3_DL
  (void)odd;
  return VI{_mm512_dpwssd_epi32(sum.raw, a.raw, b.raw)};
#else
  return hn::ReorderWidenMulAccumulate(DI(), a, b, sum, odd);
#endif
}
HWY_INLINE VI PairSums(VI sum, VI odd) { return hn::RearrangeToOddPlusEven(sum, odd); }

// The sum of int32 lanes in 64 bits (exact; the lanes' sum may not fit 32 bits).
HWY_INLINE int64_t ExactLaneSum(VI v) {
  const hn::Half<DI> dh;
  const hn::Rebind<int64_t, decltype(dh)> d64;
  const auto both =
      hn::Add(hn::PromoteTo(d64, hn::LowerHalf(dh, v)), hn::PromoteTo(d64, hn::UpperHalf(dh, v)));
  return hn::GetLane(hn::SumOfLanes(d64, both));
}

template <typename Format>
constexpr int kFlushUnits = [] {
  int units = Format::kValues / kUnit;
  while (int64_t{units} * (kUnit / kLanes) * Format::kMaxWeight16 * 32767 > INT32_MAX) units /= 2;
  return units;
}();

// One output's float lanes, added in a fixed order.
HWY_INLINE float SumLanes(VF v) { return hn::GetLane(hn::SumOfLanes(DF(), v)); }

// The lanes added by halves: lane i of the lower half plus lane i of the upper, down to one lane.
// The exact-totals definition names this order (SumOfLanes leaves it to the compiler), and the
// packed rows' kernels (amx_products.h) repeat it across sixteen rows at once.
template <class D>
HWY_INLINE float HalvingSum(D d, hn::VFromD<D> v) {
  if constexpr (hn::MaxLanes(D()) == 1) {
    (void)d;
    return hn::GetLane(v);
  } else {
    const hn::Half<D> dh;
    return HalvingSum(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  }
}

// The offsets term of super-block `b` for one row (scales `s`) and one token: each group's offset
// times the group's float sum of rounded activations, onto `offsets`' lanes.
template <typename Format>
HWY_INLINE void AddOffsets(const SuperScales& s, const Int16Activations& x, int64_t token,
                           int64_t b, VF& offsets) {
  const float* group_sums = x.sums16.data() + token * (x.elements / 16) + b * 16;
  for (int g = 0; g < 16; g += kLanes)
    offsets = hn::MulAdd(hn::Load(DF(), s.offsets + g), hn::LoadU(DF(), group_sums + g), offsets);
}

// A row's super-block `b` (its scales prepared in `s`, its units' weights given by `weights(unit,
// w)`) times kTokens tokens from `first`, continuing the products and offsets terms (DotInt16Super
// and the blocked product share it, so that both give the same bits).
template <bool kExactTotals, int kRows, int kTokens, typename Format, typename Weights>
HWY_INLINE void SuperBlockStep(const SuperScales* s, const Weights& weights,
                               const Int16Activations& x, int64_t first, int64_t b,
                               double (&products)[kRows][kTokens], VF (&lanes)[kRows][kTokens]) {
  constexpr int kUnitsPerBlock = Format::kValues / kUnit;
  const int64_t n = x.elements, blocks = n / Format::kValues;
  VI sums[kRows][kTokens], odd[kRows][kTokens];
  int64_t totals[kRows][kTokens] = {};
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) sums[r][t] = odd[r][t] = hn::Zero(DI());
  ForEachUnit(std::make_integer_sequence<int, kUnitsPerBlock>(), [&](auto unit) VISIKV_INT16_ATTR {
    VI16 w[kRows][kVectors16];
    weights(unit, w);
    for (int t = 0; t < kTokens; ++t) {
      const int16_t* xq = x.codes.data() + (first + t) * n + b * Format::kValues + unit * kUnit;
      for (int k = 0; k < kVectors16; ++k) {
        const VI16 xv = hn::LoadU(DI16(), xq + k * kLanes16);
        for (int r = 0; r < kRows; ++r) sums[r][t] = MulPairs(w[r][k], xv, sums[r][t], odd[r][t]);
      }
    }
    if constexpr ((unit + 1) % kFlushUnits<Format> == 0)
      for (int t = 0; t < kTokens; ++t) {
        const float activation_scale = x.scales[(first + t) * blocks + b];
        for (int r = 0; r < kRows; ++r) {
          if constexpr (kExactTotals)
            totals[r][t] += ExactLaneSum(PairSums(sums[r][t], odd[r][t]));
          else
            lanes[r][t] = hn::MulAdd(hn::ConvertTo(DF(), PairSums(sums[r][t], odd[r][t])),
                                     hn::Set(DF(), s[r].d * activation_scale), lanes[r][t]);
          sums[r][t] = odd[r][t] = hn::Zero(DI());
        }
      }
  });
  for (int t = 0; t < kTokens; ++t) {
    const double activation_scale = x.scales[(first + t) * blocks + b];
    for (int r = 0; r < kRows; ++r) {
      if constexpr (kExactTotals)
        products[r][t] = std::fma(static_cast<double>(totals[r][t]),
                                  static_cast<double>(s[r].d) * activation_scale, products[r][t]);
      if constexpr (Format::kSuperOffsets) AddOffsets<Format>(s[r], x, first + t, b, lanes[r][t]);
    }
  }
}

// The output of a products term and float lanes.
template <bool kExactTotals, typename Format>
HWY_INLINE float SuperOutput(double products, VF lanes) {
  if constexpr (!kExactTotals) return SumLanes(lanes);
  if constexpr (Format::kSuperOffsets)
    return static_cast<float>(products + static_cast<double>(HalvingSum(DF(), lanes)));
  return static_cast<float>(products);
}

// kRows rows (row_bytes apart) times kTokens tokens, unpacking each unit in registers (decode and
// short chunks).
template <int kRows, int kTokens, typename Format, bool kExactTotals>
void DotInt16Super(const uint8_t* row, int64_t row_bytes, const Int16Activations& x, int64_t first,
                   float* y, int64_t y_stride) {
  double products[kRows][kTokens] = {};
  VF lanes[kRows][kTokens];
  for (auto& r : lanes)
    for (VF& o : r) o = hn::Zero(DF());
  for (int64_t b = 0; b < x.elements / Format::kValues; ++b) {
    const uint8_t* blocks[kRows];
    SuperScales s[kRows];
    for (int r = 0; r < kRows; ++r) {
      blocks[r] = row + r * row_bytes + b * Format::kBytes;
      PrefetchAhead(blocks[r], Format::kBytes);
      s[r] = Format::PrepareSuper(blocks[r]);
    }
    SuperBlockStep<kExactTotals, kRows, kTokens, Format>(
        s,
        [&](auto unit, VI16(&w)[kRows][kVectors16]) VISIKV_INT16_ATTR {
          for (int r = 0; r < kRows; ++r) Format::template Codes16<unit>(blocks[r], s[r], w[r]);
        },
        x, first, b, products, lanes);
  }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t)
      y[t * y_stride + r] = SuperOutput<kExactTotals, Format>(products[r][t], lanes[r][t]);
}
#else
// One lane: the same products and sums, the integer sums in 64 bits (a lane takes all 32 products
// of a unit), converted once per super-block.
template <int kRows, int kTokens, typename Format, bool kExactTotals>
void DotInt16Super(const uint8_t* row, int64_t row_bytes, const Int16Activations& x, int64_t first,
                   float* y, int64_t y_stride) {
  const int64_t n = x.elements, blocks = n / Format::kValues;
  float acc[kRows][kTokens] = {};
  for (int64_t b = 0; b < blocks; ++b)
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* block = row + r * row_bytes + b * Format::kBytes;
      const SuperScales s = Format::PrepareSuper(block);
      int64_t sums[kTokens] = {};
      ForEachUnit(std::make_integer_sequence<int, Format::kValues / kUnit>(), [&](auto unit) {
        int8_t codes[kUnit];
        Format::template Codes<unit>(block, codes);
        for (int j = 0; j < kUnit; ++j) {
          const int32_t w =
              s.group_scale[(unit * kUnit + j) / 16] * (codes[j] - Format::kCodeOffset);
          for (int t = 0; t < kTokens; ++t)
            sums[t] +=
                int64_t{w} * x.codes[(first + t) * n + b * Format::kValues + unit * kUnit + j];
        }
      });
      for (int t = 0; t < kTokens; ++t) {
        acc[r][t] = std::fma(static_cast<float>(sums[t]), s.d * x.scales[(first + t) * blocks + b],
                             acc[r][t]);
        if constexpr (Format::kSuperOffsets)
          for (int g = 0; g < 16; ++g)
            acc[r][t] =
                std::fma(s.offsets[g], x.sums16[(first + t) * (n / 16) + b * 16 + g], acc[r][t]);
      }
    }
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < kTokens; ++t) y[t * y_stride + r] = acc[r][t];
}
#endif

// Rows of the super-block types: kSuperRows at a time (2 x 4 tokens' int32 and float lanes are 16
// of AVX-512's 32 registers; AVX2 holds one row's), tokens four at a time.
constexpr int kSuperRows = kLanes == 16 ? 2 : 1;

#if VISIKV_SUPER_VECTORS
// Many tokens: a cache-blocked product, as BlockedRows for the float products. A step of
// kStepValues values of every row is unpacked once (weight codes times group scales, 16 bits) into
// a panel with the rows' SuperScales; each group of four tokens then meets the panel kSuperRows
// rows at a time through SuperBlockStep, the products and offsets terms waiting in memory between
// steps, so every output has the bits of DotInt16Super's. Where the CPU has tile products,
// TileInt16Super (below) takes their place.
// Tokens per pass over a row pair: eight on AVX-512, so that each 16-bit weight vector loaded from
// the panel (in L2) serves eight products and the panel's L2 traffic is half of four tokens' (four
// tokens measured about 1.06x the float product, L2-bound).
constexpr int kSuperGroupTokens = kLanes == 16 ? 8 : kGroupTokens;

// Unpacks blocks [b0, b1) of `rows` rows into a panel of 16-bit weights (row r's value k of the
// step at panel[r * kStepValues + k]) and their scales (block b, row r at scales[(b - b0) * rows
// + r]).
template <typename Format>
HWY_INLINE void UnpackSuperPanel(const uint8_t* first_row, int64_t row_bytes, int64_t rows,
                                 int64_t b0, int64_t b1, int16_t* panel, SuperScales* scales) {
  constexpr int kUnitsPerBlock = Format::kValues / kUnit;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* block = first_row + r * row_bytes + b * Format::kBytes;
      const SuperScales s = Format::PrepareSuper(block);
      scales[(b - b0) * rows + r] = s;
      int16_t* out = panel + r * kStepValues + (b - b0) * Format::kValues;
      ForEachUnit(std::make_integer_sequence<int, kUnitsPerBlock>(), [&](auto unit) HWY_ATTR {
        VI16 w[kVectors16];
        Format::template Codes16<unit>(block, s, w);
        for (int k = 0; k < kVectors16; ++k)
          hn::Store(w[k], DI16(), out + unit * kUnit + k * kLanes16);
      });
    }
}

template <typename Format, bool kExactTotals>
void BlockedInt16Super(const uint8_t* first_row, int64_t row_bytes, int64_t rows,
                       const Int16Activations& x, int64_t first, int64_t tokens, float* y,
                       int64_t y_stride) {
  constexpr int64_t kStepBlocks = kStepValues / Format::kValues;
  const int64_t blocks = x.elements / Format::kValues;
  thread_local AlignedBuffer<double> products_buffer;
  thread_local AlignedBuffer<float> lanes_buffer;
  thread_local AlignedBuffer<int16_t> panel_buffer;
  thread_local AlignedBuffer<SuperScales> scales_buffer;
  // Token t and row r's float lanes at lanes + (t * rows + r) * kLanes, and with exact totals its
  // products term at products[t * rows + r].
  double* products = kExactTotals ? products_buffer.Reserve(tokens * rows) : nullptr;
  float* lanes = lanes_buffer.Reserve(tokens * rows * kLanes);
  int16_t* panel = panel_buffer.Reserve(rows * kStepValues);
  SuperScales* panel_scales = scales_buffer.Reserve(kStepBlocks * rows);
  if constexpr (kExactTotals) std::fill(products, products + tokens * rows, 0.0);
  for (int64_t i = 0; i < tokens * rows; ++i) hn::Store(hn::Zero(DF()), DF(), lanes + i * kLanes);
  PrefetchOutputs(y, y_stride, rows, tokens);
  for (int64_t b0 = 0; b0 < blocks; b0 += kStepBlocks) {
    const int64_t b1 = std::min(blocks, b0 + kStepBlocks);
    UnpackSuperPanel<Format>(first_row, row_bytes, rows, b0, b1, panel, panel_scales);
    // kRows rows from r times kTokens tokens from t0 over the step.
    const auto tile = [&](auto row_count, auto token_count, int64_t r, int64_t t0) HWY_ATTR {
      constexpr int kRows = decltype(row_count)::value, kTokens = decltype(token_count)::value;
      double p[kRows][kTokens] = {};
      VF o[kRows][kTokens];
      for (int i = 0; i < kRows; ++i)
        for (int t = 0; t < kTokens; ++t) {
          if constexpr (kExactTotals) p[i][t] = products[(t0 + t) * rows + r + i];
          o[i][t] = hn::Load(DF(), lanes + ((t0 + t) * rows + r + i) * kLanes);
        }
      for (int64_t b = b0; b < b1; ++b) {
        const int16_t* weights = panel + r * kStepValues + (b - b0) * Format::kValues;
        SuperBlockStep<kExactTotals, kRows, kTokens, Format>(
            panel_scales + (b - b0) * rows + r,
            [&](auto unit, VI16(&w)[kRows][kVectors16]) VISIKV_INT16_ATTR {
              for (int i = 0; i < kRows; ++i)
                for (int k = 0; k < kVectors16; ++k)
                  w[i][k] =
                      hn::Load(DI16(), weights + i * kStepValues + unit * kUnit + k * kLanes16);
            },
            x, first + t0, b, p, o);
      }
      for (int i = 0; i < kRows; ++i)
        for (int t = 0; t < kTokens; ++t) {
          if constexpr (kExactTotals) products[(t0 + t) * rows + r + i] = p[i][t];
          hn::Store(o[i][t], DF(), lanes + ((t0 + t) * rows + r + i) * kLanes);
        }
    };
    const auto rows_of = [&](auto token_count, int64_t t0) HWY_ATTR {
      int64_t r = 0;
      for (; r + kSuperRows <= rows; r += kSuperRows)
        tile(std::integral_constant<int, kSuperRows>{}, token_count, r, t0);
      for (; r < rows; ++r) tile(std::integral_constant<int, 1>{}, token_count, r, t0);
    };
    int64_t t0 = 0;
    for (; t0 + kSuperGroupTokens <= tokens; t0 += kSuperGroupTokens)
      rows_of(std::integral_constant<int, kSuperGroupTokens>{}, t0);
    InTokenGroups(tokens - t0,
                  [&](auto token_count, int64_t t) HWY_ATTR { rows_of(token_count, t0 + t); });
  }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r)
      y[t * y_stride + r] =
          SuperOutput<kExactTotals, Format>(kExactTotals ? products[t * rows + r] : 0.0,
                                            hn::Load(DF(), lanes + (t * rows + r) * kLanes));
}
#endif

#if VISIKV_TILE_PRODUCTS
// BlockedInt16Super with the tile products (exact totals): each step's panel gives its products
// terms on the tiles (amx_products.h), then one pass over every block adds the offsets terms, 4
// tokens x 4 rows at a time in registers (lane by lane in block order, as AddOffsets does in
// decode), and writes the outputs.
template <typename Format>
void TileInt16Super(const uint8_t* first_row, int64_t row_bytes, int64_t rows,
                    const Int16Activations& x, int64_t first, int64_t tokens, float* y,
                    int64_t y_stride) {
  constexpr int64_t kStepBlocks = kStepValues / Format::kValues;
  const int64_t blocks = x.elements / Format::kValues;
  const int64_t tile_rows = amx::padded_rows(rows);
  thread_local AlignedBuffer<float> tile_d_buffer;
  thread_local AlignedBuffer<double> products_buffer;
  thread_local AlignedBuffer<int16_t> panel_buffer;
  thread_local AlignedBuffer<SuperScales> scales_buffer;
  float* tile_d = tile_d_buffer.Reserve(kStepBlocks * tile_rows);
  double* products = products_buffer.Reserve(tokens * rows);  // token t, row r at t * rows + r
  int16_t* panel = panel_buffer.Reserve(rows * kStepValues);
  SuperScales* scales = scales_buffer.Reserve(blocks * rows);  // block b, row r at b * rows + r
  std::fill(products, products + tokens * rows, 0.0);
  PrefetchOutputs(y, y_stride, rows, tokens);
  for (int64_t b0 = 0; b0 < blocks; b0 += kStepBlocks) {
    const int64_t b1 = std::min(blocks, b0 + kStepBlocks);
    UnpackSuperPanel<Format>(first_row, row_bytes, rows, b0, b1, panel, scales + b0 * rows);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t r = 0; r < tile_rows; ++r)
        tile_d[(b - b0) * tile_rows + r] = r < rows ? scales[b * rows + r].d : 0.0f;
    const int64_t offset = first * x.elements + b0 * Format::kValues;
    amx::super_block_products({panel, kStepValues, tile_d, rows, b1 - b0,
                               x.tile_high.data() + offset, x.tile_low.data() + offset, x.elements,
                               x.scales.data() + first * blocks + b0, blocks, tokens, products});
  }
  const auto finish = [&](auto row_count, auto token_count, int64_t r, int64_t t) HWY_ATTR {
    constexpr int kRows = decltype(row_count)::value, kTokens = decltype(token_count)::value;
    VF o[kRows][kTokens];
    for (auto& row_lanes : o)
      for (VF& v : row_lanes) v = hn::Zero(DF());
    if constexpr (Format::kSuperOffsets)
      for (int64_t b = 0; b < blocks; ++b)
        for (int i = 0; i < kRows; ++i)
          for (int j = 0; j < kTokens; ++j)
            AddOffsets<Format>(scales[b * rows + r + i], x, first + t + j, b, o[i][j]);
    for (int i = 0; i < kRows; ++i)
      for (int j = 0; j < kTokens; ++j)
        y[(t + j) * y_stride + r + i] =
            SuperOutput<true, Format>(products[(t + j) * rows + r + i], o[i][j]);
  };
  for (int64_t t = 0; t < tokens; t += 4)
    for (int64_t r = 0; r < rows; r += 4) {
      if (t + 4 <= tokens && r + 4 <= rows) {
        finish(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{}, r, t);
        continue;
      }
      for (int64_t j = t; j < std::min(tokens, t + 4); ++j)
        for (int64_t i = r; i < std::min(rows, r + 4); ++i)
          finish(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{}, i, j);
    }
}
#endif

template <typename Format>
void DotInt16SuperRows(const uint8_t* first_row, int64_t row_bytes, int64_t rows,
                       const Int16Activations& x, int64_t first, int64_t tokens, float* y,
                       int64_t y_stride) {
  // Exact totals where the tile products run (see above), lanes everywhere else.
  const auto rows_with = [&](auto exact_totals) HWY_ATTR {
    constexpr bool kExactTotals = decltype(exact_totals)::value;
#if VISIKV_TILE_PRODUCTS
    if (kExactTotals && tokens > kGroupTokens && rows > 1 && x.has_tile_bytes())
      return TileInt16Super<Format>(first_row, row_bytes, rows, x, first, tokens, y, y_stride);
#endif
#if VISIKV_SUPER_VECTORS
    if (tokens > kGroupTokens && rows > 1)
      return BlockedInt16Super<Format, kExactTotals>(first_row, row_bytes, rows, x, first, tokens,
                                                     y, y_stride);
#endif
    const auto range = [&](auto row_count, int64_t r) HWY_ATTR {
      InTokenGroups(tokens, [&](auto count, int64_t t) HWY_ATTR {
        DotInt16Super<decltype(row_count)::value, decltype(count)::value, Format, kExactTotals>(
            first_row + r * row_bytes, row_bytes, x, first + t, y + t * y_stride + r, y_stride);
      });
    };
    int64_t r = 0;
    for (; r + kSuperRows <= rows; r += kSuperRows)
      range(std::integral_constant<int, kSuperRows>{}, r);
    for (; r < rows; ++r) range(std::integral_constant<int, 1>{}, r);
  };
#if VISIKV_TILE_PRODUCTS
  if (amx::enabled()) return rows_with(std::true_type{});
#endif
  rows_with(std::false_type{});
}

// kRows rows times any number of tokens, four at a time, then the rest.
template <int kRows, typename Format>
void DotInt16AnyTokens(const uint8_t* row, int64_t row_bytes, int64_t units,
                       const Int16Activations& x, int64_t first, int64_t tokens, float* y,
                       int64_t y_stride) {
  InTokenGroups(tokens, [&](auto count, int64_t t) HWY_ATTR {
    DotInt16Tokens<kRows, decltype(count)::value, Format>(row, row_bytes, units, x, first + t,
                                                          y + t * y_stride, y_stride);
  });
}

// Blocks of 32: rows go kInt16Rows at a time: their 4 x 4 tokens' sums fill 16 of AVX-512's 32
// registers; AVX2's 16 registers hold two rows' (8 sums, 4 weight halves, 2 inputs).
constexpr int kInt16Rows = HWY_TARGET <= HWY_AVX3 ? 4 : 2;

template <typename Format>
void DotInt16Rows(const uint8_t* first_row, int64_t row_bytes, int64_t rows, int64_t n,
                  const Int16Activations& x, int64_t first, int64_t tokens, float* y,
                  int64_t y_stride) {
  if constexpr (Format::kValues > kUnit) {
    DotInt16SuperRows<Format>(first_row, row_bytes, rows, x, first, tokens, y, y_stride);
  } else {
    int64_t r = 0;
    for (; r + kInt16Rows <= rows; r += kInt16Rows)
      DotInt16AnyTokens<kInt16Rows, Format>(first_row + r * row_bytes, row_bytes, n / kUnit, x,
                                            first, tokens, y + r, y_stride);
    for (; r < rows; ++r)
      DotInt16AnyTokens<1, Format>(first_row + r * row_bytes, row_bytes, n / kUnit, x, first,
                                   tokens, y + r, y_stride);
  }
}

// Tokens four at a time, then the rest (int8 activations, one row).
template <typename Format>
void DotInt8AnyTokens(const uint8_t* row, int64_t units, const Int8Activations& x, int64_t first,
                      int64_t tokens, float* y, int64_t y_stride) {
  InTokenGroups(tokens, [&](auto count, int64_t t) HWY_ATTR {
    DotInt8Tokens<decltype(count)::value, Format>(row, units, x, first + t, y + t * y_stride,
                                                  y_stride);
  });
}

template <typename Format, typename Activations>
void DotCodesRows(const uint8_t* first_row, int64_t row_bytes, int64_t rows, int64_t n,
                  const Activations& x, int64_t first, int64_t tokens, float* y, int64_t y_stride) {
  if constexpr (std::is_same_v<Activations, Int16Activations>) {
    DotInt16Rows<Format>(first_row, row_bytes, rows, n, x, first, tokens, y, y_stride);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      DotInt8AnyTokens<Format>(first_row + r * row_bytes, n / kUnit, x, first, tokens, y + r,
                               y_stride);
  }
}

// The integer products of every block type, for either width of activation codes.
template <typename Activations>
void DotRowsTokensCodes(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                        int64_t n, const Activations& x, int64_t first, int64_t tokens, float* y,
                        int64_t y_stride) {
  const auto* row = reinterpret_cast<const uint8_t*>(first_row);
  switch (type) {
    case DType::Q8_0:
      return DotCodesRows<Q8_0Codes>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    case DType::Q4_0:
      return DotCodesRows<Q4Codes<false>>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    case DType::Q4_1:
      return DotCodesRows<Q4Codes<true>>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    case DType::Q5_0:
      return DotCodesRows<Q5Codes<false>>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    case DType::Q5_1:
      return DotCodesRows<Q5Codes<true>>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    case DType::Q4_K:
      return DotCodesRows<QK45Codes<false>>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    case DType::Q5_K:
      return DotCodesRows<QK45Codes<true>>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    case DType::Q6_K:
      return DotCodesRows<Q6_KCodes>(row, row_bytes, rows, n, x, first, tokens, y, y_stride);
    default:
      return;  // float types: the caller uses DotRowsTokens
  }
}

void DotRowsTokensInt8(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                       int64_t n, const Int8Activations& x, int64_t first, int64_t tokens, float* y,
                       int64_t y_stride) {
  DotRowsTokensCodes(type, first_row, row_bytes, rows, n, x, first, tokens, y, y_stride);
}

void DotRowsTokensInt16(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                        int64_t n, const Int16Activations& x, int64_t first, int64_t tokens,
                        float* y, int64_t y_stride) {
  DotRowsTokensCodes(type, first_row, row_bytes, rows, n, x, first, tokens, y, y_stride);
}

#undef VISIKV_X86_INT8
#undef VISIKV_SUPER_VECTORS
#undef VISIKV_INT16_ATTR

// --- activations rounded to integer codes --------------------------------------------------------
// `blocks` blocks of `block` values from x: each block's scale max|x| / kMax (NaN for a block with
// a value that is not finite), and its codes round(x * (1 / scale)) to nearest even, clamped to
// [-kMax, kMax], 0 where not finite (weight_kernels.h). A non-finite input poisons its block's
// scale and sums (and so every output) instead of being converted to an integer, which C++ leaves
// undefined. The arithmetic of the scalar definition, value by value, so every target gives the
// same codes.
template <typename Code>
HWY_INLINE void QuantizeCodes(const float* x, int64_t blocks, int64_t block, Code* codes,
                              float* scales) {
  constexpr float kMax = std::numeric_limits<Code>::max();
  const DF df;
  const hn::Rebind<Code, DF> dc;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  for (int64_t b = 0; b < blocks; ++b) {
    const float* v = x + b * block;
    VF amax = hn::Zero(df), not_finite = hn::Zero(df);
    for (int64_t j = 0; j < block; j += lanes) {
      const VF value = hn::LoadU(df, v + j);
      amax = hn::Max(amax, hn::Abs(value));
      not_finite = hn::Or(not_finite, hn::VecFromMask(df, hn::Not(hn::IsFinite(value))));
    }
    const bool finite = hn::AllFalse(df, hn::MaskFromVec(not_finite));
    const float scale = finite ? hn::GetLane(hn::MaxOfLanes(df, amax)) / kMax
                               : std::numeric_limits<float>::quiet_NaN();
    const VF inverse = hn::Set(df, scale > 0 ? 1.0f / scale : 0.0f);
    for (int64_t j = 0; j < block; j += lanes) {
      const VF code = hn::Round(hn::Mul(hn::LoadU(df, v + j), inverse));
      const VF clamped = hn::IfThenElseZero(
          hn::IsFinite(code), hn::Min(hn::Max(code, hn::Set(df, -kMax)), hn::Set(df, kMax)));
      hn::StoreU(hn::DemoteTo(dc, hn::ConvertTo(DI(), clamped)), dc, codes + b * block + j);
    }
    scales[b] = scale;
  }
}

void QuantizeCodes8(const float* x, int64_t blocks, int64_t block, int8_t* codes, float* scales) {
  QuantizeCodes(x, blocks, block, codes, scales);
}
void QuantizeCodes16(const float* x, int64_t blocks, int64_t block, int16_t* codes, float* scales) {
  QuantizeCodes(x, blocks, block, codes, scales);
}

int64_t CompiledTarget() { return HWY_TARGET; }

}  // namespace HWY_NAMESPACE
}  // namespace visikv
#if HWY_TARGET == HWY_AVX3_DL && defined(__clang__)
#pragma clang attribute pop
#endif
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>

#include "visikv/core/error.h"

namespace visikv {

namespace {
constexpr int64_t kBlock = 32;        // activation values per scale
constexpr int64_t kSuperBlock = 256;  // for the int16 products of the super-block types
}  // namespace

HWY_EXPORT(DotRowsTokens);
HWY_EXPORT(DotRowsTokensInt8);
HWY_EXPORT(DotRowsTokensInt16);
HWY_EXPORT(CompiledTarget);
HWY_EXPORT(QuantizeCodes8);
HWY_EXPORT(QuantizeCodes16);

void dot_rows_tokens(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                     int64_t elements, const float* x, int64_t x_stride, int64_t tokens, float* y,
                     int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(DotRowsTokens)
  (type, first_row, row_bytes, rows, elements, x, x_stride, tokens, y, y_stride);
}

void dot_row_tokens(DType type, const std::byte* row, int64_t elements, const float* x,
                    int64_t x_stride, int64_t tokens, float* y, int64_t y_stride) {
  dot_rows_tokens(type, row, 0, 1, elements, x, x_stride, tokens, y, y_stride);
}

namespace {

// Inputs of at least this many tokens are rounded by every thread.
constexpr int64_t kParallelTokens = 16;

// Per block of `block` values: the scale and the codes (QuantizeCodes, on vectors) and the sums of
// every 16 values (exact ones, or of the rounded values: weight_kernels.h).
template <typename Code>
void quantize_blocks(const float* x, int64_t tokens, int64_t n, QuantizedActivations<Code>& out,
                     bool rounded_sums, int64_t block) {
  require(block == kBlock || block == kSuperBlock, "activation blocks of ", block,
          " values (expected ", kBlock, " or ", kSuperBlock, ")");
  require(n % block == 0, sizeof(Code) * 8, "-bit activations in blocks of ", block,
          " need a multiple of ", block, " values, not ", n);
  out.tokens = tokens;
  out.elements = n;
  out.block = block;
  out.codes.resize(static_cast<size_t>(tokens * n));
  out.scales.resize(static_cast<size_t>(tokens * n / block));
  out.sums16.resize(static_cast<size_t>(tokens * n / 16));
  // Prefill inputs are rounded by all threads (the products wait for them); decode's alone.
#pragma omp parallel for schedule(static) if (tokens >= kParallelTokens)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* v = x + t * n;
    Code* codes = out.codes.data() + t * n;
    // clang-format reads the dispatch macro's call as a statement of its own.
    // clang-format off
    if constexpr (sizeof(Code) == 1)
      HWY_DYNAMIC_DISPATCH(QuantizeCodes8)
      (v, n / block, block, codes, out.scales.data() + t * n / block);
    else
      HWY_DYNAMIC_DISPATCH(QuantizeCodes16)
      (v, n / block, block, codes, out.scales.data() + t * n / block);
    // clang-format on
    for (int64_t group = 0; group < n / 16; ++group) {
      float sum = 0;
      if (rounded_sums) {
        // At most 16 * 32767 in magnitude: the integer sum is exact, and so is its conversion.
        int32_t code_sum = 0;
        for (int64_t j = 16 * group; j < 16 * group + 16; ++j) code_sum += codes[j];
        sum = static_cast<float>(code_sum) * out.scales[(t * n + 16 * group) / block];
      } else {
        for (int64_t j = 16 * group; j < 16 * group + 16; ++j) sum += v[j];
      }
      out.sums16[(t * n) / 16 + group] = sum;
    }
  }
}

}  // namespace

void quantize_activations(const float* x, int64_t tokens, int64_t n, Int8Activations& out) {
  quantize_blocks(x, tokens, n, out, /*rounded_sums=*/false, kBlock);
}

void quantize_activations(const float* x, int64_t tokens, int64_t n, Int16Activations& out,
                          int64_t block) {
  quantize_blocks(x, tokens, n, out, /*rounded_sums=*/true, block);
  out.block_sums.clear();
  out.scaled_block_sums.clear();
  if (!amx::enabled()) {
    out.tile_high.clear();
    out.tile_low.clear();
    return;
  }
  const bool block_sums = block == kBlock;
  if (block_sums) {
    out.block_sums.resize(static_cast<size_t>(tokens * n / kBlock));
    out.scaled_block_sums.resize(out.block_sums.size());
  }
  // Zero tokens after the last, so that a tile of 16 tokens may start at any token.
  const size_t count = static_cast<size_t>(tokens * n), padded = count + 16 * n;
  out.tile_high.resize(padded);
  out.tile_low.resize(padded);
  std::fill(out.tile_high.begin() + count, out.tile_high.end(), 0);
  std::fill(out.tile_low.begin() + count, out.tile_low.end(), 0);
  const int16_t* codes = out.codes.data();
  int8_t* high = out.tile_high.data();
  uint8_t* low = out.tile_low.data();
#pragma omp parallel for schedule(static) if (tokens >= kParallelTokens)
  for (int64_t b = 0; b < tokens * n / kBlock; ++b) {
    int32_t sum = 0;  // at most 32 * 32767 in magnitude
    for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i) {
      high[i] = static_cast<int8_t>(codes[i] >> 8);
      low[i] = static_cast<uint8_t>(codes[i] & 0xFF);
      sum += codes[i];
    }
    if (block_sums) {
      out.block_sums[b] = sum;
      out.scaled_block_sums[b] = static_cast<float>(sum) * out.scales[b];
    }
  }
}

int64_t int16_activation_block(DType type) {
  return type == DType::Q4_K || type == DType::Q5_K || type == DType::Q6_K ? kSuperBlock : kBlock;
}

void dot_rows_tokens_int8(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                          int64_t elements, const Int8Activations& x, int64_t first_token,
                          int64_t tokens, float* y, int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(DotRowsTokensInt8)
  (type, first_row, row_bytes, rows, elements, x, first_token, tokens, y, y_stride);
}

void dot_row_tokens_int8(DType type, const std::byte* row, int64_t elements,
                         const Int8Activations& x, int64_t first_token, int64_t tokens, float* y,
                         int64_t y_stride) {
  dot_rows_tokens_int8(type, row, 0, 1, elements, x, first_token, tokens, y, y_stride);
}

void dot_rows_tokens_int16(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                           int64_t elements, const Int16Activations& x, int64_t first_token,
                           int64_t tokens, float* y, int64_t y_stride) {
  require(x.block == int16_activation_block(type), "int16 products of ", dtype_name(type),
          " weights take activations in blocks of ", int16_activation_block(type), ", not ",
          x.block);
  HWY_DYNAMIC_DISPATCH(DotRowsTokensInt16)
  (type, first_row, row_bytes, rows, elements, x, first_token, tokens, y, y_stride);
}

void dot_row_tokens_int16(DType type, const std::byte* row, int64_t elements,
                          const Int16Activations& x, int64_t first_token, int64_t tokens, float* y,
                          int64_t y_stride) {
  dot_rows_tokens_int16(type, row, 0, 1, elements, x, first_token, tokens, y, y_stride);
}

std::string weight_kernel_target() {
  const int64_t target = HWY_DYNAMIC_DISPATCH(CompiledTarget)();
  return std::string(hwy::TargetName(target)) +
         (target == HWY_AVX3_DL && amx::enabled() ? "+AMX" : "");
}

void set_weight_kernel_target(const std::string& name) {
  // Highway's target bits: a lower bit is a better target, so "at most X" keeps X's bit and every
  // higher one. A named instruction set must itself be on the CPU (an ARM machine has no "avx2",
  // whose mask alone would let NEON through).
  int64_t target;
  if (name == "native" || name == "amx")
    target = 0;
  else if (name == "avx512vnni")
    target = HWY_AVX3_DL;
  else if (name == "avx512")
    target = HWY_AVX3;
  else if (name == "avx2")
    target = HWY_AVX2;
  else if (name == "neon")
    target = HWY_NEON;
  else if (name == "generic")
    target = HWY_EMU128;
  else
    fail("unknown SIMD target '", name,
         "' (expected native, amx, avx512vnni, avx512, avx2, neon or generic)");
  hwy::SetSupportedTargetsForTest(0);  // back to what the CPU supports
  const int64_t supported = hwy::SupportedTargets();
  const int64_t chosen = supported & (target == 0 ? ~int64_t{0} : ~(target - 1));
  const bool present = target == 0 || target == HWY_EMU128 || (supported & target) != 0;
  require(present && chosen != 0, "SIMD target '", name, "' is not available on this CPU");
  // The tile products run from the AVX-512 VNNI kernels: "amx" asks for them, "native" takes them
  // where the CPU has them, and every narrower name leaves them out.
  require(name != "amx" || amx::available(), "SIMD target 'amx' is not available on this CPU");
  amx::set_enabled(target == 0 && amx::available() && (supported & HWY_AVX3_DL) != 0);
  hwy::SetSupportedTargetsForTest(chosen == supported ? 0 : chosen);
}

namespace {
// VISIKV_SIMD=avx2 (for example) limits the kernels from the start.
// This runs before main, where an exception could only terminate the program: a bad name is
// reported as an error and the program exits with status 1, as for any other bad input.
const bool kTargetFromEnvironment = [] {
  const char* name = std::getenv("VISIKV_SIMD");
  if (name == nullptr || *name == '\0') return true;
  try {
    set_weight_kernel_target(name);
  } catch (const Error& e) {
    std::fprintf(stderr, "visikv: error: VISIKV_SIMD: %s\n", e.what());
    std::exit(1);
  }
  return true;
}();
}  // namespace

}  // namespace visikv
#endif  // HWY_ONCE

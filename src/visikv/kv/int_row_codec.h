// The one integer row codec: uniform asymmetric integer codes in groups that share an fp16 scale
// and zero, their tight bit packing, and the kernels that read packed rows back (decode eight
// at a time, dot with float vectors, axpy into float vectors). Every integer store (kv/
// vector_store.cpp, kv/value_policy.cpp), the HeadQ side code (kv/headq.cpp) and the GPU layout
// packer (cuda/int_layout.cpp) go through it, so they hold and read the same numbers to the bit.
//
// Affine parameters are held as fp16. The zero point is the group minimum rounded *down* to fp16
// and the scale is (max - zero) / (2^b - 1) rounded *up* to fp16, so the grid
// zero + scale * {0 .. 2^b - 1} covers the group's range and every element is reconstructed
// within scale / 2 (up to float32 rounding). A constant group whose value is an fp16 number gets
// scale 0 and is reproduced exactly, and so is any value lying on the grid. A code reads back as
// fma(code, scale, zero) in float32, the same number in every kernel and on the GPU.
//
// Packing: codes of b bits (b in {2, 3, 4, 8}) form a little-endian bit stream, code i at bits
// [b·i, b·(i+1)). So 8 codes fill exactly b bytes (3-bit: 8 codes in 3 bytes), n codes take
// ceil(n·b / 8) bytes, and a run of 8 codes starting at a multiple of 8 is one b-byte
// little-endian word, which the kernels decode in one step.
//
// The vector kernels are written once against an eight-lane float type (`Lanes`): AVX2 + FMA
// registers where the compiler targets them, otherwise a portable scalar form that performs the
// same fused multiply-adds and the same reduction order, so both give the same bits.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VISIKV_INT_ROWS_AVX2 1
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>

#include "visikv/core/half.h"

namespace visikv::int_rows {

// ---- Affine parameters and codes ----------------------------------------------------------

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

// The number a code stands for.
inline float dequantize(uint32_t code, float scale, float zero) {
  return std::fma(static_cast<float>(code), scale, zero);
}

// ---- Bit packing ----------------------------------------------------------------------------

// Bytes of n packed b-bit codes.
constexpr int64_t packed_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

// Writes codes[i] (each < 2^bits) at code index first + i of the stream `out`, leaving the other
// bits of `out` as they are. `out` holds at least packed_bytes(first + codes.size(), bits) bytes.
inline void pack(std::span<const uint8_t> codes, int bits, std::span<uint8_t> out,
                 int64_t first = 0) {
  size_t i = 0;
  if (first % 8 == 0) {  // whole runs of 8 codes are whole b-byte words
    uint8_t* run_out = out.data() + first / 8 * bits;
    for (; i + 8 <= codes.size(); i += 8, run_out += bits) {
      uint64_t word = 0;
      for (int k = 0; k < 8; ++k) word |= uint64_t{codes[i + k]} << (bits * k);
      for (int byte = 0; byte < bits; ++byte)
        run_out[byte] = static_cast<uint8_t>(word >> (8 * byte));
    }
  }
  const uint32_t mask = (1u << bits) - 1;
  for (; i < codes.size(); ++i) {  // a tail, or a run that starts inside a byte
    const int64_t bit = (first + static_cast<int64_t>(i)) * bits;
    const size_t byte = static_cast<size_t>(bit >> 3);
    const int shift = static_cast<int>(bit & 7);
    const uint32_t field = mask << shift, code = (uint32_t{codes[i]} & mask) << shift;
    out[byte] = static_cast<uint8_t>((out[byte] & ~field) | code);
    if (shift + bits > 8)
      out[byte + 1] = static_cast<uint8_t>((out[byte + 1] & ~(field >> 8)) | (code >> 8));
  }
}

// Code `index` of the stream (reads only bytes inside `stream`).
inline uint32_t code_at(std::span<const uint8_t> stream, int bits, int64_t index) {
  const int64_t bit = index * bits;
  const size_t byte = static_cast<size_t>(bit >> 3);
  uint32_t word = stream[byte];
  if ((bit & 7) + bits > 8) word |= uint32_t{stream[byte + 1]} << 8;
  return (word >> (bit & 7)) & ((1u << bits) - 1);
}

// ---- Eight float lanes ------------------------------------------------------------------------

#if defined(VISIKV_INT_ROWS_AVX2)
struct Lanes {
  __m256 v;
};
inline Lanes zeros8() { return {_mm256_setzero_ps()}; }
inline Lanes broadcast8(float x) { return {_mm256_set1_ps(x)}; }
inline Lanes load8(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Lanes load8_fp16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void store8(float* p, Lanes x) { _mm256_storeu_ps(p, x.v); }
inline Lanes fma8(Lanes a, Lanes b, Lanes c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
// Lane k: the sum of v[k]'s lanes as ((0+1)+(2+3)) + ((4+5)+(6+7)).
inline Lanes transposed_sums8(const Lanes v[8]) {
  const __m256 pairs01 = _mm256_hadd_ps(v[0].v, v[1].v), pairs23 = _mm256_hadd_ps(v[2].v, v[3].v);
  const __m256 pairs45 = _mm256_hadd_ps(v[4].v, v[5].v), pairs67 = _mm256_hadd_ps(v[6].v, v[7].v);
  const __m256 quads0123 = _mm256_hadd_ps(pairs01, pairs23);
  const __m256 quads4567 = _mm256_hadd_ps(pairs45, pairs67);
  return {_mm256_add_ps(_mm256_permute2f128_ps(quads0123, quads4567, 0x20),
                        _mm256_permute2f128_ps(quads0123, quads4567, 0x31))};
}
#else
struct Lanes {
  std::array<float, 8> v;
};
inline Lanes zeros8() { return {}; }
inline Lanes broadcast8(float x) {
  Lanes out;
  out.v.fill(x);
  return out;
}
inline Lanes load8(const float* p) {
  Lanes out;
  std::copy(p, p + 8, out.v.begin());
  return out;
}
inline Lanes load8_fp16(const uint16_t* p) {
  Lanes out;
  for (int k = 0; k < 8; ++k) out.v[k] = fp16_to_float(p[k]);
  return out;
}
inline void store8(float* p, Lanes x) { std::copy(x.v.begin(), x.v.end(), p); }
inline Lanes fma8(Lanes a, Lanes b, Lanes c) {
  Lanes out;
  for (int k = 0; k < 8; ++k) out.v[k] = std::fma(a.v[k], b.v[k], c.v[k]);
  return out;
}
inline Lanes transposed_sums8(const Lanes v[8]) {
  Lanes out;
  for (int k = 0; k < 8; ++k) {
    const std::array<float, 8>& x = v[k].v;
    out.v[k] = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
  }
  return out;
}
#endif

// Eight codes of the run starting at `packed` (a b-byte word), widened to float lanes. Reads
// exactly the run's bytes.
template <int kBits>
inline Lanes unpack8(const uint8_t* packed) {
  static_assert(kBits == 2 || kBits == 3 || kBits == 4 || kBits == 8);
#if defined(VISIKV_INT_ROWS_AVX2)
  if constexpr (kBits == 8) {
    return {_mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed))))};
  } else {
    // The word is assembled in a register (a partial store to memory followed by a 4-byte load
    // would stall store forwarding).
    uint32_t word = packed[0] | uint32_t{packed[1]} << 8;
    if constexpr (kBits >= 3) word |= uint32_t{packed[2]} << 16;
    if constexpr (kBits == 4) word |= uint32_t{packed[3]} << 24;
    const __m256i shifts = _mm256_setr_epi32(0, kBits, 2 * kBits, 3 * kBits, 4 * kBits, 5 * kBits,
                                             6 * kBits, 7 * kBits);
    const __m256i codes =
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                         _mm256_set1_epi32((1 << kBits) - 1));
    return {_mm256_cvtepi32_ps(codes)};
  }
#else
  uint64_t word = 0;
  for (int byte = 0; byte < kBits; ++byte) word |= uint64_t{packed[byte]} << (8 * byte);
  Lanes out;
  for (int k = 0; k < 8; ++k)
    out.v[k] = static_cast<float>((word >> (kBits * k)) & ((1u << kBits) - 1));
  return out;
#endif
}

// ---- Rows -------------------------------------------------------------------------------------

// How a row is laid out: `dim` codes in groups of `group` consecutive channels sharing a scale
// and zero. group == 1 gives per-channel parameters (per-channel KIVI groups hold one scale and
// zero per channel of a token group). Vector kernels need dim % 8 == 0.
struct RowShape {
  int64_t dim = 0;
  int64_t group = 0;
  int64_t groups() const { return dim / group; }
};

// One packed row: its codes (a stream starting at the row's first byte) and its parameters,
// scale of group g at scales[g * param_stride] and zero at zeros[g * param_stride] (stride 1:
// a run of scales then a run of zeros; stride 2: (scale, zero) pairs).
struct Row {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t param_stride = 1;

  float scale(int64_t g) const { return fp16_to_float(scales[g * param_stride]); }
  float zero(int64_t g) const { return fp16_to_float(zeros[g * param_stride]); }
};

// Quantizes `values` (shape.dim numbers) in groups of shape.group: packs the codes into `codes`
// (packed_bytes(dim, bits) bytes) and writes the parameters as `Row` reads them. `scratch`
// holds dim codes.
inline void encode_row(std::span<const float> values, int bits, const RowShape& shape,
                       uint8_t* codes, uint16_t* scales, uint16_t* zeros, int64_t param_stride,
                       std::span<uint8_t> scratch) {
  for (int64_t g = 0; g < shape.groups(); ++g) {
    const Affine affine = quantize_group(values.subspan(g * shape.group, shape.group), bits,
                                         scratch.subspan(g * shape.group, shape.group));
    scales[g * param_stride] = affine.scale;
    zeros[g * param_stride] = affine.zero;
  }
  pack(scratch.first(shape.dim), bits, {codes, static_cast<size_t>(packed_bytes(shape.dim, bits))});
}

// out[c] = fma(code_c, scale, zero) for any dim, group and bit width, one code at a time: the
// reference the vector kernels below agree with to the bit.
inline void decode_row_scalar(const Row& row, int bits, const RowShape& shape, float* out) {
  const std::span<const uint8_t> stream(row.codes,
                                        static_cast<size_t>(packed_bytes(shape.dim, bits)));
  for (int64_t c = 0; c < shape.dim; ++c) {
    const int64_t g = c / shape.group;
    out[c] = dequantize(code_at(stream, bits, c), row.scale(g), row.zero(g));
  }
}

// Vector kernels for rows of kBits codes (shape.dim % 8 == 0).
template <int kBits>
struct RowKernels {
  // Calls visit(c, x) for c = 0, 8, .., dim - 8, where x holds channels [c, c + 8) of the row,
  // fma(code, scale, zero). `scratch` (dim floats) is used only when groups are neither one
  // channel nor a multiple of 8 channels.
  template <typename Visit>
  static void visit8(const Row& row, const RowShape& shape, float* scratch, Visit&& visit) {
    if (shape.group == 1 && row.param_stride == 1) {  // one fp16 pair per lane
      for (int64_t c = 0; c < shape.dim; c += 8)
        visit(c, fma8(unpack8<kBits>(row.codes + c / 8 * kBits), load8_fp16(row.scales + c),
                      load8_fp16(row.zeros + c)));
    } else if (shape.group % 8 == 0) {  // one pair per run of lanes
      for (int64_t g = 0; g < shape.groups(); ++g) {
        const Lanes scale = broadcast8(row.scale(g)), zero = broadcast8(row.zero(g));
        for (int64_t c = g * shape.group; c < (g + 1) * shape.group; c += 8)
          visit(c, fma8(unpack8<kBits>(row.codes + c / 8 * kBits), scale, zero));
      }
    } else {  // groups narrower than (or straddling) 8 lanes: decode through the scratch
      for (int64_t c = 0; c < shape.dim; c += 8)
        store8(scratch + c, unpack8<kBits>(row.codes + c / 8 * kBits));
      for (int64_t c = 0; c < shape.dim; ++c) {
        const int64_t g = c / shape.group;
        scratch[c] = std::fma(scratch[c], row.scale(g), row.zero(g));
      }
      for (int64_t c = 0; c < shape.dim; c += 8) visit(c, load8(scratch + c));
    }
  }

  static void decode(const Row& row, const RowShape& shape, float* out) {
    visit8(row, shape, out, [out](int64_t c, Lanes x) { store8(out + c, x); });
  }

  // y += a · x̂ (dim floats), one fused multiply-add per element.
  static void axpy(const Row& row, const RowShape& shape, float a, float* y, float* scratch) {
    const Lanes weight = broadcast8(a);
    visit8(row, shape, scratch,
           [&](int64_t c, Lanes x) { store8(y + c, fma8(weight, x, load8(y + c))); });
  }

  // sums[j] lane k = queries[j] · x̂(row_at(k)) for kQueries queries ({kQueries, dim}) and the
  // first `rows` (<= 8) of eight rows; lanes k >= rows are 0. Each product is summed over
  // lanes per 8 channels, then the eight rows are reduced together (transposed_sums8): a row's
  // score does not depend on the lane it falls in.
  template <int kQueries, typename RowAt>
  static void dot8(RowAt&& row_at, int64_t rows, const RowShape& shape, const float* queries,
                   float* scratch, Lanes sums[kQueries]) {
    Lanes partial[kQueries][8];
    for (int64_t k = 0; k < 8; ++k) {
      Lanes acc[kQueries];
      for (int j = 0; j < kQueries; ++j) acc[j] = zeros8();
      if (k < rows) {
        visit8(row_at(k), shape, scratch, [&](int64_t c, Lanes x) {
          for (int j = 0; j < kQueries; ++j)
            acc[j] = fma8(x, load8(queries + j * shape.dim + c), acc[j]);
        });
      }
      for (int j = 0; j < kQueries; ++j) partial[j][k] = acc[j];
    }
    for (int j = 0; j < kQueries; ++j) sums[j] = transposed_sums8(partial[j]);
  }

  // out[j][c .. c + 16) += Σ_{i < rows} weights[j · weight_stride + i] · x̂(row_at(i))[c ..
  // c + 16) for kQueries queries (out rows dim apart), or [c, c + 8) when c + 16 > dim. The
  // sums stay in registers over all rows: every element gets its products added in row order,
  // as an axpy per row would, but `out` is read and written once. Groups must be one channel
  // (stride-1 parameters) or a multiple of 8 channels.
  template <int kQueries, typename RowAt>
  static void accumulate16(RowAt&& row_at, int64_t rows, const RowShape& shape,
                           const float* weights, int64_t weight_stride, int64_t c, float* out) {
    const bool two = c + 16 <= shape.dim;
    Lanes lo[kQueries], hi[kQueries];
    for (int j = 0; j < kQueries; ++j) {
      lo[j] = load8(out + j * shape.dim + c);
      hi[j] = two ? load8(out + j * shape.dim + c + 8) : zeros8();
    }
    const int64_t group_lo = c / shape.group, group_hi = (c + 8) / shape.group;
    for (int64_t i = 0; i < rows; ++i) {
      const Row row = row_at(i);
      const uint8_t* codes = row.codes + c / 8 * kBits;
      Lanes x_lo, x_hi = zeros8();
      if (shape.group == 1) {
        x_lo = fma8(unpack8<kBits>(codes), load8_fp16(row.scales + c), load8_fp16(row.zeros + c));
        if (two)
          x_hi = fma8(unpack8<kBits>(codes + kBits), load8_fp16(row.scales + c + 8),
                      load8_fp16(row.zeros + c + 8));
      } else {
        x_lo = fma8(unpack8<kBits>(codes), broadcast8(row.scale(group_lo)),
                    broadcast8(row.zero(group_lo)));
        if (two)
          x_hi = fma8(unpack8<kBits>(codes + kBits), broadcast8(row.scale(group_hi)),
                      broadcast8(row.zero(group_hi)));
      }
      for (int j = 0; j < kQueries; ++j) {
        const Lanes weight = broadcast8(weights[j * weight_stride + i]);
        lo[j] = fma8(weight, x_lo, lo[j]);
        if (two) hi[j] = fma8(weight, x_hi, hi[j]);
      }
    }
    for (int j = 0; j < kQueries; ++j) {
      store8(out + j * shape.dim + c, lo[j]);
      if (two) store8(out + j * shape.dim + c + 8, hi[j]);
    }
  }
};

// Calls f(std::integral_constant<int, bits>{}) for bits in {2, 3, 4, 8}, so a run-time width
// reaches the compile-time kernels.
template <typename F>
decltype(auto) with_bits(int bits, F&& f) {
  switch (bits) {
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    default:
      return f(std::integral_constant<int, 8>{});
  }
}

// x̂ of a row of any supported width (shape.dim % 8 == 0), as the vector kernels read it.
inline void decode_row(const Row& row, int bits, const RowShape& shape, float* out) {
  with_bits(bits, [&](auto b) { RowKernels<decltype(b)::value>::decode(row, shape, out); });
}

}  // namespace visikv::int_rows

// The one integer row codec: uniform asymmetric integer codes in groups that share an fp16 scale
// and zero, and their tight bit packing. Every integer store (kv/vector_store.cpp,
// kv/value_policy.cpp), the HeadQ side code (kv/headq.cpp) and the GPU layout packer
// (cuda/int_layout.cpp) go through it, and the vector kernels that read packed rows back (decode,
// scores, weighted sums: kv/row_kernels.h) read them as decode_row_scalar does, so they all hold
// and read the same numbers to the bit.
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
#pragma once

#include <algorithm>
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

// ---- Rows -------------------------------------------------------------------------------------

// How a row is laid out: `dim` codes in groups of `group` consecutive channels sharing a scale
// and zero. group == 1 gives per-channel parameters (per-channel KIVI groups hold one scale and
// zero per channel of a token group).
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

// x̂ of a row of any supported width, as the vector kernels read it (the bits of
// decode_row_scalar; vectorized where dim is a multiple of 8 and groups are one channel with
// stride-1 parameters or a multiple of 8 channels). Implemented in kv/row_kernels.cpp.
void decode_row(const Row& row, int bits, const RowShape& shape, float* out);

}  // namespace visikv::int_rows

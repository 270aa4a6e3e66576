// Dot products of stored weight rows (f32, f16, bf16 and every GGUF block type the loader reads)
// with float32 activations: one kernel body, one small unpacking entry per weight type, compiled
// for several instruction sets (Google Highway: AVX-512, AVX2, and a portable fallback) and chosen
// at run time for the CPU at hand.
//
// Numerics ("exact" products): every stored weight is widened to the float32 value that
// dequantize() gives (for every block type that value is a product of small integers and fp16
// scales, exact in float32, so the order of the unpacking arithmetic does not matter) and
// multiplied into float32 accumulators. A row's blocks of 32 weights are unpacked once for up to
// four tokens; per token the operations and their order do not depend on how many tokens share
// the pass, so a chunk of tokens gets bit for bit the results of one token at a time. The order
// of the sums depends on the vector width, so results may differ in the last bits between an
// AVX2 and an AVX-512 machine (VISIKV_SIMD picks a narrower target to compare).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "visikv/formats/tensor.h"

namespace visikv {

// y[t * y_stride] = dot(row, x + t * x_stride) for t < tokens, where `row` holds `elements` stored
// values of `type` (a whole number of blocks for block types).
void dot_row_tokens(DType type, const std::byte* row, int64_t elements, const float* x,
                    int64_t x_stride, int64_t tokens, float* y, int64_t y_stride);

// Consecutive rows, `row_bytes` apart, in one call (the per-call costs, dispatch included, once per
// range): y[t * y_stride + r] = dot(row r, x + t * x_stride) for r < rows, t < tokens. With more
// than four tokens and several rows this is a cache-blocked product (a step of the rows widened
// once into a float32 panel, then multiplied with groups of tokens) whose every output has the
// bits of the one-token dot product.
void dot_rows_tokens(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                     int64_t elements, const float* x, int64_t x_stride, int64_t tokens, float* y,
                     int64_t y_stride);

// Activations rounded to integer codes for the integer products, per token and block of `block`
// values (32, or for the int16 products of the super-block types 256): codes q = round(x / s) in
// [-max, max] with s = max|x| / max (max = 127 for int8, 32767 for int16), and a float sum of every
// 16 values (for the weight types' offsets, which multiply these sums instead of going through the
// integer products). `elements` must be a multiple of the block.
//   int8 (llama.cpp's scheme for its quantized weights): the sums are of the exact activations.
//   int16: the sums are of the rounded activations (s times the sum of the codes), so that an
//   int16 product is the dequantized row times the rounded activations, up to float32 rounding
//   of its sums; a weight's offset then meets the same rounding errors as its code, and for the
//   centred weight types (Q4_1 mins near -8 d) that sum errs less than code times error alone.
//   int16 where the CPU's tile products run (amx_products.h): each code also split into its high
//   byte (signed) and low byte (code = 256 * high + low), with 16 zero tokens after the last, so
//   that a tile of 16 tokens may start at any token; in blocks of 32 also each block's exact sum
//   of codes X and X times the scale s (the packed rows' offsets and mins).
template <typename Code>
struct QuantizedActivations {
  int64_t tokens = 0, elements = 0, block = 32;
  std::vector<Code> codes;               // {tokens, elements}
  std::vector<float> scales;             // {tokens, elements / block}
  std::vector<float> sums16;             // {tokens, elements / 16}
  std::vector<int8_t> tile_high;         // {tokens + 16, elements}, or empty
  std::vector<uint8_t> tile_low;         // {tokens + 16, elements}, or empty
  std::vector<int32_t> block_sums;       // {tokens, elements / 32}, or empty
  std::vector<float> scaled_block_sums;  // the same times the block's scale, in float32
  bool has_tile_bytes() const { return !tile_high.empty(); }
};
using Int8Activations = QuantizedActivations<int8_t>;
using Int16Activations = QuantizedActivations<int16_t>;
void quantize_activations(const float* x, int64_t tokens, int64_t elements, Int8Activations& out);
void quantize_activations(const float* x, int64_t tokens, int64_t elements, Int16Activations& out,
                          int64_t block = 32);

// The activation block the int16 product of `type` takes: 256 for the super-block types (Q4_K,
// Q5_K, Q6_K: one activation scale per super-block lets the block's integer scales fold into the
// weight codes and the whole block be summed as integers), 32 for the others.
int64_t int16_activation_block(DType type);

// The int8 product: for block types, y[t * y_stride] ≈ dot(row, x_t) as integer dot products of
// the weights' codes with the activation codes, each block scaled in float32 (one rounding of
// the activations, about 0.4% relative per value). Float types (f32, f16, bf16) are not covered
// (they take dot_row_tokens). Chunks of tokens give bit for bit the one-token results.
void dot_row_tokens_int8(DType type, const std::byte* row, int64_t elements,
                         const Int8Activations& x, int64_t first_token, int64_t tokens, float* y,
                         int64_t y_stride);
// Consecutive rows `row_bytes` apart: y[t * y_stride + r] for r < rows (as dot_rows_tokens).
void dot_rows_tokens_int8(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                          int64_t elements, const Int8Activations& x, int64_t first_token,
                          int64_t tokens, float* y, int64_t y_stride);

// The int16 product, as the int8 one with 16-bit activation codes (at most 1 / 65534 of a
// block's largest value off per value), activations in blocks of int16_activation_block(type)
// (checked: a clear error otherwise). Blocks of 32: integer products of the weight codes with the
// codes (exact int32 sums per unit of 32), then one float multiply-add by weight scale times
// activation scale each. Super-block types: the weight codes times their integer group scales
// with the codes, exact int32 sums over the super-block (or the most units that cannot overflow),
// then one float multiply-add by d times the activation scale. Block types only. Chunks of tokens
// and ranges of rows (which decode takes several at a time) give bit for bit the one-token,
// one-row results; the order of the float sums depends on the instruction set (AVX-512 with and
// without VNNI agree bit for bit).
void dot_row_tokens_int16(DType type, const std::byte* row, int64_t elements,
                          const Int16Activations& x, int64_t first_token, int64_t tokens, float* y,
                          int64_t y_stride);
void dot_rows_tokens_int16(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                           int64_t elements, const Int16Activations& x, int64_t first_token,
                           int64_t tokens, float* y, int64_t y_stride);

// The instruction set the kernels run with on this CPU ("AVX3", "AVX2", "EMU128", ...).
std::string weight_kernel_target();

// Restricts the kernels to at most the named instruction set: "native" (the best this CPU has),
// "amx" (as native, and required to include Intel AMX: the int16 products of the super-block types
// in prefill run on its tiles, amx_products.h, bit for bit the AVX-512 VNNI results),
// "avx512vnni" (AVX-512 with VNNI: 8- and 16-bit dot products for the int8 and int16 products),
// "avx512", "avx2", "neon" (ARM) or "generic" (the portable fallback). The environment variable
// VISIKV_SIMD sets it at start-up. Throws visikv::Error on an unknown name and on an instruction
// set this CPU does not have.
void set_weight_kernel_target(const std::string& name);

}  // namespace visikv

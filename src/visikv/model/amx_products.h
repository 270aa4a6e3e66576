// Tile products (Intel AMX-INT8: Sapphire Rapids and later Xeons) for the int16 numerics of the
// super-block weight types (Q4_K, Q5_K, Q6_K) in prefill: the products term of the exact-totals
// definition (weight_kernels.cpp), bit for bit, at up to 1024 byte products per cycle and core.
//
// AMX multiplies bytes; the int16 numerics multiply 16-bit weights (group scale times code, at
// most 4096 in magnitude) by 16-bit activation codes. Each side is split into a signed high and an
// unsigned low byte (w = 256 wh + wl, x = 256 xh + xl), and four tile products give
//   w · x = 65536 (wh · xh) + 256 (wh · xl + wl · xh) + wl · xl,
// each sum over a super-block of 256 values exact in int32 (at most 16 * 128, 16 * 255, 255 * 128
// and 255 * 255, times 256, in magnitude). The four sums meet in double, where the super-block's
// exact integer T and the fused multiply-add by d times the activation scale are the ones the
// vector kernels compute, so decode and prefill still agree bit for bit. The tiles read the
// activations as 16 tokens by 64 bytes (Int16Activations::tile_high / tile_low, split once per
// input) and the weights as 16 groups of 4 bytes for 16 rows (the VNNI layout), into which each
// step's 16-bit panel is transposed once per call.
//
// Blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), decode and prefill: the rows are packed sixteen at a
// time, so that a vector holds one value pair of sixteen rows (decode) and a tile the weights of
// sixteen rows (prefill). The weights are single bytes, so two tile products (the activations'
// high and low bytes) give a block's sum.
//
// Why a layout of their own: in the stored layout a row's 32 values fill a vector, and a block's
// integer sum ends up spread over lanes that must be added, converted and scaled one block at a
// time. With sixteen rows side by side, lane r of a vector accumulates row r's block sum by itself,
// so the conversion, the scale and the multiply-add serve sixteen rows at once, and the same
// layout, unpacked once per call, is what a tile product reads.
//
// Definition (both engines, bit for bit): for row w and token x with 16-bit codes x_j and scale s
// per block b of 32 values, the exact integer I_b = sum_j c_j x_j of the weight codes c_j (q - 8
// for Q4_0, q - 16 for Q5_0, q otherwise), then in block order, in float32,
//   acc = fma(float(I_b), d_b * s_b, acc), and for Q4_1 and Q5_1 acc = fma(m_b, X_b * s_b, acc),
// with X_b the exact sum of the block's activation codes (w_j = d c_j + m) and X_b * s_b its float
// product with the scale, made once per token and block. The output is acc. The
// order of the integer sums does not matter, so the vectors and the tiles agree.
//
// Layout of a tile of 16 rows (rows past the matrix are zero), block after block, each block as
// many bytes as its 16 rows take in the stored format:
//   4- and 5-bit codes: 8 chunks of 32 bytes, chunk c for values 4c .. 4c + 3: byte 2r + k holds
//     value 4c + k of row r in its low nibble and value 4c + 2 + k in its high nibble (k < 2);
//   5-bit codes: then 8 pairs of 32-bit masks, chunk c's: bit 2r + k of the first is the fifth bit
//     of value 4c + k of row r, of the second that of value 4c + 2 + k;
//   Q8_0: 16 chunks of 32 bytes, chunk c for values 2c and 2c + 1: byte 2r + k holds value 2c + k;
//   then the 16 rows' fp16 d, and for Q4_1 and Q5_1 their fp16 m.
//
// Q4_K and Q6_K, decode and prefill: packed the same way, sixteen rows a super-block of 256 values
// at a time, and computed by the exact-totals definition of the super-block types
// (weight_kernels.cpp: the exact integer T_b = sum_j sc_g(j) c_j x_j with c = q for Q4_K and
// q - 32 for Q6_K, P = fma(double(T_b), d_b s_b, P) in block order; for Q4_K the offsets
// -dmin m_g times the activations' float sums of 16, in one float per group of 16 in block order,
// the 16 added by halves; the output float(P + offsets), or float(P)), so that packed and stored
// rows give the same bits. A super-block of 16 rows takes as many bytes as 16 stored ones, and
// Q4_K's 64 more for its scales and mins a byte each:
//   64 chunks of 32 bytes of low nibbles, as for the blocks of 32 (chunk c: values 4c .. 4c + 3);
//   Q6_K: then per chunk four 32-bit lane masks: the fifth bit of the low-nibble values, of the
//     high-nibble ones, and the sixth bit clear of each (q - 32 = low + 16 b4 - 32 (1 - b5));
//   the scales, a byte per group and row (Q4_K: 8 groups of 32 values, 6-bit; Q6_K: 16 of 16,
//   signed), and Q4_K's 6-bit mins;
//   16 fp16 d, and Q4_K's 16 fp16 dmin.
// The scales, mins, d and dmin of the 16 rows go in lane order: rows 0, 2, .., 14, then 1, 3, ..,
// 15. A group's products end in lane r for row r; their 64-bit products with the scales (vpmuldq)
// take the even lanes, then the odd ones, so lane order puts the even rows' scales first.
//
// Why: Q4_K_M files (the commonest GGUF type) hold Q4_K and Q6_K matrices, and the stored layout
// spends three or more instructions per 32 products (unpack, scale, multiply-add, and the
// sums' conversion) where sixteen rows side by side spend little more than the multiply-add.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "visikv/core/aligned.h"
#include "visikv/formats/tensor.h"
#include "visikv/model/weight_kernels.h"

#if defined(__x86_64__) && defined(__linux__)
#define VISIKV_AMX_COMPILED 1
#else
#define VISIKV_AMX_COMPILED 0
#endif

namespace visikv::amx {

// Whether this CPU has AMX-INT8 (with AVX-512 BW/DQ/VL) and the kernel grants the program the
// tile state (asked for once).
bool available();
// Whether the int16 products use the tiles: available() and not turned off by the choice of
// instruction set (set_weight_kernel_target; "native" and "amx" turn them on).
bool enabled();
// Turns the tile products on (only where available(); throws visikv::Error otherwise) or off.
void set_enabled(bool on);

// Rows at most this many at a time, padded to whole tiles of 16.
inline int64_t padded_rows(int64_t rows) { return (rows + 15) / 16 * 16; }

// One step of super-blocks for a range of rows and tokens.
struct SuperBlockStep {
  const int16_t* weights;  // row r's value k of the step at weights[r * weight_stride + k]
  int64_t weight_stride;
  const float* d;  // d of block b and row r at d[b * padded_rows(rows) + r], zero past `rows`
  int64_t rows, blocks;
  // Token t's value k of the step at high[t * activation_stride + k]: bytes of 16 tokens are read
  // from every tile's first token, past `tokens` included.
  const int8_t* high;
  const uint8_t* low;
  int64_t activation_stride;
  const float* scales;  // token t's activation scale of block b at scales[t * scale_stride + b]
  int64_t scale_stride;
  int64_t tokens;
  // Token t and row r's products term at products[t * rows + r]: each block adds T * (d * s) in
  // one fused multiply-add, in block order.
  double* products;
};
void super_block_products(const SuperBlockStep& step);

// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K.
bool packs_rows(DType type);

struct PackedRows {
  DType type = DType::F32;
  int64_t rows = 0, elements = 0;
  int64_t block_values = 32;  // 256 for Q4_K and Q6_K
  int64_t block_bytes = 0;    // one block of a tile of 16 rows
  std::vector<uint8_t, CacheAlignedAllocator<uint8_t>> data;
  int64_t tiles() const { return (rows + 15) / 16; }
  int64_t tile_bytes() const { return block_bytes * (elements / block_values); }
};

// Packs `rows` stored rows of `type` (`row_bytes` apart, `elements` values each), calling
// `packed(first, count)` after each slice of rows [first, first + count) it has read (so that a
// caller may let their pages go while the rest is packed).
PackedRows pack_rows(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                     int64_t elements,
                     const std::function<void(int64_t, int64_t)>& packed = nullptr);

// Up to this many tokens, packed_products runs on vectors; more on the tiles.
inline constexpr int64_t kVectorTokens = 4;

// y[t * y_stride + r] for the rows of tiles [first_tile, first_tile + tiles) (r counted from the
// first of them, rows past w.rows left alone) and tokens [first_token, first_token + tokens) of x
// (16-bit codes in blocks of int16_activation_block(w.type), with tile bytes, and block sums for
// blocks of 32: quantize_activations with the tile products on). Up to kVectorTokens tokens run on
// vectors, more on the tiles. Needs available().
void packed_products(const PackedRows& w, int64_t first_tile, int64_t tiles,
                     const Int16Activations& x, int64_t first_token, int64_t tokens, float* y,
                     int64_t y_stride);

}  // namespace visikv::amx

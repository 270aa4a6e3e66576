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
#pragma once

#include <cstdint>

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

}  // namespace visikv::amx

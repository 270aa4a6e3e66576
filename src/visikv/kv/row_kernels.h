// The attention-side reads of stored rows, vectorized once with Google Highway and chosen at run
// time for the CPU (kv/row_kernels.cpp): scores of queries against rows picked by position, and
// weighted sums of such rows, for dense rows (float32, half, bfloat16) and for integer-coded
// rows (kv/int_row_codec.h). The stores describe where their rows live (DenseRows, IntRows);
// the kernels read rows in place.
//
// Numbers: an integer element reads back as fma(code, scale, zero), the number every codec path
// and the GPU layout hold (int_row_codec.h). A score is one chain of fused multiply-adds per
// vector lane over the row, then a fixed reduction tree over the lanes, so a row's score is the
// same whatever call, block or lane it falls in (decode equals prefill bit for bit). A weighted
// sum adds each row's products into the output in row order with one fused multiply-add per
// element: the bits of one vec::axpy per row and query, whichever way the rows are batched.
// Vector widths follow the CPU (8 lanes on AVX2, 16 on AVX-512), so the bits of a sum depend on
// the instruction set the process runs, as the weight products' do.
#pragma once

#include <cstdint>

#include "visikv/kv/cache.h"
#include "visikv/kv/dense_format.h"
#include "visikv/kv/int_row_codec.h"

namespace visikv::row_kernels {

// Rows of `dim` elements stored back to back: row p starts at element p · dim of `data`
// (float for F32, uint16_t half or bfloat16 bits otherwise).
struct DenseRows {
  DenseFormat format = DenseFormat::F32;
  const void* data = nullptr;
  int64_t dim = 0;
};

// Rows of `bits`-bit codes: row p's codes start at byte p · row_bytes of `codes`; its parameters
// belong to token group p / token_group, whose scales start at params + (p / token_group) ·
// params_per_token_group, channel group g's at g · param_stride from there and its zeros
// zero_offset after its scales.
struct IntRows {
  int bits = 4;
  int_rows::RowShape shape;
  const uint8_t* codes = nullptr;
  int64_t row_bytes = 0;
  const uint16_t* params = nullptr;
  int64_t token_group = 1;
  int64_t params_per_token_group = 0;
  int64_t zero_offset = 0;
  int64_t param_stride = 1;

  int_rows::Row row(int64_t position) const {
    return row_in_group(position, token_group == 1 ? position : position / token_group);
  }
  // Row `position`, whose token group (position / token_group) the caller has computed.
  int_rows::Row row_in_group(int64_t position, int64_t group) const {
    const uint16_t* scales = params + group * params_per_token_group;
    return {codes + position * row_bytes, scales, scales + zero_offset, param_stride};
  }
};

// scores[q · score_stride + i] = queries[q] · x̂[positions[i]] for i < rows (rows <= the
// positions' size) and q < query_count, queries `dim` floats apart.
void dot(const DenseRows& rows, const PositionSet& positions, int64_t row_count,
         const float* queries, int64_t query_count, float* scores, int64_t score_stride);
void dot(const IntRows& rows, const PositionSet& positions, int64_t row_count, const float* queries,
         int64_t query_count, float* scores, int64_t score_stride);

// out[q · dim + c] += Σ_{i < rows} weights[q · weight_stride + i] · x̂[positions[i]][c], for
// q < query_count.
void accumulate(const DenseRows& rows, const PositionSet& positions, int64_t row_count,
                const float* weights, int64_t weight_stride, int64_t query_count, float* out);
void accumulate(const IntRows& rows, const PositionSet& positions, int64_t row_count,
                const float* weights, int64_t weight_stride, int64_t query_count, float* out);

}  // namespace visikv::row_kernels

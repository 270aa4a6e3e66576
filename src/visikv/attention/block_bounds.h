// What a block summary says about the scores of the keys inside it, for the block rules and the
// certified mode: the Quest-style upper bound and the centroid score.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/attention/sketch_kernels.h"
#include "visikv/kv/cache.h"

namespace visikv {

// Quest-style upper bound on scale * q·k over every key inside the block's per-channel box
// [min, max]: scale * sum_c max(q_c min_c, q_c max_c), plus a slack covering float32 rounding of
// this sum and of the cache's score arithmetic: (2d + 4) 2^-24 sum_c |q_c| max(|min_c|, |max_c|)
// + 4 d sqrt(d) 2^-24 ||q|| max_j ||k_j|| (block_bounds.cpp says why). Needs scale > 0.
// The box is over the keys in their stored form (the form scores read), so the bound holds for
// quantized and HeadQ caches as well as dense ones.
double block_upper_bound(const BlockSummary& block, std::span<const float> query, double scale);

// scale * q·c_b with the block's mean key c_b.
double block_centroid_score(const BlockSummary& block, std::span<const float> query, double scale);

// The same for `count` blocks from `first` of a head's summary table and every query of
// `queries` ({group, head_dim}) in one pass over the contiguous summaries:
// out[b * group + g] for block first + b and query g.
// `use_frame`: also bound q·k in the table's summary frame (BlockSummaryTable; needs one) by
// scale * (sum_i max(a_i lo_i, a_i hi_i) + ||q_perp|| R_b + slack) with a = U q and
// q_perp = q - Uᵀ a, and keep the smaller bound (block_bounds.cpp has the derivation).
void block_upper_bounds(const BlockSummaryTable& table, int64_t first, int64_t count,
                        std::span<const float> queries, double scale, std::span<double> out,
                        bool use_frame = false);
// Bounds on the scaled score of every position [first, first + count) from the table's position
// sketches (BlockSummaryTable; needs them), for every query of `queries` ({group, head_dim}):
// lower[g * count + i] <= scale * q_g·k_j <= upper[g * count + i] for j = first + i, where the
// score is the one the cache computes (float32, stored key), as the attention scales it (the
// integer products on tiles of positions, attention/sketch_kernels.h).
// block_size: the table's block size (the block's largest key norm enters the slack).
// largest (optional, {group}): raised to the largest upper bound of each query.
void position_bounds(const BlockSummaryTable& table, int64_t block_size, int64_t first,
                     int64_t count, std::span<const float> queries, double scale,
                     std::span<double> upper, std::span<double> lower,
                     std::span<double> largest = {});

// The queries as the position bounds read them (rotated and split), made once for calls over
// several parts of one range.
struct SketchQueries {
  std::vector<int16_t> levels;                    // {group, head_dim}
  std::vector<sketch_kernels::SplitQuery> split;  // {group}, pointing into `levels`
};
void split_sketch_queries(const BlockSummaryTable& table, std::span<const float> queries,
                          SketchQueries& out);

// position_bounds with split queries, into rows `stride` apart: lower[g * stride + i] <=
// scale * q_g·k_j <= upper[g * stride + i] for j = first + i. The bounds of a position do not
// depend on the range they are computed in.
void position_bounds(const BlockSummaryTable& table, int64_t block_size, int64_t first,
                     int64_t count, const SketchQueries& queries, double scale,
                     std::span<double> upper, std::span<double> lower, int64_t stride,
                     std::span<double> largest);

void block_centroid_scores(const BlockSummaryTable& table, int64_t first, int64_t count,
                           std::span<const float> queries, double scale, std::span<double> out);

}  // namespace visikv

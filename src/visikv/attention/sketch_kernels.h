// The vectorized passes of the certified choice from position sketches (block_bounds.h,
// position_bounds; support_certified.cpp), compiled once per instruction set with Google
// Highway and chosen at run time (attention/sketch_kernels.cpp):
//   - bounds: for every position of a range and every query, the interval the position's
//     scaled score lies in, from its sketch (exact 16 x 8-bit integer products on tiles of
//     kSketchTile positions, kv/cache.h, then the float64 centre and width of block_bounds.cpp);
//   - buckets: each position's bucket of its largest upper bound and of its smallest lower bound
//     over the queries, and of each query's own bounds, relative to each query's reference score.
#pragma once

#include <cstdint>
#include <span>

#include "visikv/kv/cache.h"

namespace visikv::sketch_kernels {

// One query as the bounds use it (block_bounds.cpp has the derivation): rotated as the sketches
// are and split q = step · level + r with level in 16 bits; the width of a position's interval is
//   error_weight · e_j + shared_weight · (n_j + e_j) + norm_weight · n_j
// for its sketch error e_j and its block's largest key norm n_j.
struct SplitQuery {
  const int16_t* level = nullptr;  // {head_dim}
  double step = 0, sum = 0;        // step and sum_c level_c
  double error_weight = 0, shared_weight = 0, norm_weight = 0;
};

constexpr int64_t kMaxQueries = 64;  // queries per bounds call

// upper[g * stride + i] and lower[g * stride + i]: scale · (centre ± width) of position first + i
// for query g, with centre = step_g (offset_j sum_g + step_j level_g·code_j) (the integer product
// exact in 32 bits); largest[g] = max(largest[g], max_i upper[g * stride + i]). table: sketches
// kept; block_size: its block size (the key norms'); at most kMaxQueries queries (the caller
// checks). A position's bounds do not depend on the range it is computed in.
void bounds(const BlockSummaryTable& table, int64_t block_size, int64_t first, int64_t count,
            std::span<const SplitQuery> queries, double scale, double* upper, double* lower,
            int64_t stride, double* largest);

// For each position i < count: high[i] = bucket of max_g (upper[g * count + i] - reference[g]),
// low[i] = bucket of min_g (lower[g * count + i] - reference[g]), and each query's own,
// query_high[g * count + i] = bucket of upper[g * count + i] - reference[g] and query_low the same
// of lower, where bucket(v) = min(trunc(-v · buckets_per_nat), last) for v <= 0 (every reference
// is at least its bounds); last < 2^15.
void buckets(const double* upper, const double* lower, int64_t count,
             std::span<const double> reference, double buckets_per_nat, int32_t last, int32_t* high,
             int32_t* low, int16_t* query_high, int16_t* query_low);

// For each query g of reference ({group}): weights[g * count + c] = exp(float(raw[g * count + c]
// · scale) - reference[g]) (the read candidates' scores, scaled as the attention scales them,
// every one at most its reference), and sums[g] += their sum. The exponential is Highway's
// float64 polynomial (within a few ulp, far inside the certificate's 1e-9 margin on ε).
void exponentials(const float* raw, int64_t count, double scale, std::span<const double> reference,
                  double* weights, double* sums);

// For each read candidate c: its share of the budget, share_c = max_g weights[g * count + c] /
// budget[g] (infinite for a budget <= 0), and bucket[c] = last + 1 when share_c >= 1 (it never
// fits), else min(trunc(-log(share_c) · buckets_per_nat), last).
void share_buckets(const double* weights, int64_t count, std::span<const double> budget,
                   double buckets_per_nat, int32_t last, int32_t* bucket);

}  // namespace visikv::sketch_kernels

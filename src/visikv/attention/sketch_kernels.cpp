// The kernels of sketch_kernels.h, compiled once per instruction set by Highway's foreach_target
// and chosen at run time by HWY_DYNAMIC_DISPATCH.
#include "visikv/core/simd_targets.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "visikv/attention/sketch_kernels.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// Highway's own headers must follow foreach_target.h.
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "visikv/attention/sketch_kernels.h"

HWY_BEFORE_NAMESPACE();
namespace visikv::sketch_kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int64_t kQueryBlock = 4;  // queries whose sums stay in registers during a tile's pass

// dots[g * kSketchTile + l] = level_g · code of the tile's position l, exact in 32 bits
// (|sum| <= 512 · 32767 · 127 < 2^31), for kQ queries.
template <int kQ>
HWY_INLINE void TileDots(const int8_t* tile, int64_t d, const SplitQuery* queries, int32_t* dots) {
#if HWY_TARGET == HWY_SCALAR
  for (int g = 0; g < kQ; ++g)
    for (int64_t l = 0; l < kSketchTile; ++l) {
      int32_t sum = 0;
      for (int64_t c = 0; c < d; ++c)
        sum +=
            int32_t{queries[g].level[c]} * int32_t{tile[c / 2 * 2 * kSketchTile + l * 2 + c % 2]};
      dots[g * kSketchTile + l] = sum;
    }
#else
  const hn::CappedTag<int32_t, kSketchTile> di32;
  const hn::Repartition<int16_t, decltype(di32)> di16;
  const hn::Rebind<int8_t, decltype(di16)> di8;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(di32));
  for (int64_t s = 0; s < kSketchTile; s += lanes) {
    hn::Vec<decltype(di32)> even[kQ], odd[kQ];
    for (int g = 0; g < kQ; ++g) even[g] = odd[g] = hn::Zero(di32);
    for (int64_t p = 0; p < d / 2; ++p) {
      // Channels 2p and 2p + 1 of positions s .. s + lanes, side by side in 16-bit lanes.
      const auto codes = hn::PromoteTo(di16, hn::LoadU(di8, tile + p * 2 * kSketchTile + 2 * s));
      for (int g = 0; g < kQ; ++g) {
        int32_t pair;  // levels 2p and 2p + 1 in one 32-bit lane
        std::memcpy(&pair, queries[g].level + 2 * p, sizeof(pair));
        even[g] = hn::ReorderWidenMulAccumulate(di32, codes, hn::BitCast(di16, hn::Set(di32, pair)),
                                                even[g], odd[g]);
      }
    }
    for (int g = 0; g < kQ; ++g)
      hn::StoreU(hn::RearrangeToOddPlusEven(even[g], odd[g]), di32, dots + g * kSketchTile + s);
  }
#endif
}

// Positions [lo, hi) of the tile that starts at position `tile_first`: their intervals for every
// query into upper / lower (row g at g · stride, position tile_first + l at column l - column0).
HWY_INLINE void TileBounds(const BlockSummaryTable& table, int64_t block_size, int64_t tile_first,
                           int64_t lo, int64_t hi, std::span<const SplitQuery> queries,
                           double scale, const int32_t* dots, double* upper, double* lower,
                           int64_t stride, int64_t column0, double* largest) {
  const hn::ScalableTag<double> df;
  const hn::Rebind<float, decltype(df)> df32;
  const hn::Rebind<int32_t, decltype(df)> di32;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t group = static_cast<int64_t>(queries.size());
  // Per position: offset, step, error and the block's key norm, as float64 (a partial tile reads
  // them through copies, never past the table).
  const bool whole = lo == 0 && hi == kSketchTile;
  HWY_ALIGN float offsets[kSketchTile], steps[kSketchTile], errors[kSketchTile], norms[kSketchTile];
  const float* offsets_in = table.sketch_offsets.data() + tile_first;
  const float* steps_in = table.sketch_steps.data() + tile_first;
  const float* errors_in = table.sketch_errors.data() + tile_first;
  if (!whole) {
    for (int64_t l = 0; l < kSketchTile; ++l) {
      const int64_t j = tile_first + std::clamp(l, lo, hi - 1);
      offsets[l] = table.sketch_offsets[j];
      steps[l] = table.sketch_steps[j];
      errors[l] = table.sketch_errors[j];
    }
    offsets_in = offsets;
    steps_in = steps;
    errors_in = errors;
  }
  // The blocks' largest key norms: one per tile when the tile lies in one block (the usual case,
  // blocks of a multiple of kSketchTile positions), else one division per tile, not per position.
  const int64_t block_of_lo = (tile_first + lo) / block_size;
  if (block_of_lo == (tile_first + hi - 1) / block_size) {
    std::fill_n(norms, kSketchTile, table.norms[block_of_lo]);
  } else {
    int64_t block = block_of_lo, block_end = (block + 1) * block_size;
    for (int64_t l = 0; l < kSketchTile; ++l) {
      const int64_t j = tile_first + std::clamp(l, lo, hi - 1);
      if (j >= block_end) {
        ++block;
        block_end += block_size;
      }
      norms[l] = table.norms[block];
    }
  }
  // The same numbers as float64 (exact), converted once for every query.
  HWY_ALIGN double offsets64[kSketchTile], steps64[kSketchTile], errors64[kSketchTile],
      norms64[kSketchTile];
  for (int64_t l = 0; l < kSketchTile; l += lanes) {
    hn::Store(hn::PromoteTo(df, hn::LoadU(df32, offsets_in + l)), df, offsets64 + l);
    hn::Store(hn::PromoteTo(df, hn::LoadU(df32, steps_in + l)), df, steps64 + l);
    hn::Store(hn::PromoteTo(df, hn::LoadU(df32, errors_in + l)), df, errors64 + l);
    hn::Store(hn::PromoteTo(df, hn::Load(df32, norms + l)), df, norms64 + l);
  }
  HWY_ALIGN double high[kSketchTile], low[kSketchTile];
  // The largest upper bound: over whole vectors in a whole tile; a partial tile's lanes outside
  // [lo, hi) pair another position's products with clamped sketch numbers, so there its maximum
  // is taken over [lo, hi) alone (the vector one is computed all the same, and discarded). A
  // whole tile's bounds go straight into their rows; a partial tile's through high and low.
  for (int64_t g = 0; g < group; ++g) {
    auto top = hn::Set(df, largest[g]);
    const SplitQuery& q = queries[g];
    const auto sum = hn::Set(df, q.sum), qstep = hn::Set(df, q.step), s = hn::Set(df, scale);
    const auto error_weight = hn::Set(df, q.error_weight),
               shared_weight = hn::Set(df, q.shared_weight),
               norm_weight = hn::Set(df, q.norm_weight);
    double* up_row = whole ? upper + g * stride + (tile_first - column0) : high;
    double* low_row = whole ? lower + g * stride + (tile_first - column0) : low;
    for (int64_t l = 0; l < kSketchTile; l += lanes) {
      const auto offset = hn::Load(df, offsets64 + l), step = hn::Load(df, steps64 + l);
      const auto error = hn::Load(df, errors64 + l), norm = hn::Load(df, norms64 + l);
      const auto dot = hn::PromoteTo(df, hn::LoadU(di32, dots + g * kSketchTile + l));
      const auto centre = hn::Mul(qstep, hn::MulAdd(offset, sum, hn::Mul(step, dot)));
      const auto width =
          hn::MulAdd(error_weight, error,
                     hn::MulAdd(shared_weight, hn::Add(norm, error), hn::Mul(norm_weight, norm)));
      const auto up = hn::Mul(s, hn::Add(centre, width));
      top = hn::Max(top, up);  // the same code for every tile: the bounds' bits must not differ
      hn::StoreU(up, df, up_row + l);
      hn::StoreU(hn::Mul(s, hn::Sub(centre, width)), df, low_row + l);
    }
    if (whole) {
      largest[g] = hn::GetLane(hn::MaxOfLanes(df, top));
    } else {
      largest[g] = std::max(largest[g], *std::max_element(high + lo, high + hi));
      std::copy(high + lo, high + hi, upper + g * stride + (tile_first + lo - column0));
      std::copy(low + lo, low + hi, lower + g * stride + (tile_first + lo - column0));
    }
  }
}

// The bound pass streams the codes and three arrays of sketch numbers; software prefetches this
// many tiles ahead keep more of those lines in flight than the hardware prefetcher does.
constexpr int64_t kTilesAhead = 4;

void Bounds(const BlockSummaryTable& table, int64_t block_size, int64_t first, int64_t count,
            std::span<const SplitQuery> queries, double scale, double* upper, double* lower,
            int64_t stride, double* largest) {
  const int64_t d = table.head_dim, group = static_cast<int64_t>(queries.size());
  HWY_ALIGN int32_t dots[kMaxQueries * kSketchTile];
  const int64_t end_tile = (first + count + kSketchTile - 1) / kSketchTile;
  for (int64_t tile = first / kSketchTile; tile < end_tile; ++tile) {
    const int64_t tile_first = tile * kSketchTile;
    const int8_t* codes = table.sketch_codes.data() + tile_first * d;
    if (tile + kTilesAhead < end_tile) {
      const int64_t ahead = (tile + kTilesAhead) * kSketchTile;
      for (int64_t byte = 0; byte < kSketchTile * d; byte += 64)
        __builtin_prefetch(codes + kTilesAhead * kSketchTile * d + byte, 0, 3);
      __builtin_prefetch(table.sketch_offsets.data() + ahead, 0, 3);
      __builtin_prefetch(table.sketch_steps.data() + ahead, 0, 3);
      __builtin_prefetch(table.sketch_errors.data() + ahead, 0, 3);
    }
    for (int64_t g0 = 0; g0 < group; g0 += kQueryBlock) {
      const int64_t here = std::min(kQueryBlock, group - g0);
      const SplitQuery* block = queries.data() + g0;
      int32_t* out = dots + g0 * kSketchTile;
      switch (here) {
        case 1:
          TileDots<1>(codes, d, block, out);
          break;
        case 2:
          TileDots<2>(codes, d, block, out);
          break;
        case 3:
          TileDots<3>(codes, d, block, out);
          break;
        default:
          TileDots<4>(codes, d, block, out);
      }
    }
    const int64_t lo = std::max<int64_t>(first - tile_first, 0);
    const int64_t hi = std::min<int64_t>(first + count - tile_first, kSketchTile);
    TileBounds(table, block_size, tile_first, lo, hi, queries, scale, dots, upper, lower, stride,
               first, largest);
  }
}

// bucket(x) = min(trunc(-x · buckets_per_nat), last) for x <= 0, with per_nat = -buckets_per_nat
// and top = last, before the truncation to int32 (DemoteTo truncates): the scalar
// `k >= last ? last : int(k)` with k = -x · buckets_per_nat.
template <class V>
HWY_INLINE V Bucket(V x, V per_nat, V top) {
  return hn::Min(hn::Mul(x, per_nat), top);
}

// out[c] = column(rows + c, count) for the columns of {group, count} `rows`, Lanes(df) at a time:
// column(p, stride) reads row g's columns at p + g · stride and returns their int32 results. The
// last few columns go through a zero-padded copy, and only theirs are stored.
template <class Column>
HWY_INLINE void ColumnsInto(const double* rows, int64_t count, int64_t group, const Column& column,
                            int32_t* out) {
  const hn::ScalableTag<double> df;
  const hn::Rebind<int32_t, decltype(df)> di32;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  int64_t c = 0;
  for (; c + lanes <= count; c += lanes) hn::StoreU(column(rows + c, count), di32, out + c);
  if (c == count) return;
  HWY_ALIGN double padded[kMaxQueries * hn::MaxLanes(df)] = {};
  for (int64_t g = 0; g < group; ++g)
    std::copy(rows + g * count + c, rows + g * count + count, padded + g * lanes);
  HWY_ALIGN int32_t tail[hn::MaxLanes(df)];
  hn::Store(column(padded, lanes), di32, tail);
  std::copy(tail, tail + (count - c), out + c);
}

void Buckets(const double* upper, const double* lower, int64_t count,
             std::span<const double> reference, double buckets_per_nat, int32_t last, int32_t* high,
             int32_t* low, int16_t* query_high, int16_t* query_low) {
  const hn::ScalableTag<double> df;
  const hn::Rebind<int32_t, decltype(df)> di32;
  const hn::Rebind<int16_t, decltype(df)> di16;
  const int64_t group = static_cast<int64_t>(reference.size());
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto per_nat = hn::Set(df, -buckets_per_nat), top = hn::Set(df, static_cast<double>(last));
  // Each query's own buckets, in one pass; the pooled ones follow from them, since a bucket falls
  // as its value rises (every step rounds monotonically): the bucket of max_g (upper_g - m_g) is
  // the least of the queries' buckets, that of min_g (lower_g - m_g) the greatest.
  int64_t c = 0;
  for (; c + lanes <= count; c += lanes) {
    auto pooled_high = hn::Set(di32, last), pooled_low = hn::Zero(di32);
    for (int64_t g = 0; g < group; ++g) {
      const auto m = hn::Set(df, reference[g]);
      const auto up = hn::DemoteTo(
          di32, Bucket(hn::Sub(hn::LoadU(df, upper + g * count + c), m), per_nat, top));
      const auto down = hn::DemoteTo(
          di32, Bucket(hn::Sub(hn::LoadU(df, lower + g * count + c), m), per_nat, top));
      hn::StoreU(hn::DemoteTo(di16, up), di16, query_high + g * count + c);
      hn::StoreU(hn::DemoteTo(di16, down), di16, query_low + g * count + c);
      pooled_high = hn::Min(pooled_high, up);
      pooled_low = hn::Max(pooled_low, down);
    }
    hn::StoreU(pooled_high, di32, high + c);
    hn::StoreU(pooled_low, di32, low + c);
  }
  // The last few in scalar code, the same arithmetic.
  const auto bucket = [&](double x, int64_t g) {
    return static_cast<int32_t>(
        std::min((x - reference[g]) * -buckets_per_nat, static_cast<double>(last)));
  };
  for (; c < count; ++c) {
    high[c] = last;
    low[c] = 0;
    for (int64_t g = 0; g < group; ++g) {
      const int32_t up = bucket(upper[g * count + c], g), down = bucket(lower[g * count + c], g);
      query_high[g * count + c] = static_cast<int16_t>(up);
      query_low[g * count + c] = static_cast<int16_t>(down);
      high[c] = std::min(high[c], up);
      low[c] = std::max(low[c], down);
    }
  }
}

// exp(x) for x <= 0; below -745 (where exp is 0 in float64) Highway's polynomial is not defined,
// so arguments are clamped there.
template <class D>
HWY_INLINE hn::Vec<D> ExpOfNonPositive(D d, hn::Vec<D> x) {
  return hn::Exp(d, hn::Max(x, hn::Set(d, -745.5)));
}

void Exponentials(const float* raw, int64_t count, double scale, std::span<const double> reference,
                  double* weights, double* sums) {
  const hn::ScalableTag<double> df;
  const hn::Rebind<float, decltype(df)> df32;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto s = hn::Set(df, scale);
  for (size_t g = 0; g < reference.size(); ++g) {
    const float* row = raw + g * count;
    double* out = weights + g * count;
    const auto m = hn::Set(df, reference[g]);
    // The scaled score as the attention rounds it: float(raw · scale), then minus m.
    const auto weight = [&](auto x) HWY_ATTR {
      return ExpOfNonPositive(df, hn::Sub(hn::PromoteTo(df, hn::DemoteTo(df32, hn::Mul(x, s))), m));
    };
    auto total = hn::Zero(df);
    int64_t c = 0;
    for (; c + lanes <= count; c += lanes) {
      const auto w = weight(hn::PromoteTo(df, hn::LoadU(df32, row + c)));
      hn::StoreU(w, df, out + c);
      total = hn::Add(total, w);
    }
    double sum = hn::GetLane(hn::SumOfLanes(df, total));
    if (c < count) {  // the last few, through a padded vector
      HWY_ALIGN float tail_in[hn::MaxLanes(df)] = {};
      HWY_ALIGN double tail_out[hn::MaxLanes(df)];
      std::copy(row + c, row + count, tail_in);
      hn::Store(weight(hn::PromoteTo(df, hn::Load(df32, tail_in))), df, tail_out);
      for (int64_t i = 0; c + i < count; ++i) sum += out[c + i] = tail_out[i];
    }
    sums[g] += sum;
  }
}

void ShareBuckets(const double* weights, int64_t count, std::span<const double> budget,
                  double buckets_per_nat, int32_t last, int32_t* bucket) {
  const hn::ScalableTag<double> df;
  const hn::Rebind<int32_t, decltype(df)> di32;
  const int64_t group = static_cast<int64_t>(budget.size());
  HWY_ALIGN double inverse[kMaxQueries];  // 1 / budget; an exhausted budget: every share infinite
  for (int64_t g = 0; g < group; ++g) inverse[g] = budget[g] > 0 ? 1 / budget[g] : INFINITY;
  const auto one = hn::Set(df, 1.0), tiny = hn::Set(df, 1e-300);
  const auto per_nat = hn::Set(df, -buckets_per_nat), top = hn::Set(df, static_cast<double>(last));
  const auto never = hn::Set(df, static_cast<double>(last + 1));
  ColumnsInto(
      weights, count, group,
      [&](const double* w, int64_t stride) HWY_ATTR {
        auto share = hn::Mul(hn::LoadU(df, w), hn::Set(df, inverse[0]));
        for (int64_t g = 1; g < group; ++g)
          share = hn::Max(share, hn::Mul(hn::LoadU(df, w + g * stride), hn::Set(df, inverse[g])));
        // share >= 1 never fits: bucket last + 1.
        const auto k = Bucket(hn::Log(df, hn::Max(share, tiny)), per_nat, top);
        return hn::DemoteTo(di32, hn::IfThenElse(hn::Ge(share, one), never, k));
      },
      bucket);
}

}  // namespace HWY_NAMESPACE
}  // namespace visikv::sketch_kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace visikv::sketch_kernels {

HWY_EXPORT(Bounds);
HWY_EXPORT(Buckets);
HWY_EXPORT(Exponentials);
HWY_EXPORT(ShareBuckets);

void exponentials(const float* raw, int64_t count, double scale, std::span<const double> reference,
                  double* weights, double* sums) {
  HWY_DYNAMIC_DISPATCH(Exponentials)(raw, count, scale, reference, weights, sums);
}

void share_buckets(const double* weights, int64_t count, std::span<const double> budget,
                   double buckets_per_nat, int32_t last, int32_t* bucket) {
  HWY_DYNAMIC_DISPATCH(ShareBuckets)(weights, count, budget, buckets_per_nat, last, bucket);
}

void bounds(const BlockSummaryTable& table, int64_t block_size, int64_t first, int64_t count,
            std::span<const SplitQuery> queries, double scale, double* upper, double* lower,
            int64_t stride, double* largest) {
  HWY_DYNAMIC_DISPATCH(Bounds)
  (table, block_size, first, count, queries, scale, upper, lower, stride, largest);
}

void buckets(const double* upper, const double* lower, int64_t count,
             std::span<const double> reference, double buckets_per_nat, int32_t last, int32_t* high,
             int32_t* low, int16_t* query_high, int16_t* query_low) {
  HWY_DYNAMIC_DISPATCH(Buckets)
  (upper, lower, count, reference, buckets_per_nat, last, high, low, query_high, query_low);
}

}  // namespace visikv::sketch_kernels
#endif  // HWY_ONCE

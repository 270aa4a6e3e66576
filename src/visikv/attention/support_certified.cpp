#include "visikv/attention/support_certified.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "visikv/attention/attention.h"
#include "visikv/attention/block_bounds.h"
#include "visikv/attention/support_parts.h"

namespace visikv {

void CertifiedSupport::prepare(const KVCache& cache, const AttentionSpec& attention) {
  Support::prepare(cache, attention);
  block_ = cache.block_size();
}

// With S the support, m any reference score, Z_S = sum_{j in S} exp(s_j - m) and
// Ẑ = sum over candidate blocks b not chosen of |b ∩ C| exp(u_b - m), where every unselected
// position j of block b has s_j <= u_b (block_upper_bound), so the true unselected mass
// Z_out = sum_{j not in S} exp(s_j - m) <= Ẑ.
//
// Claim: ||o_S - o|| <= 2 δ max_j ||v_j|| with δ = Ẑ / (Z_S + Ẑ).
// Proof. The dropped fraction ρ = Z_out / (Z_S + Z_out) <= δ, since x / (Z_S + x) grows with x.
// For j in S the dense weight is a_j = exp(s_j - m) / (Z_S + Z_out) = (1 - ρ) a^S_j, with a^S the
// softmax restricted to S, whose output is o_S = sum_{j in S} a^S_j v_j. Then
//   o = (1 - ρ) o_S + sum_{j not in S} a_j v_j,   so   o_S - o = ρ o_S - sum_{j not in S} a_j v_j,
// and, as o_S is a convex combination of values and sum_{j not in S} a_j = ρ,
//   ||o_S - o|| <= ρ ||o_S|| + ρ max_j ||v_j|| <= 2 ρ max_j ||v_j|| <= 2 δ max_j ||v_j||.  ∎
//
// Blocks are added in decreasing pooled u_b (max over the slot's queries) until every query of
// the slot has δ <= ε; the support is anchors ∪ chosen blocks' candidate parts ∪ tail, so a block
// partly covered by anchors or the tail is counted in Ẑ only for its positions inside C. m is the
// largest of the known scores and bounds, so every exp() is <= 1 (no overflow); Ẑ is a suffix
// sum in increasing order of the terms (no cancellation).
ChosenSupport CertifiedSupport::choose(const SupportQuery& query, SupportScratch& scratch,
                                       SparseQueryStats& stats) {
  const int64_t group = query.group, block = block_;
  const Region r = make_region(query.position, query.model_window, spec(), block);
  // Raw scores of the fixed part (anchors and tail), scaled exactly as the attention scales them.
  score_fixed_part(query, r, scratch);
  const int64_t fixed = static_cast<int64_t>(scratch.fixed.size());
  const double scale = query.scale;
  const auto scaled = [scale](float raw) { return static_cast<float>(raw * scale); };

  const BlockRange blocks = candidate_blocks(r, block);
  const int64_t nb = blocks.count;
  scratch.bounds.resize(static_cast<size_t>(nb * group));
  scratch.ranking.resize(static_cast<size_t>(nb));
  scratch.reference.assign(static_cast<size_t>(group), -INFINITY);  // m per query
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      scratch.reference[g] =
          std::max<double>(scratch.reference[g], scaled(scratch.fixed_scores[g * fixed + i]));
  if (nb > 0)
    block_upper_bounds(query.cache.summaries(query.layer, query.kv_head), blocks.first, nb,
                       query.queries, scale, scratch.bounds, spec().frame_rank > 0);
  for (int64_t b = 0; b < nb; ++b) {
    double best = -INFINITY;
    for (int64_t g = 0; g < group; ++g) {
      const double u = scratch.bounds[b * group + g];
      scratch.reference[g] = std::max(scratch.reference[g], u);
      best = std::max(best, u);
    }
    scratch.ranking[b] = best;
  }
  stats.summaries_read = nb;

  // Blocks in the order they would be added: decreasing pooled bound, ties to the lower block.
  scratch.order.resize(static_cast<size_t>(nb));
  std::iota(scratch.order.begin(), scratch.order.end(), 0);
  std::sort(scratch.order.begin(), scratch.order.end(), [&](int32_t a, int32_t b) {
    return scratch.ranking[a] > scratch.ranking[b] ||
           (scratch.ranking[a] == scratch.ranking[b] && a < b);
  });
  // suffix[i * group + g]: Ẑ_g when the first i blocks of `order` have been read.
  scratch.suffix.assign(static_cast<size_t>((nb + 1) * group), 0.0);
  for (int64_t i = nb - 1; i >= 0; --i) {
    const int64_t b = scratch.order[i];
    const auto [begin, end] = block_part(r, blocks.first + b, block);
    for (int64_t g = 0; g < group; ++g)
      scratch.suffix[i * group + g] =
          scratch.suffix[(i + 1) * group + g] +
          static_cast<double>(end - begin) *
              std::exp(scratch.bounds[b * group + g] - scratch.reference[g]);
  }
  scratch.partition.assign(static_cast<size_t>(group), 0.0);  // Z_S per query
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      scratch.partition[g] +=
          std::exp(scaled(scratch.fixed_scores[g * fixed + i]) - scratch.reference[g]);

  const auto delta = [&](int64_t read, int64_t g) {
    const double rest = scratch.suffix[read * group + g];
    return rest > 0 ? rest / (scratch.partition[g] + rest) : 0.0;
  };
  // The raw scores of every block read, kept (column j - anchors_end) for the attention.
  const int64_t candidates = std::max<int64_t>(0, r.candidates());
  scratch.selection.resize(static_cast<size_t>(group * candidates));
  int64_t read = 0;
  for (; read < nb; ++read) {
    double worst = 0;
    for (int64_t g = 0; g < group; ++g) worst = std::max(worst, delta(read, g));
    if (worst <= spec().epsilon) break;
    const auto [begin, end] = block_part(r, blocks.first + scratch.order[read], block);
    const int64_t n = end - begin;
    scratch.block_scores.resize(static_cast<size_t>(group * n));
    query.cache.score(query.layer, query.kv_head, query.queries, PositionSet::range(begin, end),
                      scratch.block_scores);
    for (int64_t g = 0; g < group; ++g) {
      const float* raw = scratch.block_scores.data() + g * n;
      std::copy(raw, raw + n, scratch.selection.begin() + g * candidates + (begin - r.anchors_end));
      for (int64_t i = 0; i < n; ++i)
        scratch.partition[g] += std::exp(scaled(raw[i]) - scratch.reference[g]);
    }
  }
  for (int64_t g = 0; g < group; ++g) scratch.deltas[g] = delta(read, g);
  scratch.items.clear();
  for (int64_t i = 0; i < read; ++i)
    scratch.items.push_back(static_cast<int32_t>(blocks.first + scratch.order[i]));
  std::sort(scratch.items.begin(), scratch.items.end());
  stats.blocks_read = static_cast<int64_t>(scratch.items.size());
  const PositionSet support = build_support(r, true, block, scratch, stats.dynamic);
  gather_support_scores(r, support, group, scratch);
  return {support, true};
}

}  // namespace visikv

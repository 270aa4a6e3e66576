#include "visikv/attention/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "visikv/attention/support_dense.h"
#include "visikv/core/error.h"

namespace visikv {

PositionSet visible_positions(int64_t position, int64_t sliding_window) {
  const int64_t first =
      sliding_window > 0 ? std::max<int64_t>(0, position - sliding_window + 1) : 0;
  return PositionSet::range(first, position + 1);
}

double softmax_in_place(std::span<float> values) {
  if (values.empty()) return -INFINITY;
  const float max = *std::max_element(values.begin(), values.end());
  float sum = 0.0f;
  for (float& v : values) {
    v = std::exp(v - max);
    sum += v;
  }
  const float inverse = 1.0f / sum;
  for (float& v : values) v *= inverse;
  return static_cast<double>(max) + std::log(static_cast<double>(sum));
}

void attend(const KVCache& cache, int64_t layer, std::span<const float> queries, int64_t tokens,
            int64_t first_position, const AttentionSpec& spec, Support& support,
            std::span<float> out, std::span<SparseQueryStats> stats, AttentionObserver* observer) {
  const CacheShape& shape = cache.shape();
  const int64_t d = spec.head_dim, kv_heads = shape.kv_heads;
  require(d == shape.head_dim && spec.heads > 0 && spec.heads % kv_heads == 0, "attention: shape (",
          spec.heads, " heads of ", d, ") does not match the cache (", kv_heads, " KV heads of ",
          shape.head_dim, ")");
  const int64_t group = spec.heads / kv_heads, row = spec.heads * d;
  require(tokens >= 0 && first_position >= 0 && first_position + tokens <= cache.length(layer),
          "attention: the cache holds ", cache.length(layer), " tokens of layer ", layer,
          ", queries reach position ", first_position + tokens - 1);
  require(static_cast<int64_t>(queries.size()) >= tokens * row &&
              static_cast<int64_t>(out.size()) >= tokens * row,
          "attention: queries and out need ", tokens, " x ", row, " values");
  require(stats.empty() || static_cast<int64_t>(stats.size()) >= tokens * spec.heads,
          "attention: stats need ", tokens * spec.heads, " entries, got ", stats.size());
  support.prepare(cache, spec);
  const int64_t slot_group = support.heads_per_choice(group);  // query heads sharing one choice
  const bool per_head = slot_group != group;
  std::fill(out.begin(), out.begin() + tokens * row, 0.0f);

#pragma omp parallel
  {
    SupportScratch scratch;
    std::vector<float> logits;  // the observer's copy of the scaled scores
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t kv = 0; kv < kv_heads; ++kv) {
        const int64_t position = first_position + t;
        for (int64_t part = 0; part < group / slot_group; ++part) {
          const int64_t first_head = kv * group + part * slot_group;
          const std::span<const float> slot_queries =
              queries.subspan(t * row + first_head * d, slot_group * d);
          SparseQueryStats st;
          scratch.deltas.assign(static_cast<size_t>(slot_group), NAN);
          const ChosenSupport chosen = support.choose(
              {cache, layer, kv, per_head ? first_head : kv, position, slot_queries, slot_group,
               spec.sliding_window, spec.scale, tokens == 1, t == tokens - 1},
              scratch, st);
          const PositionSet& positions = chosen.positions;
          const int64_t n = positions.size();
          st.support = n;
          if (!chosen.scored) {
            scratch.scores.resize(static_cast<size_t>(slot_group * n));
            cache.score(layer, kv, slot_queries, positions, scratch.scores);
          }
          for (int64_t g = 0; g < slot_group; ++g) {
            std::span<float> s(scratch.scores.data() + g * n, static_cast<size_t>(n));
            for (float& v : s) v = static_cast<float>(v * spec.scale);
            if (observer == nullptr) {
              softmax_in_place(s);
            } else {
              logits.assign(s.begin(), s.end());
              softmax_in_place(s);
              observer->observe({layer, first_head + g, kv, position,
                                 slot_queries.subspan(g * d, d), positions, logits, s});
            }
          }
          cache.accumulate(layer, kv, scratch.scores, positions,
                           out.subspan(t * row + first_head * d, slot_group * d));
          if (!stats.empty()) {
            for (int64_t g = 0; g < slot_group; ++g) {
              SparseQueryStats& s = stats[t * spec.heads + first_head + g];
              s = st;
              s.delta = scratch.deltas[g];
            }
          }
        }
      }
    }
  }
}

void attend_causal(const KVCache& cache, int64_t layer, std::span<const float> queries,
                   int64_t tokens, int64_t first_position, const AttentionSpec& spec,
                   std::span<float> out, AttentionObserver* observer) {
  DenseSupport dense;
  attend(cache, layer, queries, tokens, first_position, spec, dense, out, {}, observer);
}

}  // namespace visikv

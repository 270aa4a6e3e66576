#include "visikv/attention/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

void attend_causal(const KVCache& cache, int64_t layer, std::span<const float> queries,
                   int64_t tokens, int64_t first_position, const AttentionSpec& spec,
                   std::span<float> out, AttentionObserver* observer) {
  const CacheShape& shape = cache.shape();
  const int64_t d = spec.head_dim, kv_heads = shape.kv_heads, group = spec.heads / kv_heads;
  require(d == shape.head_dim && spec.heads % kv_heads == 0,
          "attention shape does not match the cache");
  require(first_position + tokens <= cache.length(layer), "attention: the cache holds ",
          cache.length(layer), " tokens of layer ", layer, ", queries reach position ",
          first_position + tokens - 1);
  const int64_t row = spec.heads * d;
  std::fill(out.begin(), out.begin() + tokens * row, 0.0f);

#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t kv = 0; kv < kv_heads; ++kv) {
        const int64_t position = first_position + t;
        const PositionSet visible = visible_positions(position, spec.sliding_window);
        const int64_t n = visible.size();
        // The group of query heads that share this KV head, read together.
        const std::span<const float> group_queries =
            queries.subspan(t * row + kv * group * d, group * d);
        scores.resize(static_cast<size_t>(group * n));
        cache.score(layer, kv, group_queries, visible, scores);
        for (int64_t g = 0; g < group; ++g) {
          std::span<float> s(scores.data() + g * n, static_cast<size_t>(n));
          for (float& v : s) v = static_cast<float>(v * spec.scale);
          if (observer == nullptr) {
            softmax_in_place(s);
          } else {
            std::vector<float> logits(s.begin(), s.end());
            softmax_in_place(s);
            observer->observe({layer, kv * group + g, kv, position, group_queries.subspan(g * d, d),
                               visible, logits, s});
          }
        }
        cache.accumulate(layer, kv, scores, visible,
                         out.subspan(t * row + kv * group * d, group * d));
      }
    }
  }
}

}  // namespace visikv

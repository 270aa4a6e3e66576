#include "visikv/eval/coverage.h"

#include <algorithm>
#include <cmath>
#include <mutex>

#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/eval/attention_metrics.h"
#include "visikv/eval/context_limit.h"
#include "visikv/kv/cache_factory.h"

namespace visikv {

namespace {

// Keeps the post-RoPE query of every (layer, position, head) of the dense prefill.
class QueryRecorder : public AttentionObserver {
 public:
  QueryRecorder(int64_t layers, int64_t positions, int64_t heads, int64_t head_dim)
      : positions_(positions),
        heads_(heads),
        head_dim_(head_dim),
        queries_(static_cast<size_t>(layers * positions * heads * head_dim)) {}
  void observe(const AttentionEvent& e) override {  // each slot is written by one event
    std::copy(e.query.begin(), e.query.end(),
              queries_.begin() + offset(e.layer, e.position, e.head));
  }
  std::span<const float> layer(int64_t layer) const {
    return std::span(queries_).subspan(offset(layer, 0, 0),
                                       static_cast<size_t>(positions_ * heads_ * head_dim_));
  }

 private:
  size_t offset(int64_t layer, int64_t position, int64_t head) const {
    return static_cast<size_t>(((layer * positions_ + position) * heads_ + head) * head_dim_);
  }
  int64_t positions_, heads_, head_dim_;
  std::vector<float> queries_;
};

// The support of every counted (position, head) of one attend call.
class SupportRecorder : public AttentionObserver {
 public:
  SupportRecorder(int64_t from, int64_t positions, int64_t heads)
      : from_(from), heads_(heads), supports_(static_cast<size_t>((positions - from) * heads)) {}
  void observe(const AttentionEvent& e) override {
    if (e.position < from_) return;
    std::vector<int32_t>& s = supports_[(e.position - from_) * heads_ + e.head];
    s.resize(static_cast<size_t>(e.positions.size()));
    for (int64_t i = 0; i < e.positions.size(); ++i) s[i] = static_cast<int32_t>(e.positions[i]);
  }
  const std::vector<int32_t>& at(int64_t position, int64_t head) const {
    return supports_[(position - from_) * heads_ + head];
  }

 private:
  int64_t from_, heads_;
  std::vector<std::vector<int32_t>> supports_;
};

}  // namespace

CoverageSummary summarize_shares(std::vector<double> shares) {
  if (shares.empty()) return {};
  std::sort(shares.begin(), shares.end());
  double sum = 0;
  for (double x : shares) sum += x;
  return {sum / static_cast<double>(shares.size()), sorted_percentile(shares, 0.10),
          sorted_percentile(shares, 0.01), shares.front()};
}

namespace {

SupportShareSummary summarize_support(std::vector<double> shares, double positions_sum) {
  if (shares.empty()) return {};
  std::sort(shares.begin(), shares.end());
  double sum = 0;
  for (double x : shares) sum += x;
  const double n = static_cast<double>(shares.size());
  return {sum / n,
          sorted_percentile(shares, 0.50),
          sorted_percentile(shares, 0.90),
          sorted_percentile(shares, 0.99),
          shares.back(),
          positions_sum / n};
}

// How many of the largest `weights` must join `held` for the sum to reach `target` (all of them
// when it never does). Doubling prefix selections (O(n) each) find a prefix that suffices, and
// only that prefix is sorted: a full sort per query would dominate long windows. Reorders
// `weights`.
int64_t needed_dynamic(std::vector<float>& weights, double held, double target) {
  const int64_t n = static_cast<int64_t>(weights.size());
  if (held >= target || n == 0) return 0;
  int64_t prefix = std::min<int64_t>(64, n);
  for (;;) {
    std::nth_element(weights.begin(), weights.begin() + (prefix - 1), weights.end(),
                     std::greater<>());
    double sum = held;
    for (int64_t j = 0; j < prefix; ++j) sum += weights[j];
    if (sum >= target || prefix == n) break;
    prefix = std::min(2 * prefix, n);
  }
  std::sort(weights.begin(), weights.begin() + prefix, std::greater<>());
  int64_t added = 0;
  while (added < prefix && held < target) held += weights[added++];
  return added;
}

}  // namespace

CoverageResult attention_coverage(Decoder& decoder, std::span<const int32_t> tokens,
                                  const std::vector<NamedSelectorSpec>& selectors,
                                  const CoverageOptions& o, const CoverageProgress& progress) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  require(n >= 2, "coverage needs a window of at least 2 tokens, got ", n);
  require(o.from >= 0 && o.from < n, "coverage: --from ", o.from,
          " must be a position inside the window of ", n, " tokens");
  require(o.epsilon >= 0 && o.epsilon < 1, "coverage: epsilon must be in [0, 1), got ", o.epsilon);
  require(o.anchors >= 0 && o.window >= 0 && o.top_k >= 0,
          "coverage: anchors, window and top-k must not be negative (got ", o.anchors, ", ",
          o.window, ", ", o.top_k, ")");
  const Config& c = decoder.model().config();
  check_context(c, n, str_cat("coverage: a window of ", n, " tokens"));
  std::vector<SelectorSpec> specs;
  int64_t block = 0;
  SelectorSpec summaries;  // the extra summaries the selectors read (frame, sketches)
  for (const NamedSelectorSpec& selector : selectors) {
    specs.push_back(selector.spec);
    const int64_t b = specs.back().block_size;
    require(b == 0 || block == 0 || b == block, "coverage: the selectors ask for block sizes ",
            block, " and ", b, "; one run uses one cache, so give them one block size");
    if (b > 0) block = b;
    const int64_t rank = selector.spec.frame_rank, bits = selector.spec.sketch_bits;
    require(rank == 0 || summaries.frame_rank == 0 || summaries.frame_rank == rank,
            "coverage: the selectors ask for query frames of rank ", summaries.frame_rank, " and ",
            rank, "; one run uses one cache, so give them one rank");
    require(bits == 0 || summaries.sketch_bits == 0 || summaries.sketch_bits == bits,
            "coverage: the selectors ask for position sketches of ", summaries.sketch_bits, " and ",
            bits, " bits; one run uses one cache, so give them one width");
    if (rank > 0) summaries.frame_rank = rank;
    if (bits > 0) summaries.sketch_bits = bits;
  }
  const int64_t layers = c.layers, heads = c.heads, d = c.head_dim, group = c.heads / c.kv_heads;

  auto cache =
      make_cache(decoder.cache_shape(), o.key_codec, o.value_codec, n, block > 0 ? block : 32);
  prepare_summaries(*cache, summaries, o.basis);
  QueryRecorder queries(layers, n, heads, d);
  decoder.forward(tokens, *cache, LogitRows::Last, [](int64_t, int64_t, std::span<const float>) {},
                  {.observer = &queries});
  const int64_t steps = layers + 1;
  if (progress) progress(1, steps);

  CoverageResult result;
  result.positions = n;
  for (const NamedSelectorSpec& selector : selectors) result.selectors.push_back(selector.text);
  const int64_t counted = n - o.from, sel_count = static_cast<int64_t>(specs.size());
  result.queries_per_layer = counted * heads;
  // Shares per layer, {layers, counted * heads}; index 0..3: anchors, window, top-k, total; then
  // one per selector.
  const int64_t figures = 4 + sel_count;
  std::vector<std::vector<double>> all(static_cast<size_t>(figures));
  std::vector<double> support_all(static_cast<size_t>(sel_count), 0.0);
  std::vector<double> keys_all(static_cast<size_t>(sel_count), 0.0);
  std::vector<double> needed_all;
  double context_sum = 0, needed_positions_all = 0;
  std::vector<float> out(static_cast<size_t>(n * heads * d));
  for (int64_t layer = 0; layer < layers; ++layer) {
    const AttentionSpec spec{heads, d, c.score_scale(), c.layer_window(layer)};
    std::vector<SupportRecorder> supports;
    std::vector<double> keys_sum(static_cast<size_t>(sel_count), 0.0);
    std::vector<SparseQueryStats> stats(static_cast<size_t>(counted * heads));
    for (int64_t i = 0; i < sel_count; ++i) {
      const SelectorSpec& s = specs[i];
      const std::unique_ptr<Support> support = make_support(s);
      supports.emplace_back(o.from, n, heads);
      // Only the counted queries: with the keys of the whole window in the cache, a query at
      // t >= from reads what it would in a full prefill (every query chooses afresh).
      attend(*cache, layer, queries.layer(layer).subspan(o.from * heads * d), counted, o.from, spec,
             *support, std::span(out).first(counted * heads * d), stats, &supports.back());
      for (const SparseQueryStats& q : stats) keys_sum[i] += static_cast<double>(keys_read(s, q));
    }
    std::vector<std::vector<double>> shares(
        static_cast<size_t>(figures), std::vector<double>(static_cast<size_t>(counted * heads)));
    std::vector<double> support_sum(static_cast<size_t>(sel_count), 0.0);
    std::vector<double> needed(static_cast<size_t>(counted * heads));
    double layer_context = 0, needed_positions = 0;
    std::mutex mutex;
#pragma omp parallel
    {
      std::vector<float> weights, dynamic;
      std::vector<double> local_support(static_cast<size_t>(sel_count), 0.0);
      double local_context = 0, local_needed = 0;
#pragma omp for schedule(dynamic, 16)
      for (int64_t i = 0; i < counted * heads; ++i) {
        const int64_t t = o.from + i / heads, h = i % heads;
        const PositionSet visible = visible_positions(t, spec.sliding_window);
        const int64_t lo = visible.begin(), m = visible.size();
        // Dense attention over the visible positions, as attend_causal computes it.
        weights.resize(static_cast<size_t>(m));
        const std::span<const float> q = queries.layer(layer).subspan((t * heads + h) * d, d);
        cache->score(layer, h / group, q, visible, weights);
        for (float& w : weights) w = static_cast<float>(w * spec.scale);
        softmax_in_place(weights);
        const auto mass = [&](int64_t begin, int64_t end) {  // positions [begin, end)
          double sum = 0;
          for (int64_t j = std::max(begin, lo); j < end; ++j) sum += weights[j - lo];
          return sum;
        };
        const int64_t anchors_end = std::clamp(o.anchors, lo, t + 1);
        const int64_t window_begin = std::max(anchors_end, t + 1 - o.window);
        const double anchors = mass(lo, anchors_end), window = mass(window_begin, t + 1);
        dynamic.assign(weights.begin() + (anchors_end - lo), weights.begin() + (window_begin - lo));
        const int64_t keep = std::min<int64_t>(o.top_k, static_cast<int64_t>(dynamic.size()));
        std::nth_element(dynamic.begin(), dynamic.begin() + keep, dynamic.end(), std::greater<>());
        double top = 0;
        for (int64_t j = 0; j < keep; ++j) top += dynamic[j];
        const int64_t added = needed_dynamic(dynamic, anchors + window, 1.0 - o.epsilon);
        const int64_t needed_size = (anchors_end - lo) + (t + 1 - window_begin) + added;
        needed[i] = static_cast<double>(needed_size) / static_cast<double>(m);
        local_needed += static_cast<double>(needed_size);
        shares[0][i] = anchors;
        shares[1][i] = window;
        shares[2][i] = top;
        shares[3][i] = anchors + window + top;
        for (int64_t s = 0; s < sel_count; ++s) {
          double inside = 0;
          const std::vector<int32_t>& support = supports[s].at(t, h);
          for (int32_t j : support) inside += weights[j - lo];
          shares[4 + s][i] = inside;
          local_support[s] += static_cast<double>(support.size());
        }
        local_context += static_cast<double>(m);
      }
      std::lock_guard lock(mutex);
      for (int64_t s = 0; s < sel_count; ++s) support_sum[s] += local_support[s];
      layer_context += local_context;
      needed_positions += local_needed;
    }
    CoverageLayer row;
    row.anchors = summarize_shares(shares[0]);
    row.window = summarize_shares(shares[1]);
    row.top_k = summarize_shares(shares[2]);
    row.total = summarize_shares(shares[3]);
    row.needed = summarize_support(needed, needed_positions);
    needed_all.insert(needed_all.end(), needed.begin(), needed.end());
    needed_positions_all += needed_positions;
    for (int64_t s = 0; s < sel_count; ++s) {
      row.selectors.push_back(summarize_shares(shares[4 + s]));
      row.support_mean.push_back(support_sum[s] / static_cast<double>(counted * heads));
      row.keys_mean.push_back(keys_sum[s] / static_cast<double>(counted * heads));
      support_all[s] += support_sum[s];
      keys_all[s] += keys_sum[s];
    }
    result.layers.push_back(std::move(row));
    for (int64_t f = 0; f < figures; ++f)
      all[f].insert(all[f].end(), shares[f].begin(), shares[f].end());
    context_sum += layer_context;
    if (progress) progress(layer + 2, steps);
  }
  CoverageLayer& pooled = result.pooled;
  pooled.anchors = summarize_shares(std::move(all[0]));
  pooled.window = summarize_shares(std::move(all[1]));
  pooled.top_k = summarize_shares(std::move(all[2]));
  pooled.total = summarize_shares(std::move(all[3]));
  pooled.needed = summarize_support(std::move(needed_all), needed_positions_all);
  const double queries_all = static_cast<double>(counted * heads * layers);
  for (int64_t s = 0; s < sel_count; ++s) {
    pooled.selectors.push_back(summarize_shares(std::move(all[4 + s])));
    pooled.support_mean.push_back(support_all[s] / queries_all);
    pooled.keys_mean.push_back(keys_all[s] / queries_all);
  }
  result.context_mean = context_sum / queries_all;
  return result;
}

}  // namespace visikv

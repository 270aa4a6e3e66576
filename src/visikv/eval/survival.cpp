#include "visikv/eval/survival.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <mutex>

#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/core/saturating.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/perplexity.h"
#include "visikv/eval/sampler.h"
#include "visikv/kv/cache_factory.h"

namespace visikv {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Positions per chunk when reading stored values back for their norms: an identity weight matrix
// of chunk x chunk through KVCache::accumulate (the interface has no direct value accessor).
constexpr int64_t kNormChunk = 64;

// Watches the one query per forward call that produces the next prediction (the call's last
// position): collects the union of positions read per (layer, KV head) and, when asked, the
// output error against dense attention over the same cache. Events of other positions are
// ignored. Called from worker threads; the tracked events are few (layers x heads per step), so
// one mutex is enough.
class StepObserver : public AttentionObserver {
 public:
  StepObserver(const Config& c, bool measure)
      : layers_(c.layers),
        heads_(c.heads),
        kv_heads_(c.kv_heads),
        head_dim_(c.head_dim),
        scale_(c.score_scale()),
        windows_(static_cast<size_t>(c.layers)),
        measure_(measure),
        unions_(static_cast<size_t>(c.layers * c.kv_heads)),
        norms_(static_cast<size_t>(c.layers * c.kv_heads)),
        errors_(static_cast<size_t>(c.layers * c.heads), kNaN),
        deltas_(static_cast<size_t>(c.layers * c.heads), kNaN) {
    for (int64_t l = 0; l < c.layers; ++l) windows_[l] = c.layer_window(l);
  }

  // A new sequence in `cache` (cleared): forget the value norms read so far.
  void start_sequence(const KVCache& cache) {
    cache_ = &cache;
    for (auto& n : norms_) n.clear();
  }

  // The next forward call's last position.
  void track(int64_t position) {
    position_ = position;
    for (auto& u : unions_) u.clear();
    std::fill(errors_.begin(), errors_.end(), kNaN);
    std::fill(deltas_.begin(), deltas_.end(), kNaN);
  }

  void observe(const AttentionEvent& e) override {
    if (e.position != position_) return;
    const double error = measure_ ? normalised_error(e) : kNaN;
    std::lock_guard lock(mutex_);
    std::vector<int32_t>& u = unions_[e.layer * kv_heads_ + e.kv_head];
    for (int64_t i = 0; i < e.positions.size(); ++i)
      u.push_back(static_cast<int32_t>(e.positions[i]));
    errors_[e.layer * heads_ + e.head] = error;
  }

  // The decoder's sparse statistics for one layer: keeps the tracked (last) row's deltas.
  void record_stats(int64_t layer, std::span<const SparseQueryStats> stats) {
    const int64_t rows = static_cast<int64_t>(stats.size()) / heads_;
    if (rows == 0) return;
    for (int64_t h = 0; h < heads_; ++h)
      deltas_[layer * heads_ + h] = stats[(rows - 1) * heads_ + h].delta;
  }

  struct Totals {
    double support_sum = 0, context_sum = 0;
    int64_t support_max = 0, slots = 0;
    double bound_max = -1, error_max = -1;
    int64_t violations = 0, measured = 0;
  };

  // Folds the tracked step into `t`.
  void finish_step(Totals& t) {
    for (size_t i = 0; i < unions_.size(); ++i) {
      std::vector<int32_t>& u = unions_[i];
      std::sort(u.begin(), u.end());
      const int64_t unique = std::unique(u.begin(), u.end()) - u.begin();
      t.support_sum += static_cast<double>(unique);
      t.support_max = std::max(t.support_max, unique);
      t.context_sum += static_cast<double>(visible(static_cast<int64_t>(i) / kv_heads_));
      ++t.slots;
    }
    for (int64_t i = 0; i < layers_ * heads_; ++i) {
      if (!std::isnan(deltas_[i])) t.bound_max = std::max(t.bound_max, deltas_[i]);
      if (std::isnan(errors_[i])) continue;
      ++t.measured;
      t.error_max = std::max(t.error_max, errors_[i]);
      // Float rounding of the two outputs, relative to max ||v||: a sum of n terms.
      const double rounding = static_cast<double>(visible(i / heads_)) * 0x1p-24;
      if (!std::isnan(deltas_[i]) && errors_[i] > deltas_[i] + rounding) ++t.violations;
    }
  }

 private:
  // ||o_S - o|| / (2 max_j ||v_j||): o_S from the event's own weights over its support, o from a
  // dense softmax over every visible position, both read from the same cache.
  double normalised_error(const AttentionEvent& e) {
    const int64_t d = head_dim_;
    const PositionSet visible = visible_positions(e.position, windows_[e.layer]);
    const int64_t n = visible.size();
    std::vector<float> weights(static_cast<size_t>(n));
    cache_->score(e.layer, e.kv_head, e.query, visible, weights);
    for (float& w : weights) w = static_cast<float>(w * scale_);  // as attend_causal scales
    softmax_in_place(weights);
    std::vector<float> dense(static_cast<size_t>(d), 0.0f), sparse(static_cast<size_t>(d), 0.0f);
    cache_->accumulate(e.layer, e.kv_head, weights, visible, dense);
    cache_->accumulate(e.layer, e.kv_head, e.weights, e.positions, sparse);
    double diff = 0;
    for (int64_t c = 0; c < d; ++c) {
      const double x = static_cast<double>(sparse[c]) - dense[c];
      diff += x * x;
    }
    const double value_max = max_value_norm(e.layer, e.kv_head, visible);
    return value_max > 0 ? std::sqrt(diff) / (2 * value_max) : 0.0;
  }

  // max ||v_j|| over the visible positions, from the stored values; norms are read once per
  // position and sequence.
  double max_value_norm(int64_t layer, int64_t kv, const PositionSet& visible) {
    std::lock_guard lock(norms_mutex_);
    std::vector<float>& norms = norms_[layer * kv_heads_ + kv];
    const int64_t d = head_dim_;
    std::vector<float> identity, values;
    while (static_cast<int64_t>(norms.size()) < visible.end()) {
      const int64_t begin = static_cast<int64_t>(norms.size());
      const int64_t chunk = std::min(kNormChunk, visible.end() - begin);
      identity.assign(static_cast<size_t>(chunk * chunk), 0.0f);
      for (int64_t i = 0; i < chunk; ++i) identity[i * chunk + i] = 1.0f;
      values.assign(static_cast<size_t>(chunk * d), 0.0f);
      cache_->accumulate(layer, kv, identity, PositionSet::range(begin, begin + chunk), values);
      for (int64_t i = 0; i < chunk; ++i) {
        double sum = 0;
        for (int64_t c = 0; c < d; ++c)
          sum += static_cast<double>(values[i * d + c]) * values[i * d + c];
        norms.push_back(static_cast<float>(std::sqrt(sum)));
      }
    }
    double best = 0;
    for (int64_t j = visible.begin(); j < visible.end(); ++j)
      best = std::max<double>(best, norms[j]);
    return best;
  }

  // How many positions the tracked query sees in `layer`.
  int64_t visible(int64_t layer) const {
    return visible_positions(position_, windows_[layer]).size();
  }

  int64_t layers_, heads_, kv_heads_, head_dim_;
  double scale_;
  std::vector<int64_t> windows_;  // per layer: 0 or the sliding window
  bool measure_;
  const KVCache* cache_ = nullptr;
  int64_t position_ = -1;
  std::mutex mutex_, norms_mutex_;
  std::vector<std::vector<int32_t>> unions_;  // {layers, kv_heads}
  std::vector<std::vector<float>> norms_;     // {layers, kv_heads} -> per position
  std::vector<double> errors_, deltas_;       // {layers, heads}
};

double greedy_nll(std::span<const float> logits, int32_t& token) {
  token = argmax(logits);
  return negative_log_likelihood(logits, token);
}

// The sampler of sample `index`: dense and sparse runs of one sample share it.
SamplingOptions sampling_options(const SurvivalOptions& o, size_t index) {
  SamplingOptions s;
  s.temperature = o.temperature;
  s.seed = o.seed + index;
  return s;
}

}  // namespace

void check_survival_options(const Config& config, const SurvivalOptions& o) {
  require(o.prefix >= 1, "the prefix must hold at least 1 token, got ", o.prefix);
  require(o.continuation >= 1, "the continuation must hold at least 1 token, got ", o.continuation);
  require(o.samples >= 1, "at least 1 sample is needed, got ", o.samples);
  require(!o.bos || o.prefix >= 2, "with BOS first the prefix needs at least 2 tokens, got ",
          o.prefix);
  require(std::isfinite(o.temperature) && o.temperature >= 0,
          "the sampling temperature must be a finite number >= 0, got ", o.temperature);
  check_context(config, saturating_add(o.prefix, o.continuation),
                str_cat("a prefix of ", o.prefix, " tokens + a continuation of ", o.continuation));
}

int64_t survival_text_tokens(const SurvivalOptions& o) {
  require(o.prefix >= 1 && o.samples >= 1, "survival prefixes need prefix >= 1 and samples >= 1");
  const int64_t text_per_prefix = o.bos ? o.prefix - 1 : o.prefix;
  require(text_per_prefix >= 1, "the prefix leaves no room for text after BOS");
  return saturating_mul(text_per_prefix, o.samples);  // --samples may be any number
}

std::vector<std::vector<int32_t>> survival_prefixes(std::span<const int32_t> text,
                                                    const SurvivalOptions& o) {
  const int64_t needed = survival_text_tokens(o);
  const int64_t text_per_prefix = o.bos ? o.prefix - 1 : o.prefix;
  require(static_cast<int64_t>(text.size()) >= needed, "the text has ", text.size(), " tokens; ",
          o.samples, " prefixes of ", text_per_prefix, " text tokens need ", needed);
  std::vector<std::vector<int32_t>> prefixes;
  for (int64_t i = 0; i < o.samples; ++i) {
    std::vector<int32_t> p;
    if (o.bos) p.push_back(*o.bos);
    p.insert(p.end(), text.begin() + i * text_per_prefix, text.begin() + (i + 1) * text_per_prefix);
    prefixes.push_back(std::move(p));
  }
  return prefixes;
}

std::vector<DenseReference> dense_references(Decoder& decoder,
                                             const std::vector<std::vector<int32_t>>& prefixes,
                                             const SurvivalOptions& o) {
  check_survival_options(decoder.model().config(), o);
  auto cache =
      make_cache(decoder.cache_shape(), o.key_codec, o.value_codec, o.prefix + o.continuation);
  std::vector<DenseReference> refs;
  for (const auto& prefix : prefixes) {
    require(!prefix.empty(), "an empty survival prefix");
    DenseReference r;
    r.prefix = prefix;
    cache->clear();
    std::vector<float> logits = decoder.next_logits(prefix, *cache);
    for (int64_t i = 0; i < o.continuation; ++i) {
      int32_t token = 0;
      r.nll.push_back(greedy_nll(logits, token));
      r.continuation.push_back(token);
      if (i + 1 < o.continuation) logits = decoder.next_logits({&token, 1}, *cache);
    }
    if (o.temperature > 0) {
      Sampler sampler(sampling_options(o, refs.size()));
      cache->clear();
      logits = decoder.next_logits(prefix, *cache);
      for (int64_t i = 0; i < o.continuation; ++i) {
        const int32_t token = sampler.next(logits);
        r.sampled.push_back(token);
        if (i + 1 < o.continuation) logits = decoder.next_logits({&token, 1}, *cache);
      }
    }
    refs.push_back(std::move(r));
  }
  return refs;
}

SurvivalRow survival_row(Decoder& decoder, std::span<const DenseReference> refs,
                         const NamedSelectorSpec& named, const SurvivalOptions& o,
                         const SurvivalProgress& progress) {
  const auto started = std::chrono::steady_clock::now();
  require(!refs.empty(), "survival: no dense references");
  const SelectorSpec& spec = named.spec;
  const bool dense = spec.kind == SelectorKind::Dense;
  const Config& config = decoder.model().config();
  auto cache = make_cache(decoder.cache_shape(), o.key_codec, o.value_codec,
                          o.prefix + o.continuation, spec.cache_block_size());
  prepare_summaries(*cache, spec, nullptr);
  std::unique_ptr<Support> selector;
  StepObserver observer(config, !dense);
  SupportStatsSink record_stats;
  if (!dense) {
    selector = make_support(spec);
    record_stats = [&observer](int64_t layer, std::span<const SparseQueryStats> s) {
      observer.record_stats(layer, s);
    };
  }
  // The greedy continuation is observed step by step; the sampled one only needs the logits.
  const AttentionOptions observed{selector.get(), record_stats, &observer};
  const AttentionOptions unobserved{selector.get(), record_stats, nullptr};

  SurvivalRow row;
  row.selector = named.text;
  StepObserver::Totals totals;
  int64_t matches = 0, predictions = 0, sampling_agreements = 0;
  double nll_dense = 0, nll_sparse = 0;
  for (size_t s = 0; s < refs.size(); ++s) {
    const DenseReference& ref = refs[s];
    const int64_t steps = static_cast<int64_t>(ref.continuation.size());
    require(steps >= 1 && ref.nll.size() == ref.continuation.size(),
            "survival: malformed dense reference ", s);
    cache->clear();
    if (selector) selector->reset();
    observer.start_sequence(*cache);
    int64_t position = static_cast<int64_t>(ref.prefix.size()) - 1;
    observer.track(position);
    std::vector<float> logits = decoder.next_logits(ref.prefix, *cache, observed);
    observer.finish_step(totals);
    int64_t divergence = steps;
    for (int64_t i = 0; i < steps; ++i) {
      const int32_t expected = ref.continuation[i];
      const bool match = argmax(logits) == expected;
      matches += match ? 1 : 0;
      if (!match && divergence == steps) divergence = i;
      nll_sparse += negative_log_likelihood(logits, expected);
      nll_dense += ref.nll[i];
      ++predictions;
      if (i + 1 < steps) {
        observer.track(++position);
        logits = decoder.next_logits({&expected, 1}, *cache, observed);
        observer.finish_step(totals);
      }
    }
    row.first_divergence.push_back(divergence);
    if (o.temperature > 0) {
      // Teacher-forced on the dense sampled continuation, drawing from the same seeded stream.
      require(ref.sampled.size() == ref.continuation.size(), "survival: sample ", s,
              " has no sampled dense continuation (references made without a temperature)");
      cache->clear();
      if (selector) selector->reset();
      Sampler sampler(sampling_options(o, s));
      std::vector<float> sampled_logits = decoder.next_logits(ref.prefix, *cache, unobserved);
      int64_t first = steps;
      for (int64_t i = 0; i < steps; ++i) {
        const int32_t expected = ref.sampled[i];
        const bool agree = sampler.next(sampled_logits) == expected;
        sampling_agreements += agree ? 1 : 0;
        if (!agree && first == steps) first = i;
        if (i + 1 < steps) sampled_logits = decoder.next_logits({&expected, 1}, *cache, unobserved);
      }
      row.sampling_first_divergence.push_back(first);
    }
    if (progress) progress(static_cast<int64_t>(s) + 1, static_cast<int64_t>(refs.size()));
  }

  row.first_divergence_min =
      *std::min_element(row.first_divergence.begin(), row.first_divergence.end());
  double sum = 0;
  bool all = true;
  for (size_t s = 0; s < refs.size(); ++s) {
    sum += static_cast<double>(row.first_divergence[s]);
    all = all && row.first_divergence[s] == static_cast<int64_t>(refs[s].continuation.size());
  }
  row.first_divergence_mean = sum / static_cast<double>(refs.size());
  row.identical = all;
  row.tf_match = static_cast<double>(matches) / static_cast<double>(predictions);
  row.nll_dense = nll_dense / static_cast<double>(predictions);
  row.nll_sparse = nll_sparse / static_cast<double>(predictions);
  row.ppl_dense = std::exp(row.nll_dense);
  row.ppl_sparse = std::exp(row.nll_sparse);
  // exp(a) / exp(b) - 1 via expm1 keeps tiny differences (and an exact 0) accurate.
  row.delta_ppl_pct = 100.0 * std::expm1(row.nll_sparse - row.nll_dense);
  if (totals.slots > 0) {
    row.support_mean = totals.support_sum / static_cast<double>(totals.slots);
    row.context_mean = totals.context_sum / static_cast<double>(totals.slots);
  }
  row.support_max = totals.support_max;
  if (spec.kind == SelectorKind::Certified && totals.bound_max >= 0)
    row.bound_max = totals.bound_max;
  if (!dense && totals.error_max >= 0) row.measured_err_max = totals.error_max;
  if (o.temperature > 0) {
    double sampled_sum = 0;
    for (int64_t x : row.sampling_first_divergence) sampled_sum += static_cast<double>(x);
    row.sampling_first_divergence_mean = sampled_sum / static_cast<double>(refs.size());
    row.sampling_agreement =
        static_cast<double>(sampling_agreements) / static_cast<double>(predictions);
  }
  row.bound_violations = totals.violations;
  row.queries_measured = totals.measured;
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return row;
}

}  // namespace visikv

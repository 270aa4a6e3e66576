#include "visikv/model/decoder.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "visikv/attention/support_dense.h"
#include "visikv/core/error.h"
#include "visikv/formats/dequantize.h"
#include "visikv/model/matmul.h"
#include "visikv/model/ops.h"

namespace visikv {

namespace {
// Logits are produced this many rows at a time, so a long prefill never holds {tokens, vocab}.
constexpr int64_t kLogitRowsPerSlice = 64;

void resize(AlignedFloats& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(static_cast<size_t>(size));
}

// Hands a cache that records attention (KVCache::records_attention) the softmax weights the
// attention paths report to observers, then passes each event on to the caller's observer. The
// decoder holds the cache mutably; attention itself only reads it.
class AttentionRecorder final : public AttentionObserver {
 public:
  AttentionRecorder(KVCache& cache, AttentionObserver* next) : cache_(cache), next_(next) {}
  void observe(const AttentionEvent& event) override {
    cache_.record_attention(event.layer, event.kv_head, event.weights, event.positions);
    if (next_ != nullptr) next_->observe(event);
  }

 private:
  KVCache& cache_;
  AttentionObserver* next_;
};
}  // namespace

int64_t decode_order_chunk(const KVCache& cache) {
  if (cache.records_attention()) return INT64_MAX;
  // Layers hold the same positions, but a cache may store them differently per layer.
  int64_t chunk = INT64_MAX;
  for (int64_t layer = 0; layer < cache.shape().layers; ++layer)
    chunk = std::min(chunk, cache.decode_equivalent_chunk(layer));
  return std::max<int64_t>(chunk, 1);
}

void Decoder::set_product_rounding(ProductRounding rounding) {
  prepare_weights(model_.weights(), rounding);
  rounding_ = rounding;
}

Decoder::Decoder(const Model& model) : model_(model), config_(model.config()) {
  if (config_.positions == PositionKind::Rotary) {
    for (const LayerKind kind : {LayerKind::Global, LayerKind::Local})
      inverse_frequencies_[static_cast<int>(kind)] = rope_inverse_frequencies(config_, kind);
  }
}

CacheShape Decoder::cache_shape() const {
  return {config_.layers, config_.kv_heads, config_.head_dim};
}

void Decoder::embed(std::span<const int32_t> tokens, int64_t first_position, int64_t row_offset) {
  const Weights& w = model_.weights();
  const int64_t hidden = config_.hidden;
  for (size_t t = 0; t < tokens.size(); ++t) {
    const int32_t id = tokens[t];
    require(id >= 0 && id < config_.vocab_size, "token id ", id, " outside the vocabulary of ",
            config_.vocab_size);
    std::span<float> row(x_.data() + (row_offset + static_cast<int64_t>(t)) * hidden,
                         static_cast<size_t>(hidden));
    dequantize(w.token_embedding.dtype, w.token_embedding.row(id), row);
    if (config_.embedding_scale != 1.0f)
      for (float& value : row) value *= config_.embedding_scale;
    if (w.position_embedding) {
      const int64_t position = first_position + static_cast<int64_t>(t);
      require(position < w.position_embedding->rows(), "position ", position,
              " is past the model's ", w.position_embedding->rows(), " learned positions");
      std::vector<float> learned(static_cast<size_t>(hidden));
      dequantize(w.position_embedding->dtype, w.position_embedding->row(position), learned);
      for (int64_t i = 0; i < hidden; ++i) row[i] += learned[i];
    }
  }
}

void Decoder::mlp(const LayerWeights& layer, int64_t tokens) {
  const int64_t inner = config_.intermediate;
  resize(up_, tokens * inner);
  std::span<float> up(up_.data(), static_cast<size_t>(tokens * inner));
  if (config_.gated_mlp) {
    resize(gate_, tokens * inner);
    const LinearProduct gate_up[] = {{&*layer.gate, gate_}, {&layer.up, up_}};
    linear_forward(gate_up, normed_, tokens, rounding_);
    std::span<float> gate(gate_.data(), up.size());
    apply_activation(config_.activation, gate);
    for (size_t i = 0; i < up.size(); ++i) up[i] *= gate[i];
  } else {
    linear_forward(layer.up, normed_, tokens, up_, rounding_);
    apply_activation(config_.activation, up);
  }
  linear_forward(layer.down, up_, tokens, projected_, rounding_);
  if (layer.post_mlp_norm)
    apply_norm(config_.norm, *layer.post_mlp_norm, config_.norm_eps, projected_, tokens,
               config_.hidden, projected_);
}

bool Decoder::passes_equal_one_pass(const KVCache& cache, const AttentionOptions& attention,
                                    int64_t tokens) const {
  if (attention.support != nullptr || attention.observer != nullptr || cache.records_attention())
    return false;
  if (decode_order_chunk(cache) < tokens) return false;
  return products_independent_of_token_count();
}

bool Decoder::products_independent_of_token_count() const {
  const auto invariant = [&](const Linear& l) {
    return sums_independent_of_token_count(l, rounding_);
  };
  const Weights& w = model_.weights();
  if (!invariant(w.lm_head)) return false;
  for (const LayerWeights& layer : w.layers) {
    for (const Linear* l : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.up, &layer.down})
      if (!invariant(*l)) return false;
    if (layer.gate && !invariant(*layer.gate)) return false;
  }
  return true;
}

void Decoder::forward(std::span<const int32_t> tokens, KVCache& cache, LogitRows rows,
                      const LogitsSink& sink, const AttentionOptions& attention) {
  const auto n = static_cast<int64_t>(tokens.size());
  if (n > kForwardChunk && passes_equal_one_pass(cache, attention, n)) {
    for (int64_t t = 0; t < n; t += kForwardChunk) {
      const int64_t count = std::min(kForwardChunk, n - t);
      const LogitRows pass_rows = rows == LogitRows::Last && t + count < n ? LogitRows::None : rows;
      forward(
          tokens.subspan(static_cast<size_t>(t), static_cast<size_t>(count)), cache, pass_rows,
          [&](int64_t first_row, int64_t row_count, std::span<const float> logits) {
            sink(t + first_row, row_count, logits);
          },
          attention);
    }
    return;
  }
  const DecoderSegment segment{
      .tokens = tokens, .cache = &cache, .rows = rows, .sink = sink, .attention = attention};
  forward_batch({&segment, 1});
}

void Decoder::forward_batch(std::span<const DecoderSegment> segments) {
  const Config& c = config_;
  const Weights& w = model_.weights();
  // Segment s holds rows [first_row[s], first_row[s + 1]) of every {tokens, width} buffer.
  std::vector<int64_t> first_row{0}, first_position;
  for (const DecoderSegment& s : segments) {
    require(s.cache != nullptr, "forward_batch: a segment without a cache");
    first_row.push_back(first_row.back() + static_cast<int64_t>(s.tokens.size()));
    first_position.push_back(s.cache->length(0));
  }
  const int64_t n = first_row.back();
  if (n == 0) return;
  const int64_t hidden = c.hidden;
  resize(x_, n * hidden);
  resize(normed_, n * hidden);
  resize(q_, n * c.q_dim());
  resize(k_, n * c.kv_dim());
  resize(v_, n * c.kv_dim());
  resize(attention_, n * c.q_dim());
  resize(projected_, n * hidden);
  const std::span<float> x(x_.data(), static_cast<size_t>(n * hidden));
  DenseSupport dense;
  std::vector<AttentionObserver*> observers;
  std::vector<std::optional<AttentionRecorder>> recorders(segments.size());
  for (size_t s = 0; s < segments.size(); ++s) {
    const DecoderSegment& segment = segments[s];
    AttentionObserver* observer = segment.attention.observer;
    if (segment.cache->records_attention()) {
      recorders[s].emplace(*segment.cache, observer);
      observer = &*recorders[s];
    }
    observers.push_back(observer);
    embed(segment.tokens, first_position[s], first_row[s]);
  }

  for (int64_t l = 0; l < c.layers; ++l) {
    const LayerWeights& layer = w.layers[l];
    apply_norm(c.norm, layer.attention_norm, c.norm_eps, x, n, hidden, normed_);
    const LinearProduct qkv[] = {{&layer.q, q_}, {&layer.k, k_}, {&layer.v, v_}};
    linear_forward(qkv, normed_, n, rounding_);
    const std::span<float> q(q_.data(), static_cast<size_t>(n * c.q_dim()));
    const std::span<float> k(k_.data(), static_cast<size_t>(n * c.kv_dim()));
    const std::span<float> v(v_.data(), k.size());
    if (layer.q_norm) {
      // Each head is normalised on its own: rows of head_dim values.
      apply_norm(c.norm, *layer.q_norm, c.norm_eps, q, n * c.heads, c.head_dim, q);
      apply_norm(c.norm, *layer.k_norm, c.norm_eps, k, n * c.kv_heads, c.head_dim, k);
    }
    const LayerKind kind = c.layer_kind(l);
    const int64_t kv_row = c.kv_dim(), q_row = c.q_dim();
    // A local layer's window bounds what dense and sparse supports read.
    const AttentionSpec spec{c.heads, c.head_dim, c.score_scale(), c.layer_window(l)};
    for (size_t s = 0; s < segments.size(); ++s) {
      const DecoderSegment& segment = segments[s];
      const int64_t first = first_row[s], count = first_row[s + 1] - first;
      if (count == 0) continue;
      if (c.positions == PositionKind::Rotary) {
        const std::vector<float>& inverse_frequencies =
            inverse_frequencies_[static_cast<int>(kind)];
        apply_rope(c, inverse_frequencies, q.subspan(first * q_row, count * q_row), count, c.heads,
                   first_position[s]);
        apply_rope(c, inverse_frequencies, k.subspan(first * kv_row, count * kv_row), count,
                   c.kv_heads, first_position[s]);
      }
      KVCache& cache = *segment.cache;
      Support& support = segment.attention.support != nullptr ? *segment.attention.support : dense;
      const bool report_stats =
          segment.attention.support != nullptr && segment.attention.support_stats;
      if (report_stats) stats_.assign(static_cast<size_t>(count * c.heads), SparseQueryStats{});
      // Appends tokens [t, t + chunk) of the segment to its cache and attends their queries.
      const auto append_and_attend = [&](int64_t t, int64_t chunk) {
        const int64_t row = first + t;
        cache.append(l, k.subspan(row * kv_row, chunk * kv_row),
                     v.subspan(row * kv_row, chunk * kv_row), chunk);
        const auto queries = std::span<const float>(q_).subspan(row * q_row, chunk * q_row);
        const auto out = std::span<float>(attention_).subspan(row * q_row, chunk * q_row);
        const auto stats = report_stats ? std::span(stats_).subspan(t * c.heads, chunk * c.heads)
                                        : std::span<SparseQueryStats>();
        attend(cache, l, queries, chunk, first_position[s] + t, spec, support, out, stats,
               observers[s]);
      };
      if (cache.records_attention()) {
        // The cache's stored form depends on the attention it served, so within the layer each
        // token is appended and attended before the next one arrives: exactly decode order,
        // while the weight products above and below still run over the whole chunk.
        for (int64_t t = 0; t < count; ++t) append_and_attend(t, 1);
      } else {
        append_and_attend(0, count);
      }
      if (report_stats) segment.attention.support_stats(l, stats_);
    }
    linear_forward(layer.o, attention_, n, projected_, rounding_);
    if (layer.post_attention_norm)
      apply_norm(c.norm, *layer.post_attention_norm, c.norm_eps, projected_, n, hidden, projected_);
    if (c.parallel_residual) {
      // x + attn(ln1 x) + mlp(ln2 x): the MLP reads the layer input, not the attention sum.
      std::vector<float> attention_out(projected_.begin(), projected_.begin() + n * hidden);
      apply_norm(c.norm, layer.mlp_norm, c.norm_eps, x, n, hidden, normed_);
      mlp(layer, n);
      for (int64_t i = 0; i < n * hidden; ++i) x[i] += attention_out[i] + projected_[i];
    } else {
      for (int64_t i = 0; i < n * hidden; ++i) x[i] += projected_[i];
      apply_norm(c.norm, layer.mlp_norm, c.norm_eps, x, n, hidden, normed_);
      mlp(layer, n);
      for (int64_t i = 0; i < n * hidden; ++i) x[i] += projected_[i];
    }
  }

  // The rows whose logits are asked for, segment by segment, go through the LM head together,
  // kLogitRowsPerSlice at a time (a decode step of many sequences reads the head once).
  struct LogitRow {
    size_t segment;
    int64_t row;  // within the segment
  };
  std::vector<LogitRow> wanted;
  for (size_t s = 0; s < segments.size(); ++s) {
    const int64_t count = first_row[s + 1] - first_row[s];
    if (segments[s].rows == LogitRows::None) continue;
    for (int64_t r = segments[s].rows == LogitRows::All ? 0 : count - 1; r < count; ++r)
      if (r >= 0) wanted.push_back({s, r});
  }
  for (size_t start = 0; start < wanted.size(); start += kLogitRowsPerSlice) {
    const auto count =
        static_cast<int64_t>(std::min<size_t>(kLogitRowsPerSlice, wanted.size() - start));
    resize(gathered_, count * hidden);
    for (int64_t i = 0; i < count; ++i) {
      const LogitRow& r = wanted[start + i];
      std::copy_n(x.begin() + (first_row[r.segment] + r.row) * hidden, hidden,
                  gathered_.begin() + i * hidden);
    }
    resize(logits_, count * c.vocab_size);
    apply_norm(c.norm, w.final_norm, c.norm_eps, gathered_, count, hidden, normed_);
    linear_forward(w.lm_head, normed_, count, logits_, rounding_);
    if (c.final_logit_softcap > 0) {
      // As transformers: logits / c, tanh, * c, in float32.
      const auto cap = static_cast<float>(c.final_logit_softcap);
      for (int64_t i = 0; i < count * c.vocab_size; ++i)
        logits_[i] = std::tanh(logits_[i] / cap) * cap;
    }
    // Each segment's rows of the slice are consecutive: one call per segment and slice.
    for (int64_t i = 0; i < count;) {
      const LogitRow& r = wanted[start + i];
      int64_t run = 1;
      while (i + run < count && wanted[start + i + run].segment == r.segment) ++run;
      segments[r.segment].sink(r.row, run,
                               std::span<const float>(logits_.data() + i * c.vocab_size,
                                                      static_cast<size_t>(run * c.vocab_size)));
      i += run;
    }
  }
}

std::vector<float> Decoder::all_logits(std::span<const int32_t> tokens, KVCache& cache,
                                       const AttentionOptions& attention) {
  const int64_t vocab = config_.vocab_size;
  std::vector<float> logits(tokens.size() * static_cast<size_t>(vocab));
  forward(
      tokens, cache, LogitRows::All,
      [&](int64_t first_row, int64_t, std::span<const float> values) {
        std::copy(values.begin(), values.end(), logits.begin() + first_row * vocab);
      },
      attention);
  return logits;
}

std::vector<float> Decoder::next_logits(std::span<const int32_t> tokens, KVCache& cache,
                                        const AttentionOptions& attention) {
  std::vector<float> logits;
  forward(
      tokens, cache, LogitRows::Last,
      [&](int64_t, int64_t, std::span<const float> values) {
        logits.assign(values.begin(), values.end());
      },
      attention);
  return logits;
}

}  // namespace visikv

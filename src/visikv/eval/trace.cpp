#include "visikv/eval/trace.h"

#include <algorithm>
#include <memory>

#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/forwarding_cache.h"

namespace visikv {

namespace {

// Where each recorded layer's trace lives (-1: not recorded).
std::vector<int64_t> layer_slots(const Config& config, const std::vector<int64_t>& layers) {
  std::vector<int64_t> slot(static_cast<size_t>(config.layers), -1);
  if (layers.empty()) {
    for (int64_t l = 0; l < config.layers; ++l) slot[l] = l;
    return slot;
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const int64_t l = layers[i];
    require(l >= 0 && l < config.layers, "trace: layer ", l, " is out of range (the model has ",
            config.layers, " layers)");
    require(slot[l] < 0, "trace: layer ", l, " is named twice");
    slot[l] = static_cast<int64_t>(i);
  }
  return slot;
}

// Copies the keys and values of the recorded layers as they are appended; the cache it wraps
// stores and serves them as usual. Appends run on the calling thread, layer by layer.
class RecordingCache final : public ForwardingCache {
 public:
  RecordingCache(std::unique_ptr<KVCache> inner, Trace& trace, const std::vector<int64_t>& slot)
      : ForwardingCache(std::move(inner)), trace_(trace), slot_(slot) {}

  void append(int64_t layer, std::span<const float> keys, std::span<const float> values,
              int64_t tokens) override {
    const int64_t first = length(layer);
    ForwardingCache::append(layer, keys, values, tokens);
    if (slot_[layer] < 0) return;
    LayerTrace& t = trace_.layers[slot_[layer]];
    const int64_t width = trace_.kv_heads * trace_.head_dim;
    std::copy_n(keys.begin(), tokens * width, t.keys.begin() + first * width);
    std::copy_n(values.begin(), tokens * width, t.values.begin() + first * width);
  }

 private:
  Trace& trace_;
  const std::vector<int64_t>& slot_;
};

// Copies each query head's query and weights into its slots; events of different (layer, head,
// position) write different slots, so worker threads need no lock.
class RecordingObserver final : public AttentionObserver {
 public:
  RecordingObserver(Trace& trace, const std::vector<int64_t>& slot) : trace_(trace), slot_(slot) {}

  void observe(const AttentionEvent& e) override {
    if (slot_[e.layer] < 0) return;
    LayerTrace& t = trace_.layers[slot_[e.layer]];
    const int64_t T = trace_.tokens, d = trace_.head_dim;
    std::copy(e.query.begin(), e.query.end(),
              t.queries.begin() + (e.position * trace_.heads + e.head) * d);
    float* row = t.attention.data() + (e.head * T + e.position) * T;
    for (int64_t i = 0; i < e.positions.size(); ++i) row[e.positions[i]] = e.weights[i];
  }

 private:
  Trace& trace_;
  const std::vector<int64_t>& slot_;
};

}  // namespace

Trace trace(Decoder& decoder, std::span<const int32_t> tokens, const TraceOptions& options) {
  const Config& config = decoder.model().config();
  const int64_t T = static_cast<int64_t>(tokens.size());
  require(T > 0, "trace: no tokens");
  check_context(config, T, str_cat("a trace of ", T, " tokens"));
  const std::vector<int64_t> slot = layer_slots(config, options.layers);

  Trace trace;
  trace.tokens = T;
  trace.heads = config.heads;
  trace.kv_heads = config.kv_heads;
  trace.head_dim = config.head_dim;
  trace.vocab = config.vocab_size;
  trace.layers.resize(options.layers.empty() ? static_cast<size_t>(config.layers)
                                             : options.layers.size());
  for (int64_t l = 0; l < config.layers; ++l) {
    if (slot[l] < 0) continue;
    LayerTrace& t = trace.layers[slot[l]];
    t.layer = l;
    t.queries.assign(static_cast<size_t>(T * config.q_dim()), 0.0f);
    t.keys.assign(static_cast<size_t>(T * config.kv_dim()), 0.0f);
    t.values.assign(t.keys.size(), 0.0f);
    t.attention.assign(static_cast<size_t>(config.heads * T * T), 0.0f);
  }

  RecordingCache cache(make_cache(decoder.cache_shape(), options.keys, options.values, T,
                                  options.selector.cache_block_size(), options.headq_basis),
                       trace, slot);
  prepare_summaries(cache, options.selector, options.headq_basis);
  const std::unique_ptr<Support> support = make_support(options.selector);
  RecordingObserver observer(trace, slot);
  trace.logits =
      decoder.all_logits(tokens, cache, {.support = support.get(), .observer = &observer});
  return trace;
}

}  // namespace visikv

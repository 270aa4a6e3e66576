// What attention sees in one forward pass, layer by layer: the queries, keys and values it
// computed and the weights every query head gave every position, for study outside the engine
// (the Python package's Model.trace). The cache codecs and the attention selector are those of a
// run: keys and values are recorded as the model computed them (post-RoPE, before the cache
// stores them), the weights as the compressed or sparse attention used them.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"

namespace visikv {

struct HeadqBasisVectors;

struct TraceOptions {
  KeyCodecSpec keys;  // f32 and dense attention by default
  ValueCodecSpec values;
  SelectorSpec selector;
  const HeadqBasisVectors* headq_basis = nullptr;  // for a HeadQ key codec; not owned
  // Layers to record; empty: every layer. The attention weights take heads x tokens^2 floats per
  // recorded layer, so long traces should name a few.
  std::vector<int64_t> layers;
};

struct LayerTrace {
  int64_t layer = 0;
  std::vector<float> queries;    // {tokens, heads, head_dim}: post-RoPE, unscaled
  std::vector<float> keys;       // {tokens, kv_heads, head_dim}: post-RoPE
  std::vector<float> values;     // {tokens, kv_heads, head_dim}
  std::vector<float> attention;  // {heads, tokens, tokens}: [h][t][s] = weight of position s
                                 // for the query at t; 0 where t's attention did not read s
};

struct Trace {
  int64_t tokens = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  std::vector<LayerTrace> layers;  // in the order of TraceOptions::layers (ascending if empty)
  std::vector<float> logits;       // {tokens, vocab}
};

// Runs `tokens` (positions 0 ..) through a fresh cache in one forward pass. Throws visikv::Error
// for a layer out of range, a bad codec for the model, or more tokens than the context allows.
Trace trace(Decoder& decoder, std::span<const int32_t> tokens, const TraceOptions& options = {});

}  // namespace visikv

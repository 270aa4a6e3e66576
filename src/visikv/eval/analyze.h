// `visikv analyze`: how well key MSE and the Fisher score-space error F predict the attention KL
// that key quantizers (and the controls of eval/key_perturbation.h) cause (METHODS.md "Keys",
// "HeadQ", "Values").
//
// The dense model runs once over the tokens; every layer's post-RoPE queries, keys and values are
// kept (an AttentionTrace). Then, for each key spec, each layer independently is teacher-forced
// on those dense q/k/v: the keys (and values) are appended to a cache in that spec token by
// token, and after appending token t the query of every head at t attends causally to the
// positions it may see, scored from the stored form exactly as the engine scores (per-token
// codecs quantize at write; windowed codecs hold their newest tokens in fp16). The reference is
// the same attention over an f32 cache.
//
// Per (key spec, layer, query head) cell, averaged over the queries t = 0..N-1:
//   key_mse       mean over the visible keys of ||e_j||²/d, e_j = k_j - k̂_j as stored when t
//                 reads it (the KV head's keys)
//   fisher        F = Var_a(δ), δ_j = s_j - ŝ_j the scaled score error
//   kl            KL(a || â) from logits, in double (eval/attention_metrics.h)
//   flip_rate     share of queries whose argmax position changes; also counted per bin of the
//                 attention entropy H(a)
// and, with a value codec: value_error = ||Σ a_j v_j - Σ â_j v̂_j||², value_only_error =
// ||Σ a_j (v_j - v̂_j)||² (exact weights), and the A² surrogate Σ_j a_j² ||ε_j||² that predicts
// the latter.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "visikv/eval/key_perturbation.h"
#include "visikv/kv/codec_spec.h"

namespace visikv {

class Model;
struct HeadqBasis;

// The dense model's own attention inputs over one token sequence.
struct AttentionTrace {
  int64_t layers = 0, heads = 0, kv_heads = 0, head_dim = 0, tokens = 0;
  double scale = 0;              // multiplies q·k
  std::vector<int64_t> windows;  // per layer: 0 (every earlier position) or its sliding window
  std::vector<float> queries;    // {layers, tokens, heads, head_dim}, post-RoPE
  std::vector<float> keys;       // {layers, tokens, kv_heads, head_dim}, post-RoPE
  std::vector<float> values;     // {layers, tokens, kv_heads, head_dim}

  int64_t group() const { return heads / kv_heads; }
  std::span<const float> layer_keys(int64_t layer) const;
  std::span<const float> layer_values(int64_t layer) const;
  // The queries of the `group()` heads of one KV head at token t, {group, head_dim}.
  std::span<const float> group_queries(int64_t layer, int64_t t, int64_t kv_head) const;
};

// Runs `tokens` (BOS included when wanted) through the model in one prefill and records every
// layer's queries, keys and values. Throws visikv::Error for fewer than 2 tokens or more than the
// model's context.
AttentionTrace trace_attention(const Model& model, std::span<const int32_t> tokens);

struct AnalyzeOptions {
  std::vector<AnalyzeKeySpec> key_specs;               // eval/key_perturbation.h grammar
  std::optional<ValueCodecSpec> value_codec;           // none: f32 values, no value metrics
  std::vector<double> entropy_edges = {0.5, 1, 2, 4};  // nats, ascending: bins [0, e0), ...
  const HeadqBasis* basis = nullptr;                   // for HeadQ codecs and the controls
  double null_energy = 0.999;                          // query-span energy of the controls
};

struct EntropyBinCount {
  int64_t queries = 0, flips = 0;
};

struct AnalyzeCell {
  std::string key_codec;  // canonical spec
  int64_t layer = 0, head = 0, kv_head = 0, queries = 0;
  double key_mse = 0, fisher = 0, kl = 0, flip_rate = 0, entropy = 0;
  std::vector<EntropyBinCount> bins;  // entropy_edges.size() + 1
  std::optional<double> value_error, value_only_error, a2_surrogate;
};

struct CodecSummary {
  std::string key_codec;
  std::optional<double> bits_per_key;  // cache codecs: per key per head (codec_bits)
  int64_t cells = 0, queries = 0;
  double mse_mean = 0, fisher_mean = 0, kl_mean = 0, flip_rate = 0;
  std::vector<EntropyBinCount> bins;
  std::optional<double> value_error_mean, value_only_error_mean, a2_surrogate_mean;
  // Controls: the smallest and largest query-span rank over the heads.
  std::optional<int64_t> span_rank_min, span_rank_max;
};

struct AnalyzeResult {
  std::vector<AnalyzeCell> cells;  // spec-major, then layer, then query head
  std::vector<CodecSummary> codecs;
  // Across all cells: of key MSE and of F against KL. NaN where undefined (a constant side).
  double spearman_mse = 0, spearman_fisher = 0, pearson_mse = 0, pearson_fisher = 0;
};

// progress(layer runs done, layer runs in all)
using AnalyzeProgress = std::function<void(int64_t done, int64_t total)>;

// The default key specs for heads of `head_dim` channels: f16; int4/3/2 per-token and int2
// per-channel (KIVI) keys as in the eval kv grid (eval/kv_grid.h); Hadamard int2 and int3
// per-token keys (when head_dim is a power of two); and, when `with_basis`, HeadQ rank 8 on the
// int2 per-token keys, the null-space intervention `null:a1` and the same-MSE pair
// `span:query:` / `span:null:` of the int2 per-token codec.
std::vector<AnalyzeKeySpec> default_analyze_key_specs(int64_t head_dim, bool with_basis);

// Checks every spec (and the basis it needs) first; throws visikv::Error naming a bad spec, a
// missing basis, bad entropy edges or a value spec that does not fit.
AnalyzeResult analyze_attention(const AttentionTrace& trace, const AnalyzeOptions& options,
                                const AnalyzeProgress& progress = {});

// The checks analyze_attention makes before any work, alone: a command that runs the key specs
// one at a time (to save each as it finishes) makes them first.
void check_analyze_options(const AttentionTrace& trace, const AnalyzeOptions& options);

// Sets the result's Spearman and Pearson coefficients from its cells (analyze_attention does;
// a result assembled from several runs calls it once they are in).
void correlate_cells(AnalyzeResult& result);

}  // namespace visikv

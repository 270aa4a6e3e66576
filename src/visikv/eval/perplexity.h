// Perplexity over non-overlapping windows of a token stream, in modes that compute the same
// function: prefill (each window in one forward pass), decode (token by token through the
// cache: the reference for decode order) and decode-batched (decode order in the largest chunks
// that compute what decode computes, model/decoder.h decode_order_chunk: each query reads the
// same stored keys and values as in decode, and the weight products round per token).
//
// Protocol: the text's tokens are cut into consecutive windows. A window holds `window` tokens;
// when the model's tokenizer adds BOS, each window is BOS followed by window-1 text tokens and
// every text token in it is scored; otherwise each window is `window` text tokens and all but
// the first are scored. Either way a full window scores window-1 tokens. `max_tokens` stops
// after that many scored tokens.
//
// With a reference (PerplexityOptions::reference), a second run of the same model through a
// cache of the reference's codecs scores the same positions, and every scored position compares
// the two next-token distributions (eval/divergence.h: KL(reference || run), top-1 agreement).
// The two runs go side by side through each window, the reference at most 256 tokens ahead:
// only that many rows of its logits are held (256 x 49152 floats, 50 MB, for the default
// model), where keeping them for a whole text would take vocab x tokens x 4 bytes (1.6 GB at
// 8192 tokens). The price is a second forward pass per window. Decode and decode-batched compute
// the same bits in chunks of any length, so the reference's chunks change nothing; prefill with
// a reference runs both sides in pieces of 256 tokens through their caches (the same function;
// with float weights the wide products may round differently from a whole-window prefill), so
// that a run compared with a reference of its own codecs has KL exactly 0.
//
// Runs compared with one reference (a grid of codecs) can skip the second pass: the reference
// run records its logits once (PerplexityOptions::record_logits, eval/logit_store.h: a temporary
// file) and every later run reads them back (reference_logits). The recorded run goes through the
// same chunks a side-by-side reference would, so the figures are the same bits either way.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>

#include "visikv/attention/selector_spec.h"
#include "visikv/eval/divergence.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"

namespace visikv {

struct HeadqBasis;
class LogitStore;

enum class PerplexityMode { Prefill, Decode, DecodeBatched };
PerplexityMode perplexity_mode_from_name(const std::string& name);
std::string perplexity_mode_name(PerplexityMode mode);

// The caches and attention of a reference run: f32 keys and values with dense attention by
// default, the uncompressed model.
struct ReferenceRun {
  KeyCodecSpec key_codec;
  ValueCodecSpec value_codec;
  SelectorSpec selector;
};

struct PerplexityOptions {
  PerplexityMode mode = PerplexityMode::Prefill;
  int64_t window = 1024;
  int64_t max_tokens = 0;  // 0: all
  // Cache codecs for keys and values (docs/CACHE_SPECS.md) and the attention selector
  // (docs/SELECTOR_SPECS.md), f32 and dense by default. Each key is stored when written and every
  // score reads the stored form, in both modes.
  KeyCodecSpec key_codec;
  ValueCodecSpec value_codec;
  SelectorSpec selector;
  // Calibrated bases for a HeadQ key codec (kv/headq.h; calibration/basis_file.h loads them); not
  // owned, null when the codec needs none.
  const HeadqBasis* headq_basis = nullptr;
  std::optional<int32_t> bos;  // prepended to each window when set
  // When set, every scored position is also compared with this run's next-token distribution.
  std::optional<ReferenceRun> reference;
  // Instead of `reference`, the logits a run with the same text and options recorded
  // (`record_logits`): the comparison without the second forward pass. Not owned.
  const LogitStore* reference_logits = nullptr;
  // When set, every scored position's logits are appended to this store, in scoring order (a
  // later run's reference_logits). Not owned.
  LogitStore* record_logits = nullptr;
};

struct PerplexityResult {
  int64_t tokens = 0;  // tokens scored
  int64_t windows = 0;
  double nll = 0;  // mean negative log-likelihood (nats)
  double ppl = 0;
  double seconds = 0;
  double tokens_per_s = 0;  // tokens processed (scored) per second
  // Positions each scored query read per query head and layer (mean), and the positions it could
  // see: equal for dense attention.
  double support_mean = 0, context_mean = 0;
  // With a reference: KL(reference || this run) and top-1 agreement over the scored positions.
  std::optional<DivergenceSummary> divergence;
  // With a reference: the reference run's mean NLL and perplexity over the same positions.
  std::optional<double> reference_nll, reference_ppl;
};

// progress(scored so far, total to score): once with 0 before the first window, then after
// each forward.
using Progress = std::function<void(int64_t done, int64_t total)>;

// Throws visikv::Error for options perplexity() cannot run: a window under 2 tokens or past the
// model's context (eval/context_limit.h), a negative token limit. Commands call it before they
// read their text.
void check_perplexity_options(const Config& config, const PerplexityOptions& options);

// Throws visikv::Error where `mode` cannot keep the decoder's products: decode-batched order with
// int8 or int16 products of float weights (they go through sgemm, which rounds by the chunk).
// Exact products are always kept (decode-batched rounds them per token). Commands call it before
// any model time; perplexity() checks it too.
void check_decode_order_products(const Decoder& decoder, PerplexityMode mode);

PerplexityResult perplexity(Decoder& decoder, std::span<const int32_t> text_tokens,
                            const PerplexityOptions& options, const Progress& progress = {});

// Text tokens (without BOS) enough to score `scored` tokens in windows of `window` tokens: one
// per scored token with BOS, one more per window without, and a margin of two (saturating at
// the largest integer).
int64_t text_tokens_to_score(int64_t scored, int64_t window);

// -log softmax(logits)[target], in double.
double negative_log_likelihood(std::span<const float> logits, int32_t target);

}  // namespace visikv

// The survival protocol for sparse attention (METHODS.md, "Condensate sparse attention"): how long
// and how closely a sparse-attention model follows the dense model's own greedy continuation.
//
// For each prefix (S consecutive, non-overlapping pieces of a token stream, N tokens each with
// BOS first when the model uses one):
//   1. dense reference: prefill the prefix densely and decode T tokens greedily (argmax, lowest
//      index on ties, EOS does not stop it); the dense model's NLL of each of its own tokens;
//   2. sparse, teacher-forced on the dense continuation: the prefix is prefilled with the
//      selector (prefill and decode both use it), then the reference tokens are fed one at a
//      time; at each of the T predictions we record whether the sparse argmax equals the
//      reference token (top-1 agreement) and the sparse NLL of the reference token (ΔPPL);
//   3. first divergence: the first step at which a free-running sparse greedy decode picks a
//      token other than the reference (T when it never does). It is read off the teacher-forced
//      run: up to the first disagreement both runs feed the same tokens through the same
//      deterministic computation, so they agree step for step, and the free run's first
//      different token is the teacher-forced run's first disagreement. (A test checks this
//      against an explicit free-running decode.)
//
// Sampling agreement (when options.temperature > 0): the dense reference also samples T tokens
// at that temperature from a Sampler seeded with seed + sample index (eval/sampler.h; no top-k or
// top-p limit). The sparse model is teacher-forced on that sampled continuation with a Sampler of
// the same seed, so both consume the same random numbers step for step; at each step we record
// whether the sparse sample equals the dense one. The first step where they differ is where a
// free-running sparse sampled decode with the shared seed first departs from the dense one (the
// same argument as for greedy: up to there both runs compute the same thing with the same random
// draws); the agreement is the share of the S * T steps at which the coupled samples agree.
//
// Support statistics count, for each of the T queries that produce the predictions (the prefix's
// last position, then the T-1 decode steps), each layer and each KV head, the unique positions
// read: the union of the supports of the KV head's query heads, as the attention observer sees
// them (with gqa=shared every query head of a group reads the same support).
//
// Output error: at the same queries, every (layer, query head) is also attended densely over the
// same cache (score every visible position, softmax, accumulate, as attend_causal does), and the
// error is normalised as METHODS.md states the certificate: ||o_S - o|| / (2 max_j ||v_j||), the
// max over the visible positions of the stored values. For certified selectors this is checked
// per query against the selector's own delta.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"

namespace visikv {

struct SurvivalOptions {
  int64_t prefix = 1024;       // N: tokens per prefix, BOS included when set
  int64_t continuation = 64;   // T: reference tokens
  int64_t samples = 4;         // S: prefixes
  KeyCodecSpec key_codec;      // cache codecs (docs/CACHE_SPECS.md; f32 by default), the
  ValueCodecSpec value_codec;  // same for the dense reference and every selector
  std::optional<int32_t> bos;  // first token of every prefix when set
  double temperature = 0;      // > 0: also measure sampling agreement at this temperature
  uint64_t seed = 0;           // sampling seed of sample 0 (sample i uses seed + i)
};

// Checks the options against the model (sizes >= 1, prefix + continuation within the model's
// positions); throws visikv::Error naming the problem.
void check_survival_options(const Config& config, const SurvivalOptions& options);

// Text tokens (without BOS) the S prefixes take, saturating at the largest integer.
int64_t survival_text_tokens(const SurvivalOptions& options);

// The S prefixes: piece i holds text tokens [i * m, (i + 1) * m) with m = N - (BOS ? 1 : 0).
// Throws when the text is too short.
std::vector<std::vector<int32_t>> survival_prefixes(std::span<const int32_t> text_tokens,
                                                    const SurvivalOptions& options);

struct DenseReference {
  std::vector<int32_t> prefix;
  std::vector<int32_t> continuation;  // T greedy tokens
  std::vector<double> nll;            // dense NLL of each continuation token
  std::vector<int32_t> sampled;       // T tokens sampled at options.temperature (when > 0)
};

std::vector<DenseReference> dense_references(Decoder& decoder,
                                             const std::vector<std::vector<int32_t>>& prefixes,
                                             const SurvivalOptions& options);

struct SurvivalRow {
  std::string selector;                   // as given
  std::vector<int64_t> first_divergence;  // per sample, in [0, T]
  double first_divergence_mean = 0;
  int64_t first_divergence_min = 0;
  bool identical = false;  // every sample followed the reference for all T tokens
  double tf_match = 0;     // top-1 agreement over the S * T teacher-forced predictions
  double nll_dense = 0, nll_sparse = 0;  // mean over the S * T reference tokens
  double ppl_dense = 0, ppl_sparse = 0;
  double delta_ppl_pct = 0;  // 100 (ppl_sparse / ppl_dense - 1)
  // Unique positions read per (prediction query, layer, KV head), and the visible positions.
  double support_mean = 0;
  int64_t support_max = 0;
  double context_mean = 0;
  // Certified selectors: max delta over the (query, layer, query head) measured; otherwise none.
  std::optional<double> bound_max;
  // Non-dense selectors: max of ||o_S - o|| / (2 max||v||) over the same queries.
  std::optional<double> measured_err_max;
  // Certified: queries whose measured error exceeds their own delta by more than float rounding
  // (n 2^-24 for n visible positions).
  int64_t bound_violations = 0;
  int64_t queries_measured = 0;  // (query, layer, query head) triples measured
  // Sampling agreement (options.temperature > 0): first step where the coupled samples differ,
  // per sample, in [0, T]; its mean; the share of steps where they agree.
  std::vector<int64_t> sampling_first_divergence;
  double sampling_first_divergence_mean = 0;
  std::optional<double> sampling_agreement;
  double seconds = 0;
};

// progress(samples done, samples)
using SurvivalProgress = std::function<void(int64_t done, int64_t total)>;

// One row of the table for one selector spec (docs/SELECTOR_SPECS.md; "dense" allowed). Throws
// visikv::Error for a bad spec. Leaves the decoder dense.
SurvivalRow survival_row(Decoder& decoder, std::span<const DenseReference> references,
                         const NamedSelectorSpec& selector, const SurvivalOptions& options,
                         const SurvivalProgress& progress = {});

}  // namespace visikv

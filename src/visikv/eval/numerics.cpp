#include "visikv/eval/numerics.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/saturating.h"
#include "visikv/eval/context_limit.h"
#include "visikv/kv/cache_factory.h"

namespace visikv {

namespace {

constexpr int64_t kChunk = 64;

// log-softmax of one row of logits, in double.
void log_softmax(std::span<const float> logits, std::vector<double>& out) {
  out.resize(logits.size());
  const double peak = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float v : logits) sum += std::exp(double{v} - peak);
  const double log_sum = peak + std::log(sum);
  for (size_t i = 0; i < logits.size(); ++i) out[i] = double{logits[i]} - log_sum;
}

}  // namespace

int64_t numerics_text_tokens(int64_t positions, int64_t window, bool bos) {
  require(positions >= 0 && window >= 2, "numerics_text_tokens: ", positions,
          " positions in windows of ", window);
  // A window compares window - 1 positions, with BOS first or without.
  const int64_t windows = positions / (window - 1) + (positions % (window - 1) != 0);
  const int64_t text_per_window = bos ? window - 1 : window;
  return saturating_mul(windows, text_per_window);
}

NumericsAgreement compare_numerics(const Model& model, std::span<const int32_t> text,
                                   int64_t window, int64_t max_positions, ProductRounding reference,
                                   ProductRounding candidate, std::optional<int32_t> bos) {
  require(window >= 2, "compare_numerics: window must be at least 2 tokens, not ", window);
  check_context(model.config(), window, str_cat("a window of ", window, " tokens"));
  Decoder decoders[2] = {Decoder(model), Decoder(model)};
  decoders[0].set_product_rounding(reference);
  decoders[1].set_product_rounding(candidate);
  const int64_t vocab = model.config().vocab_size;
  std::unique_ptr<KVCache> caches[2] = {
      make_cache(decoders[0].cache_shape(), "f32", "f32", window),
      make_cache(decoders[1].cache_shape(), "f32", "f32", window)};
  std::vector<float> logits[2] = {std::vector<float>(kChunk * vocab),
                                  std::vector<float>(kChunk * vocab)};
  std::vector<double> log_p, log_q;
  NumericsAgreement result;
  double kl_sum = 0, agree = 0, nll[2] = {0, 0};
  const int64_t text_per_window = bos ? window - 1 : window;
  std::vector<int32_t> tokens;
  for (int64_t start = 0; start + 1 < static_cast<int64_t>(text.size()) &&
                          (max_positions == 0 || result.positions < max_positions);
       start += text_per_window) {
    tokens.clear();
    if (bos) tokens.push_back(*bos);
    const int64_t len = std::min<int64_t>(text_per_window, text.size() - start);
    tokens.insert(tokens.end(), text.begin() + start, text.begin() + start + len);
    for (auto& cache : caches) cache->clear();
    for (int64_t first = 0; first + 1 < static_cast<int64_t>(tokens.size()); first += kChunk) {
      const int64_t count = std::min<int64_t>(kChunk, tokens.size() - first);
      for (int side = 0; side < 2; ++side)
        decoders[side].forward({tokens.data() + first, static_cast<size_t>(count)}, *caches[side],
                               LogitRows::All,
                               [&](int64_t row, int64_t rows, std::span<const float> values) {
                                 std::copy(values.begin(), values.begin() + rows * vocab,
                                           logits[side].begin() + row * vocab);
                               });
      for (int64_t r = 0; r < count && first + r + 1 < static_cast<int64_t>(tokens.size()); ++r) {
        if (max_positions > 0 && result.positions >= max_positions) break;
        const std::span<const float> p(logits[0].data() + r * vocab, vocab);
        const std::span<const float> q(logits[1].data() + r * vocab, vocab);
        log_softmax(p, log_p);
        log_softmax(q, log_q);
        double kl = 0;
        for (int64_t v = 0; v < vocab; ++v) kl += std::exp(log_p[v]) * (log_p[v] - log_q[v]);
        kl_sum += kl;
        result.max_kl = std::max(result.max_kl, kl);
        agree += std::max_element(p.begin(), p.end()) - p.begin() ==
                 std::max_element(q.begin(), q.end()) - q.begin();
        const int32_t next = tokens[first + r + 1];
        nll[0] -= log_p[next];
        nll[1] -= log_q[next];
        ++result.positions;
      }
    }
  }
  require(result.positions > 0, "compare_numerics: the text has no position to score");
  const double n = static_cast<double>(result.positions);
  result.mean_kl = kl_sum / n;
  result.top1_agreement = agree / n;
  result.reference_nll = nll[0] / n;
  result.candidate_nll = nll[1] / n;
  return result;
}

}  // namespace visikv

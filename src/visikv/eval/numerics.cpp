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

}  // namespace

int64_t numerics_text_tokens(int64_t positions, int64_t window, bool bos) {
  require(positions >= 0 && window >= 2, "numerics_text_tokens: ", positions,
          " positions in windows of ", window);
  // A window compares window - 1 positions, with BOS first or without.
  const int64_t windows = positions / (window - 1) + (positions % (window - 1) != 0);
  const int64_t text_per_window = bos ? window - 1 : window;
  return saturating_mul(windows, text_per_window);
}

std::vector<NumericsAgreement> compare_numerics(const Model& model, std::span<const int32_t> text,
                                                int64_t window, int64_t max_positions,
                                                ProductRounding reference,
                                                std::span<const ProductRounding> candidates,
                                                std::optional<int32_t> bos,
                                                const Progress& progress) {
  require(window >= 2, "compare_numerics: window must be at least 2 tokens, not ", window);
  require(!candidates.empty(), "compare_numerics: no candidate to compare");
  check_context(model.config(), window, str_cat("a window of ", window, " tokens"));
  // Side 0 is the reference, side 1 + c candidate c.
  const size_t sides = candidates.size() + 1;
  std::vector<Decoder> decoders;
  std::vector<std::unique_ptr<KVCache>> caches;
  std::vector<std::vector<float>> logits;
  const int64_t vocab = model.config().vocab_size;
  for (size_t side = 0; side < sides; ++side) {
    decoders.emplace_back(model);
    decoders.back().set_product_rounding(side == 0 ? reference : candidates[side - 1]);
    caches.push_back(make_cache(decoders.back().cache_shape(), "f32", "f32", window));
    logits.emplace_back(kChunk * vocab);
  }
  // Positions to compare, for progress: whole windows up to max_positions.
  const int64_t text_per_window = bos ? window - 1 : window;
  int64_t total = 0;
  for (int64_t start = 0; start + 1 < static_cast<int64_t>(text.size()); start += text_per_window)
    total += std::min<int64_t>(text_per_window, text.size() - start) - (bos ? 0 : 1);
  if (max_positions > 0) total = std::min(total, max_positions);
  std::vector<DivergenceAccumulator> divergence(candidates.size());
  int64_t positions = 0;
  std::vector<double> nll(sides, 0.0);
  std::vector<int32_t> tokens;
  for (int64_t start = 0; start + 1 < static_cast<int64_t>(text.size()) &&
                          (max_positions == 0 || positions < max_positions);
       start += text_per_window) {
    tokens.clear();
    if (bos) tokens.push_back(*bos);
    const int64_t len = std::min<int64_t>(text_per_window, text.size() - start);
    tokens.insert(tokens.end(), text.begin() + start, text.begin() + start + len);
    for (auto& cache : caches) cache->clear();
    for (int64_t first = 0; first + 1 < static_cast<int64_t>(tokens.size()); first += kChunk) {
      const int64_t count = std::min<int64_t>(kChunk, tokens.size() - first);
      for (size_t side = 0; side < sides; ++side)
        decoders[side].forward({tokens.data() + first, static_cast<size_t>(count)}, *caches[side],
                               LogitRows::All,
                               [&](int64_t row, int64_t rows, std::span<const float> values) {
                                 std::copy(values.begin(), values.begin() + rows * vocab,
                                           logits[side].begin() + row * vocab);
                               });
      // Rows that predict a token of this window, up to max_positions.
      int64_t rows = std::min<int64_t>(count, static_cast<int64_t>(tokens.size()) - first - 1);
      if (max_positions > 0) rows = std::min(rows, max_positions - positions);
      if (rows <= 0) break;
      for (size_t c = 0; c < candidates.size(); ++c)
        divergence[c].add({logits[0].data(), static_cast<size_t>(rows * vocab)},
                          {logits[c + 1].data(), static_cast<size_t>(rows * vocab)}, rows);
      for (int64_t r = 0; r < rows; ++r)
        for (size_t side = 0; side < sides; ++side)
          nll[side] += negative_log_likelihood(
              {logits[side].data() + r * vocab, static_cast<size_t>(vocab)}, tokens[first + r + 1]);
      positions += rows;
      if (progress) progress(positions, total);
    }
  }
  require(positions > 0, "compare_numerics: the text has no position to score");
  std::vector<NumericsAgreement> results(candidates.size());
  for (size_t c = 0; c < candidates.size(); ++c) {
    results[c].divergence = divergence[c].summary();
    results[c].reference_nll = nll[0] / static_cast<double>(positions);
    results[c].candidate_nll = nll[c + 1] / static_cast<double>(positions);
  }
  return results;
}

NumericsAgreement compare_numerics(const Model& model, std::span<const int32_t> text,
                                   int64_t window, int64_t max_positions, ProductRounding reference,
                                   ProductRounding candidate, std::optional<int32_t> bos,
                                   const Progress& progress) {
  return compare_numerics(model, text, window, max_positions, reference, {&candidate, 1}, bos,
                          progress)[0];
}

}  // namespace visikv

#include "visikv/eval/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/calibration/headq_basis.h"
#include "visikv/core/error.h"
#include "visikv/core/saturating.h"
#include "visikv/eval/context_limit.h"
#include "visikv/kv/cache_factory.h"

namespace visikv {

PerplexityMode perplexity_mode_from_name(const std::string& name) {
  if (name == "prefill") return PerplexityMode::Prefill;
  if (name == "decode") return PerplexityMode::Decode;
  if (name == "decode-batched") return PerplexityMode::DecodeBatched;
  fail("unknown perplexity mode '", name, "' (expected prefill, decode or decode-batched)");
}

std::string perplexity_mode_name(PerplexityMode mode) {
  switch (mode) {
    case PerplexityMode::Prefill:
      return "prefill";
    case PerplexityMode::Decode:
      return "decode";
    case PerplexityMode::DecodeBatched:
      return "decode-batched";
  }
  fail("unknown perplexity mode");
}

int64_t text_tokens_to_score(int64_t scored, int64_t window) {
  require(scored >= 0 && window >= 2, "text_tokens_to_score: ", scored, " tokens in windows of ",
          window);
  return saturating_add(scored, scored / (window - 1) + 2);  // --tokens may be any number
}

double negative_log_likelihood(std::span<const float> logits, int32_t target) {
  require(target >= 0 && target < static_cast<int64_t>(logits.size()), "target token ", target,
          " outside the logits");
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
  return std::log(sum) + max - logits[target];
}

void check_perplexity_options(const Config& config, const PerplexityOptions& o) {
  require(o.window >= 2, "perplexity window must be at least 2 tokens, got ", o.window);
  require(o.max_tokens >= 0, "--tokens must not be negative");
  // Positions past the model's context would run on RoPE angles or position embeddings it never
  // saw (or past its table): refuse instead of reporting a perplexity of a model that does not
  // exist.
  check_context(config, o.window, str_cat("a perplexity window of ", o.window, " tokens"));
}

PerplexityResult perplexity(Decoder& decoder, std::span<const int32_t> text,
                            const PerplexityOptions& o, const Progress& progress) {
  check_perplexity_options(decoder.model().config(), o);
  const int64_t text_per_window = o.bos ? o.window - 1 : o.window;
  const int64_t scored_per_window = o.window - 1;

  // How many tokens will be scored in total, for progress and the --tokens limit.
  int64_t total = 0;
  for (int64_t start = 0; start < static_cast<int64_t>(text.size()); start += text_per_window) {
    const int64_t len = std::min<int64_t>(text_per_window, text.size() - start);
    total += o.bos ? len : std::max<int64_t>(0, len - 1);
  }
  if (o.max_tokens > 0) total = std::min(total, o.max_tokens);
  require(total > 0, "nothing to score: the text has ", text.size(), " tokens");

  const auto started = std::chrono::steady_clock::now();
  const SelectorSpec& selector_spec = o.selector;
  // The cache keeps its block summaries at the selector's block size.
  auto cache =
      make_cache(decoder.cache_shape(), o.key_codec, o.value_codec, o.window,
                 selector_spec.block_size > 0 ? selector_spec.block_size : 32, o.headq_basis);
  std::unique_ptr<Support> selector;
  if (selector_spec.kind != SelectorKind::Dense) selector = make_support(selector_spec);
  // The caller's decoder gets its product rounding back, also by an exception.
  struct RestoreOnExit {
    Decoder& decoder;
    ProductRounding rounding;
    ~RestoreOnExit() { decoder.set_product_rounding(rounding); }
  } restore{decoder, decoder.product_rounding()};
  // Chunks of decode order must round as single tokens do, or a quantizing cache may store a
  // different code for a key than token-by-token decode stores.
  if (o.mode == PerplexityMode::DecodeBatched)
    decoder.set_product_rounding(ProductRounding::PerToken);
  double support_sum = 0, context_sum = 0;
  int64_t support_count = 0;
  const AttentionOptions attention{
      .support = selector.get(),
      .support_stats = [&](int64_t, std::span<const SparseQueryStats> stats) {
        for (const SparseQueryStats& s : stats) support_sum += static_cast<double>(s.support);
        support_count += static_cast<int64_t>(stats.size());
      }};
  const Config& config = decoder.model().config();
  // The positions a query at `row` sees, averaged over the layers (local layers see their
  // window): what a support's size is compared with.
  const auto mean_context = [&](int64_t row) {
    double sum = 0;
    for (int64_t l = 0; l < config.layers; ++l)
      sum += static_cast<double>(visible_positions(row, config.layer_window(l)).size());
    return sum / static_cast<double>(config.layers);
  };
  PerplexityResult result;
  double nll_sum = 0.0;
  std::vector<int32_t> window;
  for (int64_t start = 0; result.tokens < total; start += text_per_window) {
    const int64_t len = std::min<int64_t>(text_per_window, text.size() - start);
    window.clear();
    if (o.bos) window.push_back(*o.bos);
    window.insert(window.end(), text.begin() + start, text.begin() + start + len);
    // Predictions: logits of row r score window[r + 1], for r < scored.
    const int64_t scored = std::min<int64_t>(
        {static_cast<int64_t>(window.size()) - 1, scored_per_window, total - result.tokens});
    cache->clear();
    if (selector) selector->reset();
    auto score_rows = [&](int64_t first_row, int64_t rows, std::span<const float> logits) {
      const int64_t vocab = static_cast<int64_t>(logits.size()) / rows;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = first_row + r;
        if (row >= scored) continue;
        nll_sum += negative_log_likelihood(logits.subspan(r * vocab, vocab), window[row + 1]);
        context_sum += mean_context(row);
        ++result.tokens;
      }
      if (progress) progress(result.tokens, total);
    };
    const std::span<const int32_t> needed(window.data(), static_cast<size_t>(scored));
    if (o.mode == PerplexityMode::Prefill) {
      decoder.forward(needed, *cache, LogitRows::All, score_rows, attention);
    } else {
      for (int64_t t = 0; t < scored;) {
        // Selectors keep state across steps, so sparse runs go one token at a time.
        const int64_t chunk = o.mode == PerplexityMode::DecodeBatched && !selector
                                  ? std::min(scored - t, decode_order_chunk(*cache))
                                  : 1;
        decoder.forward(
            needed.subspan(t, chunk), *cache, LogitRows::All,
            [&](int64_t first_row, int64_t rows, std::span<const float> logits) {
              score_rows(t + first_row, rows, logits);
            },
            attention);
        t += chunk;
      }
    }
    ++result.windows;
  }
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  result.context_mean = context_sum / static_cast<double>(result.tokens);
  result.support_mean =
      support_count > 0 ? support_sum / static_cast<double>(support_count) : result.context_mean;
  result.nll = nll_sum / static_cast<double>(result.tokens);
  result.ppl = std::exp(result.nll);
  result.tokens_per_s = result.tokens / std::max(result.seconds, 1e-9);
  return result;
}

}  // namespace visikv

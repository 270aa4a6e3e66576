#include "visikv/eval/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/calibration/headq_basis.h"
#include "visikv/core/error.h"
#include "visikv/core/saturating.h"
#include "visikv/core/vec.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/logit_store.h"
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
  return vec::log_sum_exp(logits) - logits[target];
}

void check_perplexity_options(const Config& config, const PerplexityOptions& o) {
  require(o.window >= 2, "perplexity window must be at least 2 tokens, got ", o.window);
  require(o.max_tokens >= 0, "--tokens must not be negative");
  // Positions past the model's context would run on RoPE angles or position embeddings it never
  // saw (or past its table): refuse instead of reporting a perplexity of a model that does not
  // exist.
  check_context(config, o.window, str_cat("a perplexity window of ", o.window, " tokens"));
}

namespace {

// Rows of reference logits held at a time, and the prefill pieces of a run with a reference.
// Larger pieces hold more memory (vocab x 4 bytes a row); smaller ones cost more forward calls,
// each with its thread barriers per layer: at 64 a reference made decode-batched 3x slower on
// a loaded 2-core machine, at 256 2.2x (two forward passes and the KL are 2x and a little).
constexpr int64_t kReferenceChunk = 256;

// One model run over the windows of a text: the decoder, its cache and its selector.
class WindowRun {
 public:
  WindowRun(Decoder& decoder, const KeyCodecSpec& keys, const ValueCodecSpec& values,
            const SelectorSpec& selector, const PerplexityOptions& o)
      : decoder_(decoder),
        // The cache keeps its block summaries at the selector's block size.
        cache_(make_cache(decoder.cache_shape(), keys, values, o.window,
                          selector.cache_block_size(), o.headq_basis)),
        mode_(o.mode) {
    if (selector.kind != SelectorKind::Dense) selector_ = make_support(selector);
    prepare_summaries(*cache_, selector, o.headq_basis);
  }

  void start_window() {
    cache_->clear();
    if (selector_) selector_->reset();
  }

  // Tokens the next forward may take from row t of a window that scores `scored` rows, at most
  // `limit` (all of them in one prefill).
  int64_t chunk(int64_t t, int64_t scored, int64_t limit) const {
    const int64_t left = std::min(scored - t, limit);
    if (mode_ == PerplexityMode::Prefill) return left;
    // Selectors keep state across steps, so sparse runs go one token at a time.
    if (mode_ == PerplexityMode::Decode || selector_) return 1;
    return std::min(left, decode_order_chunk(*cache_));
  }

  void forward(std::span<const int32_t> tokens, const LogitsSink& sink,
               const SupportStatsSink& stats = {}) {
    decoder_.forward(tokens, *cache_, LogitRows::All, sink,
                     {.support = selector_.get(), .support_stats = stats});
  }

 private:
  Decoder& decoder_;
  std::unique_ptr<KVCache> cache_;
  std::unique_ptr<Support> selector_;
  PerplexityMode mode_;
};

// The reference run of the current window, a chunk ahead of the scored run: rows are asked for
// in order, and each chunk of its logits is kept until the scored run has passed it.
class ReferenceRows {
 public:
  ReferenceRows(const Model& model, ProductRounding rounding, const ReferenceRun& reference,
                const PerplexityOptions& o)
      : decoder_(model),
        run_(decoder_, reference.key_codec, reference.value_codec, reference.selector, o),
        vocab_(model.config().vocab_size) {
    decoder_.set_product_rounding(rounding);  // the scored run's
  }

  void start_window(std::span<const int32_t> window, int64_t scored) {
    run_.start_window();
    window_ = window;
    scored_ = scored;
    begin_ = end_ = 0;
  }

  // Logits of rows [row, row + n) of the window, n shortened to the rows held together.
  std::span<const float> rows(int64_t row, int64_t& n) {
    if (row >= end_) advance();
    require(row >= begin_ && row < end_, "reference rows asked for out of order");
    n = std::min(n, end_ - row);
    return {logits_.data() + (row - begin_) * vocab_, static_cast<size_t>(n * vocab_)};
  }

  double nll_sum() const { return nll_sum_; }

 private:
  void advance() {
    begin_ = end_;
    const int64_t chunk = run_.chunk(begin_, scored_, kReferenceChunk);
    logits_.resize(static_cast<size_t>(chunk * vocab_));
    run_.forward(window_.subspan(begin_, chunk),
                 [&](int64_t first_row, int64_t rows, std::span<const float> logits) {
                   std::copy(logits.begin(), logits.begin() + rows * vocab_,
                             logits_.begin() + first_row * vocab_);
                   for (int64_t r = 0; r < rows; ++r)
                     nll_sum_ += negative_log_likelihood(logits.subspan(r * vocab_, vocab_),
                                                         window_[begin_ + first_row + r + 1]);
                 });
    end_ = begin_ + chunk;
  }

  Decoder decoder_;
  WindowRun run_;
  int64_t vocab_;
  std::span<const int32_t> window_;
  int64_t scored_ = 0, begin_ = 0, end_ = 0;
  std::vector<float> logits_;
  double nll_sum_ = 0;
};

}  // namespace

void check_decode_order_products(const Decoder& decoder, PerplexityMode mode) {
  const ProductRounding rounding = decoder.product_rounding();
  const bool exact = rounding == ProductRounding::Fastest || rounding == ProductRounding::PerToken;
  require(mode != PerplexityMode::DecodeBatched || exact ||
              decoder.products_independent_of_token_count(),
          "decode-batched order with int8 or int16 products needs GGUF block weights in every "
          "matrix (float ones go through sgemm, which rounds by the chunk): use exact products or "
          "decode order");
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
  WindowRun run(decoder, o.key_codec, o.value_codec, o.selector, o);
  // The caller's decoder gets its product rounding back, also by an exception.
  struct RestoreOnExit {
    Decoder& decoder;
    ProductRounding rounding;
    ~RestoreOnExit() { decoder.set_product_rounding(rounding); }
  } restore{decoder, decoder.product_rounding()};
  // Chunks of decode order must round as single tokens do, or a quantizing cache may store a
  // different code for a key than token-by-token decode stores: exact products go per token, and
  // int8/int16 products are kept where they do (block weights) and refused where they do not.
  check_decode_order_products(decoder, o.mode);
  if (o.mode == PerplexityMode::DecodeBatched &&
      decoder.product_rounding() == ProductRounding::Fastest)
    decoder.set_product_rounding(ProductRounding::PerToken);
  require(!(o.reference && o.reference_logits),
          "perplexity: a reference run and recorded reference logits given together");
  std::optional<ReferenceRows> reference;
  if (o.reference) reference.emplace(decoder.model(), decoder.product_rounding(), *o.reference, o);
  const int64_t vocab_size = decoder.model().config().vocab_size;
  for (const LogitStore* store :
       {static_cast<const LogitStore*>(o.record_logits), o.reference_logits})
    require(store == nullptr || store->vocab() == vocab_size, "perplexity: a logit store of ",
            store ? store->vocab() : 0, " logits per row for a model of ", vocab_size);
  if (o.reference_logits)
    require(o.reference_logits->rows() >= total, "perplexity: the recorded reference holds ",
            o.reference_logits->rows(), " rows, ", total, " are scored");
  if (o.record_logits)
    require(o.record_logits->rows() == 0, "perplexity: the logit store to record into holds ",
            o.record_logits->rows(), " rows already");
  std::vector<float> recorded;  // rows read back from o.reference_logits
  double recorded_nll_sum = 0;
  DivergenceAccumulator divergence;
  // Prefill pieces as long as a side-by-side reference's, so that equal codecs compute equal bits
  // whether the reference runs beside this run or was recorded by one.
  const bool compared = reference || o.reference_logits || o.record_logits;
  const int64_t limit = compared && o.mode == PerplexityMode::Prefill ? kReferenceChunk : INT64_MAX;
  double support_sum = 0, context_sum = 0;
  int64_t support_count = 0;
  const SupportStatsSink support_stats = [&](int64_t, std::span<const SparseQueryStats> stats) {
    for (const SparseQueryStats& s : stats) support_sum += static_cast<double>(s.support);
    support_count += static_cast<int64_t>(stats.size());
  };
  const Config& config = decoder.model().config();
  // The positions a query at `row` sees, averaged over the layers (local layers see their
  // window): what a support's size is compared with.
  const auto mean_context = [&](int64_t row) {
    double sum = 0;
    for (int64_t l = 0; l < config.layers; ++l)
      sum += static_cast<double>(visible_positions(row, config.layer_window(l)).size());
    return sum / static_cast<double>(config.layers);
  };
  if (progress) progress(0, total);  // started: a long first chunk is not counted as idle
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
    run.start_window();
    if (reference) reference->start_window(window, scored);
    const std::span<const int32_t> needed(window.data(), static_cast<size_t>(scored));
    for (int64_t t = 0; t < scored;) {
      const int64_t chunk = run.chunk(t, scored, limit);
      run.forward(
          needed.subspan(t, chunk),
          [&](int64_t first_row, int64_t rows, std::span<const float> logits) {
            const int64_t vocab = static_cast<int64_t>(logits.size()) / rows;
            const int64_t first = t + first_row, valid = std::min(rows, scored - first);
            for (int64_t r = 0; r < valid; ++r) {
              nll_sum +=
                  negative_log_likelihood(logits.subspan(r * vocab, vocab), window[first + r + 1]);
              context_sum += mean_context(first + r);
            }
            for (int64_t r = 0; reference && r < valid;) {
              int64_t n = valid - r;
              const std::span<const float> ref = reference->rows(first + r, n);
              divergence.add(ref, logits.subspan(r * vocab, n * vocab), n);
              r += n;
            }
            if (o.record_logits && valid > 0)
              o.record_logits->append(logits.subspan(0, valid * vocab));
            if (o.reference_logits && valid > 0) {
              recorded.resize(static_cast<size_t>(valid * vocab));
              o.reference_logits->read(result.tokens, valid, recorded);
              for (int64_t r = 0; r < valid; ++r)
                recorded_nll_sum += negative_log_likelihood(
                    std::span<const float>(recorded).subspan(r * vocab, vocab),
                    window[first + r + 1]);
              divergence.add(recorded, logits.subspan(0, valid * vocab), valid);
            }
            result.tokens += std::max<int64_t>(valid, 0);
            if (progress) progress(result.tokens, total);
          },
          support_stats);
      t += chunk;
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
  if (reference || o.reference_logits) {
    result.divergence = divergence.summary();
    result.reference_nll =
        (reference ? reference->nll_sum() : recorded_nll_sum) / static_cast<double>(result.tokens);
    result.reference_ppl = std::exp(*result.reference_nll);
  }
  return result;
}

}  // namespace visikv

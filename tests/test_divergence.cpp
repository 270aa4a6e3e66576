// KL beside perplexity (eval/divergence.h, PerplexityOptions::reference) on the tiny Llama
// fixture: a run against a reference of its own codecs is exactly 0 in every mode, and a
// compressed run's figures equal an independent computation from the two models' logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/eval/divergence.h"
#include "visikv/eval/perplexity.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using test_support::error_of;

const std::string kModel = std::string(VISIKV_FIXTURES) + "/models/llama";

struct Fixture {
  Model model = Model::load(kModel);
  std::vector<int32_t> text;
  Fixture() {
    const std::string words = test_support::kEnglishText + test_support::kEnglishText;
    text = model.tokenizer().encode(words, /*add_special=*/false);
  }
};

const Fixture& fixture() {
  static const Fixture instance;
  return instance;
}

PerplexityOptions options(PerplexityMode mode, const std::string& keys) {
  PerplexityOptions o;
  o.mode = mode;
  o.window = 40;
  o.max_tokens = 70;  // two windows, the second partly
  o.key_codec = parse_key_codec_spec(keys);
  o.bos = fixture().model.tokenizer().bos_id();
  return o;
}

TEST(Divergence, ARunAgainstItsOwnCodecsIsExactlyZero) {
  const Fixture& f = fixture();
  Decoder decoder(f.model);
  for (const PerplexityMode mode :
       {PerplexityMode::Prefill, PerplexityMode::Decode, PerplexityMode::DecodeBatched}) {
    for (const std::string keys : {"f32", "int2:g16:tok"}) {
      PerplexityOptions o = options(mode, keys);
      o.reference = ReferenceRun{o.key_codec};
      const PerplexityResult r = perplexity(decoder, f.text, o);
      ASSERT_TRUE(r.divergence.has_value());
      EXPECT_EQ(r.divergence->positions, r.tokens) << keys;
      EXPECT_EQ(r.divergence->kl_mean, 0.0) << keys;
      EXPECT_EQ(r.divergence->kl_max, 0.0) << keys;
      EXPECT_EQ(r.divergence->top1_agreement, 1.0) << keys;
      EXPECT_EQ(*r.reference_nll, r.nll) << keys;
    }
  }
  // Without a reference there is nothing to compare.
  EXPECT_FALSE(perplexity(decoder, f.text, options(PerplexityMode::Prefill, "f32")).divergence);
}

// Next-token log-probabilities of the whole text, token by token through a cache of `keys`, in
// windows as perplexity() cuts them.
std::vector<std::vector<double>> log_probs(const std::string& keys, int64_t window,
                                           int64_t positions) {
  const Fixture& f = fixture();
  Decoder decoder(f.model);
  auto cache = make_cache(decoder.cache_shape(), keys, "f32", window);
  std::vector<std::vector<double>> out;
  const int32_t bos = *f.model.tokenizer().bos_id();
  for (size_t start = 0; static_cast<int64_t>(out.size()) < positions; start += window - 1) {
    cache->clear();
    std::vector<int32_t> tokens = {bos};
    tokens.insert(tokens.end(), f.text.begin() + start, f.text.begin() + start + window - 1);
    for (int64_t t = 0; t + 1 < window && static_cast<int64_t>(out.size()) < positions; ++t) {
      const std::vector<float> logits = decoder.next_logits({&tokens[t], 1}, *cache);
      // log-softmax in long double, directly from the definition.
      long double top = *std::max_element(logits.begin(), logits.end()), sum = 0;
      for (float x : logits) sum += std::exp(static_cast<long double>(x) - top);
      std::vector<double> lp(logits.size());
      for (size_t i = 0; i < logits.size(); ++i)
        lp[i] = static_cast<double>(logits[i] - top - std::log(sum));
      out.push_back(std::move(lp));
    }
  }
  return out;
}

TEST(Divergence, CompressedKeysMatchAnIndependentComputation) {
  const Fixture& f = fixture();
  Decoder decoder(f.model);
  PerplexityOptions o = options(PerplexityMode::Decode, "int2:g16:tok");
  o.reference = ReferenceRun{};  // f32, dense
  const PerplexityResult r = perplexity(decoder, f.text, o);
  ASSERT_TRUE(r.divergence.has_value());
  const DivergenceSummary& d = *r.divergence;

  const auto p = log_probs("f32", o.window, r.tokens);
  const auto q = log_probs("int2:g16:tok", o.window, r.tokens);
  std::vector<double> kl;
  int64_t agree = 0;
  for (size_t t = 0; t < p.size(); ++t) {
    double sum = 0;
    for (size_t i = 0; i < p[t].size(); ++i) sum += std::exp(p[t][i]) * (p[t][i] - q[t][i]);
    kl.push_back(sum);
    agree += std::max_element(p[t].begin(), p[t].end()) - p[t].begin() ==
             std::max_element(q[t].begin(), q[t].end()) - q[t].begin();
  }
  double mean = 0;
  for (double x : kl) mean += x / static_cast<double>(kl.size());
  std::vector<double> sorted = kl;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(d.positions, 70);
  EXPECT_GT(d.kl_mean, 1e-3);  // 2-bit keys move the predictions of a random model
  EXPECT_NEAR(d.kl_mean, mean, 1e-9 * mean);
  EXPECT_NEAR(d.kl_p99, sorted[static_cast<size_t>(0.99 * 69)], 1e-9 * sorted.back());
  EXPECT_NEAR(d.kl_max, sorted.back(), 1e-9 * sorted.back());
  EXPECT_EQ(d.top1_agreement, static_cast<double>(agree) / 70);
  EXPECT_LE(d.kl_p99, d.kl_max);

  // Decode-batched computes decode's bits, with the reference in chunks of its own.
  o.mode = PerplexityMode::DecodeBatched;
  const PerplexityResult batched = perplexity(decoder, f.text, o);
  EXPECT_EQ(batched.divergence->kl_mean, d.kl_mean);
  EXPECT_EQ(batched.divergence->kl_p99, d.kl_p99);
  EXPECT_EQ(batched.divergence->top1_agreement, d.top1_agreement);
}

TEST(Divergence, AccumulatorRejectsRaggedRowsAndEmptySummaries) {
  DivergenceAccumulator a;
  EXPECT_NE(error_of([&] { a.summary(); }).find("no position compared"), std::string::npos);
  const std::vector<float> three(3), four(4);
  EXPECT_NE(error_of([&] { a.add(three, four, 1); }).find("not 1 equal rows"), std::string::npos);
  EXPECT_NE(error_of([&] { a.add(three, three, 2); }).find("not 2 equal rows"), std::string::npos);
}

}  // namespace
}  // namespace visikv

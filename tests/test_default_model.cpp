// The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against an independent implementation:
// Hugging Face transformers loading the same GGUF (tests/fixtures/models/smollm2_ref, made by
// scripts/reference_default_model.py). Top-1 agreement >= 99% and mean KL(ref || ours) <= 1e-3
// over 512 WikiText-103 positions; prefill and decode agree.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "test_support.h"
#include "visikv/core/mapped_file.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/perplexity.h"
#include "visikv/eval/sampler.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

const std::filesystem::path kReference =
    std::filesystem::path(VISIKV_FIXTURES) / "models" / "smollm2_ref";

const Model& default_model() {
  static const Model model = [] {
    const auto path = Model::default_model_path();
    if (!std::filesystem::exists(path))
      ADD_FAILURE() << "the default model is missing at " << path << ": run scripts/setup.sh";
    return Model::load("default");
  }();
  return model;
}

std::vector<int32_t> reference_tokens() {
  std::ifstream in(kReference / "tokens.json");
  return nlohmann::json::parse(in).get<std::vector<int32_t>>();
}

std::vector<float> prefill_logits(const Model& model, std::span<const int32_t> tokens) {
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32, tokens.size());
  return decoder.all_logits(tokens, *cache);
}

TEST(DefaultModel, TokenizerMatchesReferenceOnWikiTextStart) {
  const std::vector<int32_t> expected = reference_tokens();
  const std::string text = read_text_file(default_test_text());
  // The first 512 tokens of the whole file, tokenized in one call as the reference did.
  const std::vector<int32_t> ids = default_model().tokenizer().encode(text.substr(0, 4096), true);
  ASSERT_GE(ids.size(), expected.size());
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + expected.size()), expected);
}

TEST(DefaultModel, LogitsAgreeWithTransformers) {
  const Model& model = default_model();
  const std::vector<int32_t> tokens = reference_tokens();
  const TopKAgreement a =
      topk_agreement(prefill_logits(model, tokens), model.config().vocab_size, kReference, 256);
  std::printf(
      "top-1 agreement %.4f, mean KL %.3g, max KL %.3g, max |dlogprob| (top-256) %.3g over %lld "
      "positions\n",
      a.top1, a.kl_mean, a.kl_max, a.logprob_diff_max, static_cast<long long>(a.positions));
  EXPECT_GE(a.top1, 0.99);
  EXPECT_LE(a.kl_mean, 1e-3);
}

TEST(DefaultModel, DecodeMatchesPrefill) {
  const Model& model = default_model();
  std::vector<int32_t> tokens = reference_tokens();
  tokens.resize(96);
  const int64_t vocab = model.config().vocab_size;
  const std::vector<float> prefill = prefill_logits(model, tokens);
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32);
  double worst = 0;
  for (size_t t = 0; t < tokens.size(); ++t) {
    const std::vector<float> step = decoder.next_logits({&tokens[t], 1}, *cache);
    const std::span<const float> row(prefill.data() + t * vocab, vocab);
    EXPECT_EQ(argmax(step), argmax(row)) << "position " << t;
    for (int64_t i = 0; i < vocab; ++i) worst = std::max(worst, double(std::abs(step[i] - row[i])));
  }
  EXPECT_LT(worst, 2e-3);
}

TEST(DefaultModel, PerplexityModesAgree) {
  const Model& model = default_model();
  const std::vector<int32_t> tokens = reference_tokens();
  Decoder decoder(model);
  PerplexityOptions options;
  options.window = 128;
  options.max_tokens = 200;  // two windows, the second one partial
  const PerplexityResult prefill = perplexity(decoder, tokens, options);
  options.mode = PerplexityMode::Decode;
  const PerplexityResult decode = perplexity(decoder, tokens, options);
  EXPECT_EQ(prefill.tokens, 200);
  EXPECT_EQ(decode.tokens, 200);
  EXPECT_EQ(prefill.windows, 2);
  EXPECT_NEAR(prefill.nll, decode.nll, 1e-4);
  // The reference's own log-probabilities of the same next tokens (first window of 128).
  const auto target = read_raw<float>(kReference / "target_logprobs.f32");
  options.max_tokens = 127;
  options.window = 512;
  const PerplexityResult first = perplexity(decoder, tokens, options);
  double reference_nll = 0;
  for (int i = 0; i < 127; ++i) reference_nll -= target[i];
  EXPECT_NEAR(first.nll, reference_nll / 127, 2e-3);
}

}  // namespace
}  // namespace visikv

namespace visikv {
namespace {

// K-only decode perplexity through the codec factory with dense codecs is the engine's dense
// perplexity exactly; quantized keys read their stored form and cost perplexity.
TEST(DefaultModel, DenseCodecsGiveTheDensePerplexityExactly) {
  const Model& model = default_model();
  const std::vector<int32_t> tokens = reference_tokens();
  Decoder decoder(model);
  PerplexityOptions options;
  options.mode = PerplexityMode::Decode;
  options.window = 64;
  options.max_tokens = 63;
  const PerplexityResult dense = perplexity(decoder, tokens, options);
  options.key_codec = parse_key_codec_spec("f32");
  options.value_codec = parse_value_codec_spec("f32");
  options.selector = parse_selector_spec(
      "sparse:a64:w64:k64:exact");  // covers the whole window: the dense support
  const PerplexityResult full_support = perplexity(decoder, tokens, options);
  EXPECT_EQ(dense.nll, full_support.nll);
  options.selector = parse_selector_spec("dense");
  options.key_codec = parse_key_codec_spec("int2:g64:tok");
  const PerplexityResult two_bit = perplexity(decoder, tokens, options);
  EXPECT_GT(two_bit.nll, dense.nll);
}

}  // namespace
}  // namespace visikv

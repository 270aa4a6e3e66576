// The generic decoder against Hugging Face transformers on tiny random checkpoints of every
// supported family (tests/fixtures/models, made by scripts/make_model_fixtures.py): prefill
// logits and token-by-token decode logits through the KV cache, max |Δlogit| <= 1e-4 relative
// to the logit scale.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "test_support.h"
#include "visikv/core/mapped_file.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

const std::filesystem::path kModels = std::filesystem::path(VISIKV_FIXTURES) / "models";

double max_abs_difference(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
  return worst;
}

class HfFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    dir_ = kModels / GetParam();
    ASSERT_TRUE(std::filesystem::exists(dir_ / "reference.json"))
        << dir_ << " has no reference.json; run scripts/make_model_fixtures.py";
    reference_ = read_json(dir_ / "reference.json");
    tokens_ = reference_.at("tokens").get<std::vector<int32_t>>();
    scale_ = reference_.at("logit_scale").get<double>();
  }
  std::filesystem::path dir_;
  nlohmann::json reference_;
  std::vector<int32_t> tokens_;
  double scale_ = 1;
};

TEST_P(HfFixture, PrefillLogitsMatchTransformers) {
  const Model model = Model::load(dir_.string());
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32);
  const std::vector<float> logits = decoder.all_logits(tokens_, *cache);
  const std::vector<float> expected = read_raw<float>(dir_ / "prefill_logits.f32");
  const double difference = max_abs_difference(logits, expected);
  std::printf("%s: max |dlogit| %.3g (logit scale %.3g)\n", GetParam().c_str(), difference, scale_);
  EXPECT_LE(difference, 1e-4 * scale_) << "logit scale " << scale_;
}

TEST_P(HfFixture, DecodeLogitsMatchTransformers) {
  const Model model = Model::load(dir_.string());
  Decoder decoder(model);
  const int64_t vocab = model.config().vocab_size;
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32);
  std::vector<float> logits;
  for (int32_t token : tokens_) {
    const std::vector<float> step = decoder.next_logits({&token, 1}, *cache);
    ASSERT_EQ(static_cast<int64_t>(step.size()), vocab);
    logits.insert(logits.end(), step.begin(), step.end());
  }
  const std::vector<float> expected = read_raw<float>(dir_ / "decode_logits.f32");
  EXPECT_LE(max_abs_difference(logits, expected), 1e-4 * scale_) << "logit scale " << scale_;
}

TEST_P(HfFixture, TokenizerMatchesTransformers) {
  if (!reference_.contains("text")) GTEST_FAIL() << "reference.json lacks the tokenizer check text";
  const Model model = Model::load(dir_.string());
  const auto expected = reference_.at("text_ids").get<std::vector<int32_t>>();
  EXPECT_EQ(model.tokenizer().encode(reference_.at("text").get<std::string>(), true), expected);
}

INSTANTIATE_TEST_SUITE_P(Families, HfFixture,
                         ::testing::Values("gpt2", "gpt_neox_parallel", "gpt_neox_sequential",
                                           "llama", "llama3_scaled", "mistral", "qwen2", "gemma3"));

}  // namespace
}  // namespace visikv

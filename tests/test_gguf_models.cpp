// The GGUF loading path (config_from_gguf, bind_gguf, Tokenizer::from_gguf_metadata) on tiny
// checkpoints of several families: tests/fixtures/models_gguf, converted from the Hugging Face
// fixtures in tests/fixtures/models by scripts/make_gguf_fixtures.py with the `gguf` package.
// Each file must give the logits Hugging Face transformers computes from the same stored weight
// values (max |Δlogit| <= 1e-4 of the logit scale), the same config as the Hugging Face
// directory, and the same token ids as the fixture's tokenizer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/mapped_file.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

const std::filesystem::path kFixtures(VISIKV_FIXTURES);
const std::filesystem::path kGgufDir = kFixtures / "models_gguf";
const std::filesystem::path kHfDir = kFixtures / "models";

double max_abs_difference(std::span<const float> a, std::span<const float> b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
  return worst;
}

// Logits for every position of `tokens` from one forward call (prefill).
std::vector<float> prefill(const Model& model, std::span<const int32_t> tokens) {
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32, tokens.size());
  return decoder.all_logits(tokens, *cache);
}

// The same logits, one token per forward call through the KV cache (decode).
std::vector<float> decode(const Model& model, std::span<const int32_t> tokens) {
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32);
  std::vector<float> logits;
  for (const int32_t token : tokens) {
    const std::vector<float> step = decoder.next_logits({&token, 1}, *cache);
    EXPECT_EQ(static_cast<int64_t>(step.size()), model.config().vocab_size);
    logits.insert(logits.end(), step.begin(), step.end());
  }
  return logits;
}

class GgufFixture : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(kGgufDir / "reference.json"))
        << kGgufDir << " has no reference.json; run scripts/make_gguf_fixtures.py";
    const nlohmann::json manifest = read_json(kGgufDir / "reference.json");
    for (const nlohmann::json& file : manifest.at("files"))
      if (file.at("file") == GetParam()) entry_ = file;
    ASSERT_TRUE(entry_.is_object()) << GetParam() << " is not listed in reference.json";
    tolerance_ =
        manifest.at("relative_tolerance").get<double>() * entry_.at("logit_scale").get<double>();
    gguf_path_ = kGgufDir / GetParam();
    fixture_dir_ = kHfDir / entry_.at("fixture").get<std::string>();
    fixture_ = read_json(fixture_dir_ / "reference.json");
    tokens_ = fixture_.at("tokens").get<std::vector<int32_t>>();
  }

  nlohmann::json entry_;    // this file's entry in models_gguf/reference.json
  nlohmann::json fixture_;  // the source fixture's reference.json
  double tolerance_ = 0;    // absolute, on logits
  std::filesystem::path gguf_path_, fixture_dir_;
  std::vector<int32_t> tokens_;
};

TEST_P(GgufFixture, LoadsAsGgufWithTheStoredTensorTypes) {
  const Model model = Model::load(gguf_path_.string());
  EXPECT_EQ(model.format(), "gguf");
  EXPECT_EQ(model.config().architecture, entry_.at("architecture").get<std::string>());
  // The matrices keep their stored type (no silent conversion): the test below then really runs
  // the F16 / Q8_0 kernels.
  const std::string type = entry_.at("matrix_type").get<std::string>();
  const LayerWeights& layer = model.weights().layers.at(0);
  for (const TensorRef* matrix :
       {&model.weights().token_embedding, &layer.q.weight, &layer.k.weight, &layer.v.weight,
        &layer.o.weight, &layer.down.weight})
    EXPECT_EQ(dtype_name(matrix->dtype), type) << matrix->name;
}

TEST_P(GgufFixture, ConfigMatchesTheHuggingFaceDirectory) {
  const Config gguf = Model::load(gguf_path_.string()).config();
  const Config hf = Model::load(fixture_dir_.string()).config();
  EXPECT_EQ(gguf.vocab_size, hf.vocab_size);
  EXPECT_EQ(gguf.hidden, hf.hidden);
  EXPECT_EQ(gguf.layers, hf.layers);
  EXPECT_EQ(gguf.heads, hf.heads);
  EXPECT_EQ(gguf.kv_heads, hf.kv_heads);
  EXPECT_EQ(gguf.head_dim, hf.head_dim);
  EXPECT_EQ(gguf.intermediate, hf.intermediate);
  EXPECT_EQ(gguf.max_positions, hf.max_positions);
  EXPECT_EQ(gguf.norm, hf.norm);
  // GGUF stores epsilon and rope base as float32.
  EXPECT_NEAR(gguf.norm_eps, hf.norm_eps, 1e-6 * hf.norm_eps);
  EXPECT_EQ(gguf.activation, hf.activation);
  EXPECT_EQ(gguf.gated_mlp, hf.gated_mlp);
  EXPECT_EQ(gguf.parallel_residual, hf.parallel_residual);
  EXPECT_EQ(gguf.qkv_bias, hf.qkv_bias);
  EXPECT_EQ(gguf.out_bias, hf.out_bias);
  EXPECT_EQ(gguf.mlp_bias, hf.mlp_bias);
  EXPECT_EQ(gguf.tied_embeddings, hf.tied_embeddings);
  EXPECT_EQ(gguf.positions, hf.positions);
  if (hf.positions == PositionKind::Rotary) {
    EXPECT_NEAR(gguf.rope_theta, hf.rope_theta, 1e-6 * hf.rope_theta);
    EXPECT_EQ(gguf.rotary_dim, hf.rotary_dim);
    // llama.cpp's converter permutes llama Q/K rows to rotate adjacent pairs; qwen2 keeps HF's.
    EXPECT_EQ(gguf.rope_layout,
              gguf.architecture == "llama" ? RopeLayout::Interleaved : RopeLayout::Half);
  }
  EXPECT_EQ(gguf.sliding_window, hf.sliding_window);
  EXPECT_EQ(gguf.layer_kinds, hf.layer_kinds);
  EXPECT_EQ(gguf.local_rope.has_value(), hf.local_rope.has_value());
  EXPECT_EQ(gguf.qk_norm, hf.qk_norm);
  EXPECT_EQ(gguf.post_norms, hf.post_norms);
  EXPECT_EQ(gguf.embedding_scale, hf.embedding_scale);
  EXPECT_EQ(gguf.bos_id, hf.bos_id);
  EXPECT_EQ(gguf.eos_ids, hf.eos_ids);
}

TEST_P(GgufFixture, PrefillLogitsMatchTransformers) {
  const Model model = Model::load(gguf_path_.string());
  const std::vector<float> logits = prefill(model, tokens_);
  const std::vector<float> expected =
      read_raw<float>(kGgufDir / entry_.at("reference_logits").get<std::string>());
  ASSERT_EQ(expected.size(), tokens_.size() * model.config().vocab_size);
  const double difference = max_abs_difference(logits, expected);
  std::printf("%s: max |dlogit| %.3g (tolerance %.3g)\n", GetParam().c_str(), difference,
              tolerance_);
  EXPECT_LE(difference, tolerance_)
      << "reference " << entry_.at("reference_logits") << ", tolerance " << tolerance_;
}

TEST_P(GgufFixture, DecodeMatchesPrefill) {
  const Model model = Model::load(gguf_path_.string());
  EXPECT_LE(max_abs_difference(decode(model, tokens_), prefill(model, tokens_)), tolerance_);
}

TEST_P(GgufFixture, TokenizerMatchesTheFixtureTokenizer) {
  const Model model = Model::load(gguf_path_.string());
  const Tokenizer& tokenizer = model.tokenizer();
  const std::string text = fixture_.at("text").get<std::string>();
  EXPECT_EQ(tokenizer.encode(text, true), fixture_.at("text_ids").get<std::vector<int32_t>>());
  EXPECT_EQ(tokenizer.encode(text, false),
            fixture_.at("text_ids_without_special_tokens").get<std::vector<int32_t>>());
  std::vector<int32_t> sentence =
      tokenizer.encode(fixture_.at("reference_sentence").get<std::string>(), true);
  sentence.resize(std::min(sentence.size(), tokens_.size()));
  EXPECT_EQ(sentence, tokens_);
  const auto plain = fixture_.at("text_ids_without_special_tokens").get<std::vector<int32_t>>();
  EXPECT_EQ(tokenizer.decode(plain), fixture_.at("text_decoded").get<std::string>());
  EXPECT_EQ(tokenizer.vocab_size(), fixture_.at("vocab_size").get<int32_t>());
}

INSTANTIATE_TEST_SUITE_P(Files, GgufFixture,
                         ::testing::Values("llama.gguf", "llama.q8_0.gguf", "qwen2.gguf",
                                           "gpt2.gguf", "gemma3.gguf"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param.substr(0, info.param.rfind('.'));
                           std::replace(name.begin(), name.end(), '.', '_');
                           return name;
                         });

}  // namespace
}  // namespace visikv

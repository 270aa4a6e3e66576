// Gemma 3 (Hugging Face gemma3_text, GGUF gemma3) beyond the logits of the family fixtures
// (test_model_fixtures.cpp and test_gguf_models.cpp run tests/fixtures/models/gemma3 and
// models_gguf/gemma3.gguf): the config's local and global layers, what a local layer lets a
// sparse or certified support read, bad input, and the real Gemma-3-270M Q4_K_M against
// transformers loading the same GGUF (tests/fixtures/models/gemma3_270m_ref, made by
// scripts/reference_default_model.py; skipped when scripts/fetch_gemma3.sh has not run).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/attention/support.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;
namespace fs = std::filesystem;

const fs::path kFixtures(VISIKV_FIXTURES);
const fs::path kHfFixture = kFixtures / "models" / "gemma3";
const fs::path kGgufFixture = kFixtures / "models_gguf" / "gemma3.gguf";
const fs::path kMutants = kFixtures / "mutants";
const fs::path kRealReference = kFixtures / "models" / "gemma3_270m_ref";

constexpr LayerKind L = LayerKind::Local, G = LayerKind::Global;
// The fixture's seven layers: global every sixth, as every Gemma 3 GGUF implies.
const std::vector<LayerKind> kFixtureKinds = {L, L, L, L, L, G, L};

std::vector<int32_t> fixture_tokens() {
  return read_json(kHfFixture / "reference.json").at("tokens").get<std::vector<int32_t>>();
}

nlohmann::json fixture_config() { return read_json(kHfFixture / "config.json"); }

// ---- the config ----

TEST(Gemma3Config, HuggingFaceFixture) {
  const Config c = Model::load(kHfFixture.string()).config();
  EXPECT_EQ(c.architecture, "gemma3_text");
  EXPECT_EQ(c.layer_kinds, kFixtureKinds);
  EXPECT_EQ(c.sliding_window, 8);
  for (int64_t l = 0; l < c.layers; ++l)
    EXPECT_EQ(c.layer_window(l), l == 5 ? 0 : 8) << "layer " << l;
  EXPECT_EQ(c.rope_theta, 1e6);
  ASSERT_TRUE(c.local_rope.has_value());
  EXPECT_EQ(c.local_rope->theta, 1e4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_DOUBLE_EQ(c.score_scale(), 1.0 / std::sqrt(24.0));  // query_pre_attn_scalar, not 16
  EXPECT_EQ(c.final_logit_softcap, 4.0);
  EXPECT_EQ(c.embedding_scale, 8.0f);  // sqrt(64)
  EXPECT_TRUE(c.qk_norm);
  EXPECT_TRUE(c.post_norms);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_EQ(c.activation, Activation::GeluTanh);
  EXPECT_EQ(c.bos_id, 2);
}

// Configs written before transformers 5 spell the layer pattern and the two ropes differently.
TEST(Gemma3Config, OlderKeysGiveTheSameConfig) {
  nlohmann::json hf = fixture_config();
  hf.erase("layer_types");
  hf.erase("rope_parameters");
  hf["sliding_window_pattern"] = 6;
  const Config old_style = config_from_hf(hf, nullptr);
  EXPECT_EQ(old_style.layer_kinds, kFixtureKinds);
  EXPECT_EQ(old_style.rope_theta, 1e6);
  EXPECT_EQ(old_style.local_rope->theta, 1e4);
  // rope_scaling scales the global layers only (Gemma 3 4B and larger: linear, factor 8).
  hf["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 8.0}};
  const Config scaled = config_from_hf(hf, nullptr);
  EXPECT_EQ(scaled.rope_scaling.type, RopeScaling::Type::Linear);
  EXPECT_EQ(scaled.local_rope->scaling.type, RopeScaling::Type::None);
  // Absent keys take Gemma3TextConfig's defaults.
  for (const char* key : {"query_pre_attn_scalar", "rope_theta", "rope_local_base_freq",
                          "sliding_window_pattern", "sliding_window", "head_dim"})
    hf.erase(key);
  const Config defaults = config_from_hf(hf, nullptr);
  EXPECT_DOUBLE_EQ(defaults.score_scale(), 1.0 / 16.0);  // 256^-0.5
  EXPECT_EQ(defaults.head_dim, 256);
  EXPECT_EQ(defaults.sliding_window, 4096);
  EXPECT_EQ(defaults.rope_theta, 1e6);
  EXPECT_EQ(defaults.local_rope->theta, 1e4);
}

TEST(Gemma3Config, GgufFixtureHasTheLayersOfTheHuggingFaceOne) {
  const Config gguf = Model::load(kGgufFixture.string()).config();
  const Config hf = Model::load(kHfFixture.string()).config();
  EXPECT_EQ(gguf.layer_kinds, hf.layer_kinds);
  EXPECT_EQ(gguf.sliding_window, hf.sliding_window);
  EXPECT_NEAR(gguf.local_rope->theta, hf.local_rope->theta, 1e-6 * hf.local_rope->theta);
  EXPECT_EQ(gguf.qk_norm, hf.qk_norm);
  EXPECT_EQ(gguf.post_norms, hf.post_norms);
  EXPECT_EQ(gguf.embedding_scale, hf.embedding_scale);
  // A GGUF holds no query_pre_attn_scalar or soft-cap: llama.cpp's 1/sqrt(head dim), no cap.
  EXPECT_DOUBLE_EQ(gguf.score_scale(), 0.25);
  EXPECT_EQ(gguf.final_logit_softcap, 0.0);
}

TEST(Gemma3Config, BadConfigsAreClearErrors) {
  nlohmann::json hf = fixture_config();
  hf["layer_types"].erase(hf["layer_types"].size() - 1);
  EXPECT_NE(error_of([&] {
              config_from_hf(hf, nullptr);
            }).find("field 'layer_types' must list one type per layer (7)"),
            std::string::npos);
  hf = fixture_config();
  hf["layer_types"][2] = "chunked_attention";
  EXPECT_NE(error_of([&] { config_from_hf(hf, nullptr); }).find("\"chunked_attention\""),
            std::string::npos);
  hf = fixture_config();
  hf["use_bidirectional_attention"] = true;
  EXPECT_NE(error_of([&] { config_from_hf(hf, nullptr); }).find("use_bidirectional_attention"),
            std::string::npos);
  hf = fixture_config();
  hf["sliding_window"] = 0;
  EXPECT_NE(error_of([&] { config_from_hf(hf, nullptr); }).find("field 'sliding_window' = 0"),
            std::string::npos);
  hf = fixture_config();
  hf["rope_parameters"]["sliding_attention"]["rope_type"] = "yarn";
  EXPECT_NE(error_of([&] {
              config_from_hf(hf, nullptr);
            }).find("rope_parameters.sliding_attention: unsupported rope scaling type 'yarn'"),
            std::string::npos);
}

// ---- local layers in attention ----

// Records, per event, whether its support leaves the layer's window.
class WindowWatcher final : public AttentionObserver {
 public:
  explicit WindowWatcher(const Config& config) : config_(config) {}
  void observe(const AttentionEvent& e) override {
    std::lock_guard lock(mutex_);
    ++events_;
    int64_t lowest = e.position;
    for (int64_t i = 0; i < e.positions.size(); ++i) lowest = std::min(lowest, e.positions[i]);
    const int64_t window = config_.layer_window(e.layer);
    if (window > 0 && lowest <= e.position - window) ++outside_local_;
    if (window == 0 && lowest <= e.position - config_.sliding_window) ++beyond_window_global_;
  }
  int64_t events_ = 0, outside_local_ = 0, beyond_window_global_ = 0;

 private:
  const Config& config_;
  std::mutex mutex_;
};

// A sparse or certified support on a local layer stays inside the window (the anchors at
// position 0 included), while the global layer reads past it: the same rules, different
// visible ranges per layer. Prefill and decode both.
TEST(Gemma3Attention, SupportsOnLocalLayersStayInTheirWindow) {
  const Model model = Model::load(kHfFixture.string());
  const std::vector<int32_t> tokens = fixture_tokens();
  for (const char* spec : {"sparse:a2:w2:k3:exact", "sparse:a1:w2:k4:b4:bound",
                           "certified:a2:w2:b4:eps0.05", "dense"}) {
    SCOPED_TRACE(spec);
    for (const bool decode : {false, true}) {
      Decoder decoder(model);
      auto cache = make_cache(decoder.cache_shape(), "f32", "f32", 0, 4);
      const std::unique_ptr<Support> support = make_support(spec);
      WindowWatcher watcher(model.config());
      const AttentionOptions options{.support = support.get(), .observer = &watcher};
      if (decode) {
        for (const int32_t token : tokens) decoder.next_logits({&token, 1}, *cache, options);
      } else {
        decoder.next_logits(tokens, *cache, options);
      }
      EXPECT_EQ(watcher.events_,
                model.config().layers * model.config().heads * static_cast<int64_t>(tokens.size()));
      EXPECT_EQ(watcher.outside_local_, 0);
      EXPECT_GT(watcher.beyond_window_global_, 0);
    }
  }
}

// A sparse rule whose fixed part covers the window reads exactly what dense attention reads on
// a local layer, so the logits are dense's to the bit (and differ on the global layer, where
// the window is not the whole context).
TEST(Gemma3Attention, WindowWideSelectorIsDenseOnLocalLayers) {
  const Model model = Model::load(kHfFixture.string());
  const std::vector<int32_t> tokens = fixture_tokens();
  const auto logits = [&](const char* spec) {
    Decoder decoder(model);
    auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32);
    const std::unique_ptr<Support> support = make_support(spec);
    return decoder.next_logits(tokens, *cache, {.support = support.get()});
  };
  const std::vector<float> dense = logits("dense");
  EXPECT_EQ(logits("sparse:a48:w48"), dense);  // covers every position: dense everywhere
  EXPECT_NE(logits("sparse:w8"), dense);       // dense on local layers only
}

TEST(Gemma3Model, ContextLongerThanTheModelsIsAnError) {
  const Model model = Model::load(kHfFixture.string());
  EXPECT_EQ(model.config().max_positions, 128);
  EXPECT_NO_THROW(check_context(model.config(), 128, "a window of 128 tokens"));
  const std::string error =
      error_of([&] { check_context(model.config(), 129, "a window of 129 tokens"); });
  EXPECT_NE(error.find("129"), std::string::npos) << error;
  EXPECT_NE(error.find("128"), std::string::npos) << error;
  const ProgramRun run = run_visikv("ppl " + kGgufFixture.string() + " --window 200");
  EXPECT_NE(run.status, 0);
  EXPECT_NE(run.output.find("window of 200 tokens"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("context of 128 positions"), std::string::npos) << run.output;
}

// ---- bad GGUF metadata (tests/fixtures/mutants, made by make_mutants.py) ----

struct MissingKeyCase {
  const char* file;
  const char* key;
};

void PrintTo(const MissingKeyCase& c, std::ostream* out) { *out << c.file; }

class Gemma3MissingKey : public ::testing::TestWithParam<MissingKeyCase> {};

TEST_P(Gemma3MissingKey, NamesTheKey) {
  const fs::path path = kMutants / GetParam().file;
  ASSERT_TRUE(fs::exists(path)) << path << ": run tests/fixtures/mutants/make_mutants.py";
  const std::string error = error_of([&] { Model::load(path.string()); });
  EXPECT_NE(error.find(str_cat("missing required field '", GetParam().key, "'")), std::string::npos)
      << error;
  EXPECT_NE(error.find(path.filename().string()), std::string::npos) << error;
}

INSTANTIATE_TEST_SUITE_P(
    Keys, Gemma3MissingKey,
    ::testing::Values(
        MissingKeyCase{"gemma3_metadata.no_sliding_window.gguf", "gemma3.attention.sliding_window"},
        MissingKeyCase{"gemma3_metadata.no_freq_base.gguf", "gemma3.rope.freq_base"},
        MissingKeyCase{"gemma3_metadata.no_key_length.gguf", "gemma3.attention.key_length"},
        MissingKeyCase{"gemma3_metadata.no_context_length.gguf", "gemma3.context_length"}),
    [](const ::testing::TestParamInfo<MissingKeyCase>& info) {
      std::string name = fs::path(info.param.file).stem().string();
      std::replace(name.begin(), name.end(), '.', '_');
      return name;
    });

// ---- the real model ----

// The Gemma-3-270M GGUF when scripts/fetch_gemma3.sh has fetched it.
const Model* real_model() {
  static const std::unique_ptr<Model> model = []() -> std::unique_ptr<Model> {
    const fs::path path = gemma3_model_path();
    if (!fs::exists(path)) return nullptr;
    return std::make_unique<Model>(Model::load(path.string()));
  }();
  return model.get();
}

#define REQUIRE_REAL_MODEL()                                       \
  if (real_model() == nullptr)                                     \
  GTEST_SKIP() << "Gemma-3-270M is not at " << gemma3_model_path() \
               << " (optional: scripts/fetch_gemma3.sh or scripts/setup.sh --models)"

std::vector<int32_t> real_reference_tokens() {
  return read_json(kRealReference / "tokens.json").get<std::vector<int32_t>>();
}

std::vector<float> prefill_logits(const Model& model, std::span<const int32_t> tokens) {
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32, tokens.size());
  return decoder.all_logits(tokens, *cache);
}

TEST(Gemma3RealModel, TokenizerMatchesTransformersOnWikiTextStart) {
  REQUIRE_REAL_MODEL();
  const std::vector<int32_t> expected = real_reference_tokens();
  const std::string text = read_text_file(default_test_text());
  // The reference tokenized the whole file in one call, BOS first.
  const std::vector<int32_t> ids = real_model()->tokenizer().encode(text.substr(0, 8192), true);
  ASSERT_GE(ids.size(), expected.size());
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + expected.size()), expected);
}

// The reference runs past the 512-position window of the local layers, so they attend to their
// window there while the global layers see everything.
TEST(Gemma3RealModel, LogitsAgreeWithTransformers) {
  REQUIRE_REAL_MODEL();
  const Model& model = *real_model();
  const std::vector<int32_t> tokens = real_reference_tokens();
  ASSERT_GT(static_cast<int64_t>(tokens.size()), model.config().sliding_window);
  const TopKAgreement a =
      topk_agreement(prefill_logits(model, tokens), model.config().vocab_size, kRealReference, 256);
  std::printf(
      "top-1 agreement %.4f, mean KL %.3g, max KL %.3g, max |dlogprob| (top-256) %.3g over %lld "
      "positions\n",
      a.top1, a.kl_mean, a.kl_max, a.logprob_diff_max, static_cast<long long>(a.positions));
  EXPECT_GE(a.top1, 0.99);
  EXPECT_LE(a.kl_mean, 1e-3);
}

// Decode steps past the window (each local layer's support slides) give the logits prefill
// gives at the same positions.
TEST(Gemma3RealModel, DecodePastTheWindowMatchesPrefill) {
  REQUIRE_REAL_MODEL();
  const Model& model = *real_model();
  std::vector<int32_t> tokens = real_reference_tokens();
  constexpr int64_t kPrefix = 520, kSteps = 6;
  tokens.resize(kPrefix + kSteps);
  const int64_t vocab = model.config().vocab_size;
  const std::vector<float> prefill = prefill_logits(model, tokens);
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F32);
  decoder.next_logits(std::span(tokens).first(kPrefix), *cache);
  double worst = 0;
  for (int64_t t = kPrefix; t < kPrefix + kSteps; ++t) {
    const std::vector<float> step = decoder.next_logits({&tokens[t], 1}, *cache);
    const std::span<const float> row(prefill.data() + t * vocab, vocab);
    EXPECT_EQ(std::max_element(step.begin(), step.end()) - step.begin(),
              std::max_element(row.begin(), row.end()) - row.begin())
        << "position " << t;
    for (int64_t i = 0; i < vocab; ++i) worst = std::max(worst, double(std::abs(step[i] - row[i])));
  }
  EXPECT_LT(worst, 2e-3);
}

}  // namespace
}  // namespace visikv

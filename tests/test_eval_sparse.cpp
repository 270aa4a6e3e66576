// The survival protocol (eval/survival.h) and needle retrieval (eval/needle.h) on tiny fixture
// models, and the `visikv eval sparse` / `eval needle` commands end to end.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/eval/coverage.h"
#include "visikv/eval/generate.h"
#include "visikv/eval/kv_grid.h"
#include "visikv/eval/needle.h"
#include "visikv/eval/perplexity.h"
#include "visikv/eval/survival.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

ProgramRun run(const std::string& args) { return run_visikv("-t 1 " + args); }

namespace fs = std::filesystem;

std::vector<NamedSelectorSpec> parse_selectors(const std::vector<std::string>& texts) {
  std::vector<NamedSelectorSpec> out;
  for (const std::string& text : texts) out.push_back(parse_named_selector_spec(text));
  return out;
}

std::vector<KeyCodecSpec> parse_key_codecs(const std::vector<std::string>& texts) {
  std::vector<KeyCodecSpec> out;
  for (const std::string& text : texts) out.push_back(parse_key_codec_spec(text));
  return out;
}

std::string fixture(const std::string& name) {
  return std::string(VISIKV_FIXTURES) + "/models/" + name;
}

// A reproducible token stream over the model's vocabulary (random models need no real text).
std::vector<int32_t> token_stream(const Model& model, size_t n) {
  std::vector<int32_t> tokens(n);
  uint64_t state = 12345;
  const uint64_t vocab = static_cast<uint64_t>(model.config().vocab_size);
  for (int32_t& t : tokens) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    t = static_cast<int32_t>(3 + (state >> 33) % (vocab - 3));
  }
  return tokens;
}

struct SurvivalFixture {
  Model model;
  Decoder decoder;
  SurvivalOptions options;
  std::vector<DenseReference> refs;
  SurvivalFixture(const std::string& name, int64_t prefix, int64_t continuation, int64_t samples)
      : model(Model::load(fixture(name))), decoder(model) {
    options.prefix = prefix;
    options.continuation = continuation;
    options.samples = samples;
    if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
    const auto prefixes = survival_prefixes(token_stream(model, 4096), options);
    refs = dense_references(decoder, prefixes, options);
  }
};

void expect_consistent(const SurvivalRow& r, const SurvivalFixture& s) {
  const int64_t T = s.options.continuation;
  ASSERT_EQ(static_cast<int64_t>(r.first_divergence.size()), s.options.samples);
  for (int64_t fd : r.first_divergence) {
    EXPECT_GE(fd, 0);
    EXPECT_LE(fd, T);
  }
  EXPECT_GE(r.tf_match, 0.0);
  EXPECT_LE(r.tf_match, 1.0);
  EXPECT_LE(r.first_divergence_min, r.first_divergence_mean);
  // Agreeing at every teacher-forced step means no divergence, and the converse.
  EXPECT_EQ(r.tf_match == 1.0, r.identical) << r.selector;
  // Up to its first divergence a sample agrees at every step.
  EXPECT_GE(r.tf_match * T * s.options.samples, r.first_divergence_mean * s.options.samples - 1e-9);
  EXPECT_GT(r.support_mean, 0.0);
  EXPECT_LE(r.support_mean, r.context_mean + 1e-9);
  EXPECT_LE(r.support_max, s.options.prefix + T);
  if (r.selector != "dense") EXPECT_GT(r.queries_measured, 0);
  EXPECT_TRUE(std::isfinite(r.delta_ppl_pct));
}

TEST(Survival, FullSupportFollowsTheDenseReference) {
  SurvivalFixture s("llama", 48, 16, 2);
  for (const std::string spec : {"sparse:a9999:w9999:k1:exact", "dense"}) {
    const SurvivalRow r =
        survival_row(s.decoder, s.refs, parse_named_selector_spec(spec), s.options);
    expect_consistent(r, s);
    EXPECT_TRUE(r.identical) << spec;
    EXPECT_EQ(r.first_divergence, (std::vector<int64_t>{16, 16})) << spec;
    EXPECT_EQ(r.tf_match, 1.0) << spec;
    EXPECT_EQ(r.delta_ppl_pct, 0.0) << spec;
    EXPECT_EQ(r.nll_sparse, r.nll_dense) << spec;
    EXPECT_DOUBLE_EQ(r.support_mean, r.context_mean) << spec;
    EXPECT_FALSE(r.bound_max.has_value());
  }
  // The clamped full support reads what dense attention reads, bit for bit.
  const SurvivalRow full = survival_row(
      s.decoder, s.refs, parse_named_selector_spec("sparse:a9999:w9999:k1:exact"), s.options);
  ASSERT_TRUE(full.measured_err_max.has_value());
  EXPECT_EQ(*full.measured_err_max, 0.0);
}

TEST(Survival, TinySupportIsConsistentAndMatchesAFreeRunningDecode) {
  SurvivalFixture s("qwen2", 64, 16, 3);
  for (const std::string spec : {"sparse:a0:w1:k1:exact", "sparse:a1:w2:k4:b4:centroid",
                                 "sparse:a1:w2:k4:b4:bound:r4", "sparse:a0:w2:k2:exact:gqa=head"}) {
    const SurvivalRow r =
        survival_row(s.decoder, s.refs, parse_named_selector_spec(spec), s.options);
    expect_consistent(r, s);
    EXPECT_LT(r.support_mean, r.context_mean) << spec;
    ASSERT_TRUE(r.measured_err_max.has_value());
    EXPECT_GT(*r.measured_err_max, 0.0) << spec;

    // The first divergence read off the teacher-forced run equals an explicit free-running
    // sparse greedy decode's.
    const std::unique_ptr<Support> selector = make_support(spec);
    const SelectorSpec parsed = parse_selector_spec(spec);
    auto cache = make_cache(s.decoder.cache_shape(), "f32", "f32", 0,
                            parsed.block_size > 0 ? parsed.block_size : 32);
    GenerationOptions g;
    g.max_new_tokens = s.options.continuation;
    g.stop_at_eos = false;
    g.support = selector.get();
    for (size_t i = 0; i < s.refs.size(); ++i) {
      cache->clear();
      selector->reset();
      const GenerationResult free_run = generate(s.decoder, *cache, s.refs[i].prefix, g);
      const auto& ref = s.refs[i].continuation;
      const int64_t divergence =
          std::mismatch(free_run.tokens.begin(), free_run.tokens.end(), ref.begin()).first -
          free_run.tokens.begin();
      EXPECT_EQ(divergence, r.first_divergence[i]) << spec << " sample " << i;
    }
  }
}

TEST(Survival, CertifiedBoundHoldsAgainstTheMeasuredError) {
  for (const std::string name : {"qwen2", "llama", "mistral"}) {
    SurvivalFixture s(name, 64, 12, 2);
    for (const std::string spec : {"certified:a0:w1:b1:eps0.3", "certified:a1:w4:b4:eps0.5",
                                   "certified:a1:w4:b4:eps0.05:gqa=head"}) {
      const SurvivalRow r =
          survival_row(s.decoder, s.refs, parse_named_selector_spec(spec), s.options);
      expect_consistent(r, s);
      const double eps = parse_selector_spec(spec).epsilon;
      ASSERT_TRUE(r.bound_max.has_value()) << name << " " << spec;
      ASSERT_TRUE(r.measured_err_max.has_value());
      EXPECT_LE(*r.bound_max, eps) << name << " " << spec;
      EXPECT_LE(*r.measured_err_max, *r.bound_max) << name << " " << spec;
      EXPECT_EQ(r.bound_violations, 0) << name << " " << spec;
    }
  }
  // A case where the bound is not trivially zero: the support is cut and the error is real.
  SurvivalFixture s("qwen2", 64, 12, 2);
  const SurvivalRow r = survival_row(
      s.decoder, s.refs, parse_named_selector_spec("certified:a0:w1:b1:eps0.3"), s.options);
  EXPECT_GT(*r.bound_max, 0.0);
  EXPECT_GT(*r.measured_err_max, 0.0);
  EXPECT_LT(r.support_mean, r.context_mean);
}

// Real attention (fixture models) over quantized and HeadQ key caches: for every (layer, query
// head, position) of a certified prefill, the dropped share of the softmax over the scores the
// cache returns is at most the selector's δ; and in the survival protocol over the same codecs the
// measured output error never exceeds 2 δ max||v||.
class DroppedMass : public AttentionObserver {
 public:
  DroppedMass(const KVCache& cache, double scale, int64_t heads)
      : cache_(cache), scale_(scale), heads_(heads) {}
  void observe(const AttentionEvent& e) override {
    const PositionSet visible = visible_positions(e.position, 0);
    std::vector<float> scores(visible.size());
    cache_.score(e.layer, e.kv_head, e.query, visible, scores);
    double m = -INFINITY;
    for (float& x : scores) {
      x = static_cast<float>(x * scale_);
      m = std::max<double>(m, x);
    }
    std::vector<bool> read(visible.size(), false);
    for (int64_t i = 0; i < e.positions.size(); ++i) read[e.positions[i]] = true;
    double total = 0, dropped = 0;
    for (int64_t j = 0; j < visible.size(); ++j) {
      total += std::exp(scores[j] - m);
      if (!read[j]) dropped += std::exp(scores[j] - m);
    }
    std::lock_guard lock(mutex_);
    dropped_[{e.layer, e.position * heads_ + e.head}] = dropped / total;
  }
  std::mutex mutex_;
  std::map<std::pair<int64_t, int64_t>, double> dropped_;  // (layer, position * heads + head)

 private:
  const KVCache& cache_;
  double scale_;
  int64_t heads_;
};

TEST(Survival, CertifiedBoundHoldsOverQuantizedKeys) {
  for (const std::string name : {"qwen2", "llama"}) {
    const Model model = Model::load(fixture(name));
    Decoder decoder(model);
    const Config& c = model.config();
    const double scale = c.score_scale();
    const std::vector<int32_t> prompt = token_stream(model, 96);
    for (const std::string keys :
         {"int2:g16:tok", "int4:g8:tok", "int2:g8:chan:r16", "int2:g16:tok+headq:r4:s4:random"}) {
      for (const std::string spec : {"certified:a1:w4:b4:eps0.3", "certified:a0:w1:b1:eps0.1"}) {
        SCOPED_TRACE(name + " " + keys + " " + spec);
        auto cache = make_cache(decoder.cache_shape(), keys, "f32", 96,
                                parse_selector_spec(spec).block_size);
        const std::unique_ptr<Support> selector = make_support(spec);
        std::map<std::pair<int64_t, int64_t>, double> deltas;
        DroppedMass observer(*cache, scale, c.heads);
        decoder.forward(prompt, *cache, LogitRows::Last, [](int64_t, int64_t, auto) {},
                        {.support = selector.get(),
                         .support_stats =
                             [&](int64_t layer, std::span<const SparseQueryStats> st) {
                               for (size_t i = 0; i < st.size(); ++i)
                                 deltas[{layer, static_cast<int64_t>(i)}] = st[i].delta;
                             },
                         .observer = &observer});
        ASSERT_EQ(observer.dropped_.size(), deltas.size());
        int64_t cut = 0;
        for (const auto& [key, dropped] : observer.dropped_) {
          const double delta = deltas.at(key);
          EXPECT_LE(dropped, delta * (1 + 1e-9) + 1e-12);
          cut += dropped > 0 ? 1 : 0;
        }
        EXPECT_GT(cut, 0);  // positions were dropped: the check was not vacuous

        SurvivalOptions options;
        options.prefix = 64;
        options.continuation = 8;
        options.samples = 1;
        options.key_codec = parse_key_codec_spec(keys);
        if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
        const auto refs = dense_references(
            decoder, survival_prefixes(token_stream(model, 256), options), options);
        const SurvivalRow r = survival_row(decoder, refs, parse_named_selector_spec(spec), options);
        ASSERT_TRUE(r.bound_max && r.measured_err_max);
        EXPECT_EQ(r.bound_violations, 0);
        EXPECT_LE(*r.measured_err_max, *r.bound_max);
      }
    }
  }
}

// Sampling with a shared seed: the dense sampled reference is what generate() samples with that
// seed; the first step where the coupled samples differ is where an explicit free-running sparse
// sampled decode with the same seed departs from the dense one; full support always agrees.
TEST(Survival, SamplingAgreementWithASharedSeed) {
  SurvivalFixture s("qwen2", 64, 16, 1);
  s.options.samples = 3;
  s.options.temperature = 0.8;
  s.options.seed = 7;
  s.refs = dense_references(s.decoder, survival_prefixes(token_stream(s.model, 4096), s.options),
                            s.options);
  const int64_t T = s.options.continuation;
  const SurvivalRow full = survival_row(
      s.decoder, s.refs, parse_named_selector_spec("sparse:a9999:w9999:k1:exact"), s.options);
  ASSERT_TRUE(full.sampling_agreement.has_value());
  EXPECT_EQ(*full.sampling_agreement, 1.0);
  EXPECT_EQ(full.sampling_first_divergence, (std::vector<int64_t>{T, T, T}));

  GenerationOptions g;
  g.max_new_tokens = T;
  g.stop_at_eos = false;
  g.sampling.temperature = 0.8;
  for (const std::string spec : {"sparse:a0:w1:k1:exact", "sparse:a1:w2:k4:b4:bound"}) {
    const SurvivalRow r =
        survival_row(s.decoder, s.refs, parse_named_selector_spec(spec), s.options);
    ASSERT_TRUE(r.sampling_agreement.has_value());
    EXPECT_GE(*r.sampling_agreement * T * 3, r.sampling_first_divergence_mean * 3 - 1e-9);
    EXPECT_LT(*r.sampling_agreement, 1.0) << spec;  // a tiny support does depart
    const std::unique_ptr<Support> selector = make_support(spec);
    const SelectorSpec parsed = parse_selector_spec(spec);
    auto cache = make_cache(s.decoder.cache_shape(), "f32", "f32", 0,
                            parsed.block_size > 0 ? parsed.block_size : 32);
    for (size_t i = 0; i < s.refs.size(); ++i) {
      g.sampling.seed = 7 + i;
      g.support = nullptr;
      cache->clear();
      EXPECT_EQ(generate(s.decoder, *cache, s.refs[i].prefix, g).tokens, s.refs[i].sampled);
      g.support = selector.get();
      cache->clear();
      selector->reset();
      const std::vector<int32_t> free_run = generate(s.decoder, *cache, s.refs[i].prefix, g).tokens;
      g.support = nullptr;
      const auto& ref = s.refs[i].sampled;
      const int64_t divergence =
          std::mismatch(free_run.begin(), free_run.end(), ref.begin()).first - free_run.begin();
      EXPECT_EQ(divergence, r.sampling_first_divergence[i]) << spec << " sample " << i;
    }
  }
  SurvivalOptions bad = s.options;
  bad.temperature = -1;
  EXPECT_THROW(check_survival_options(s.model.config(), bad), Error);
}

TEST(SparsePerplexity, GridRowsAndErrors) {
  const std::vector<KvGridRow> rows =
      kv_grid_sparse_rows(parse_selectors({"dense", "sparse:a1:w4:k8:exact"}),
                          parse_key_codecs({"int2:g16:tok", "f32"}));
  std::vector<std::string> names;
  for (const KvGridRow& r : rows) names.push_back(r.name);
  EXPECT_EQ(names, (std::vector<std::string>{"dense", "sparse:a1:w4:k8:exact", "int2:g16:tok",
                                             "int2:g16:tok + sparse:a1:w4:k8:exact",
                                             "f32 + sparse:a1:w4:k8:exact"}));
  EXPECT_EQ(rows[3].key_codec.text(), "int2:g16:tok");
  EXPECT_EQ(rows[3].selector.text, "sparse:a1:w4:k8:exact");
  EXPECT_EQ(rows[3].value_codec.text(), "f32");
  EXPECT_THROW(
      kv_grid_sparse_rows(parse_selectors({"sparse:a1:w4:k8:exakt"}), parse_key_codecs({})), Error);
  EXPECT_THROW(
      kv_grid_sparse_rows(parse_selectors({"sparse:a1:w4"}), parse_key_codecs({"int9:g16:tok"})),
      Error);
  EXPECT_THROW(
      kv_grid_sparse_rows(parse_selectors({"sparse:a1:w4", "sparse:a1:w4"}), parse_key_codecs({})),
      Error);
}

// Decode perplexity under a selector: a support covering everything is dense attention (same
// PPL bit for bit, support = context); a small support reads fewer positions; the dense mean
// context of windows of L tokens with BOS first is (L - 1 + 1) / 2 per scored row (row r sees
// r + 1 positions).
TEST(SparsePerplexity, SupportAndContextAreReported) {
  const Model model = Model::load(fixture("llama"));
  Decoder decoder(model);
  const std::vector<int32_t> text = token_stream(model, 200);
  KvGridOptions options;
  options.window = 32;
  options.max_tokens = 62;  // two full windows of 31 scored tokens
  options.bos = model.tokenizer().bos_id();
  const std::vector<KvGridResult> results =
      run_kv_grid(decoder, text,
                  kv_grid_sparse_rows(
                      parse_selectors({"sparse:a9999:w9999:k1:exact", "sparse:a1:w2:k4:b4:bound"}),
                      parse_key_codecs({"int4:g16:tok"})),
                  options, nullptr);
  ASSERT_EQ(results.size(), 6u);
  const PerplexityResult& dense = results[0].ppl;
  EXPECT_EQ(dense.tokens, 62);
  EXPECT_DOUBLE_EQ(dense.context_mean, 16.0);  // mean of 1..31
  EXPECT_DOUBLE_EQ(dense.support_mean, dense.context_mean);
  EXPECT_EQ(results[1].ppl.nll, dense.nll);  // full support: dense attention
  EXPECT_DOUBLE_EQ(results[1].ppl.support_mean, 16.0);
  EXPECT_LT(results[2].ppl.support_mean, 16.0);
  EXPECT_NE(results[2].ppl.nll, dense.nll);
  EXPECT_EQ(results[4].ppl.nll, results[3].ppl.nll);  // int4 keys, full support = int4 dense
  EXPECT_NE(results[3].ppl.nll, dense.nll);
  for (const KvGridResult& r : results) EXPECT_DOUBLE_EQ(r.delta_ppl, r.ppl.ppl - dense.ppl);
}

// A row reports another's run only when key codec, value codec and selector all match: "f32 +
// <selector>" is the selector's own row, while the selector rows (f32 keys and values like the
// dense row) and the codec rows under a selector are runs of their own.
TEST(SparsePerplexity, SameRunAsComparesCodecsAndSelector) {
  const Model model = Model::load(fixture("llama"));
  Decoder decoder(model);
  const std::vector<int32_t> text = token_stream(model, 80);
  KvGridOptions options;
  options.window = 16;
  options.max_tokens = 15;
  options.bos = model.tokenizer().bos_id();
  const std::vector<KvGridResult> results =
      run_kv_grid(decoder, text,
                  kv_grid_sparse_rows(parse_selectors({"sparse:a1:w2:k4:exact"}),
                                      parse_key_codecs({"int4:g16:tok", "f32"})),
                  options, nullptr);
  std::vector<std::pair<std::string, std::string>> same_runs;
  for (const KvGridResult& r : results) same_runs.emplace_back(r.row.name, r.same_run_as);
  EXPECT_EQ(same_runs, (std::vector<std::pair<std::string, std::string>>{
                           {"dense", ""},
                           {"sparse:a1:w2:k4:exact", ""},
                           {"int4:g16:tok", ""},
                           {"int4:g16:tok + sparse:a1:w2:k4:exact", ""},
                           {"f32 + sparse:a1:w2:k4:exact", "sparse:a1:w2:k4:exact"}}));
  EXPECT_EQ(results[4].ppl.nll, results[1].ppl.nll);
}

TEST(EvalCommand, SparsePplWritesTheTableAndJson) {
  const fs::path json_path = fs::path(testing::TempDir()) / "sparse_ppl.json";
  const ProgramRun r =
      run("eval sparse-ppl " + fixture("llama") + " --text " + std::string(VISIKV_SOURCE_DIR) +
          "/README.md --tokens 40 --window 32 --selectors "
          "sparse:a1:w4:k8:exact --keys int4:g16:tok --json " +
          json_path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = read_json(json_path);
  ASSERT_EQ(j["rows"].size(), 4u);
  EXPECT_EQ(j["rows"][3]["selector"], "sparse:a1:w4:k8:exact");
  EXPECT_EQ(j["rows"][3]["key_codec"], "int4:g16:tok");
  EXPECT_EQ(j["tokens"], 40);
  EXPECT_LT(j["rows"][3]["support_mean"].get<double>(), j["rows"][3]["context_mean"].get<double>());
  for (const auto& row : j["rows"])  // every row here is a run of its own
    EXPECT_TRUE(row["same_run_as"].is_null()) << row["name"] << ": " << row["same_run_as"];
  for (const char* bad : {" --selectors sparse:a1:w4:k8:b3", " --selectors bogus",
                          " --keys int5:g16:tok", " --tokens 0", " --window 1"}) {
    const ProgramRun b = run("eval sparse-ppl " + fixture("llama") + " --text " +
                             std::string(VISIKV_SOURCE_DIR) + "/README.md" + bad);
    EXPECT_NE(b.status, 0) << bad;
    EXPECT_NE(b.output.find("rror"), std::string::npos) << bad << ": " << b.output;
  }
}

TEST(Coverage, SummaryOfSharesIsMeanAndLowPercentiles) {
  std::vector<double> shares;
  for (int i = 100; i >= 1; --i) shares.push_back(i / 100.0);
  const CoverageSummary s = summarize_shares(shares);
  EXPECT_NEAR(s.mean, 0.505, 1e-12);
  EXPECT_DOUBLE_EQ(s.p10, 0.10);  // sorted[floor(0.1 * 99)]
  EXPECT_DOUBLE_EQ(s.p1, 0.01);
  EXPECT_DOUBLE_EQ(s.min, 0.01);
}

// Two independent computations agree: the anchors + window + per-head top-k split of the dense
// weights, and the mass inside the support of the exact rule with one choice per query head (the
// same positions). A support covering everything holds all the mass; the certified support
// holds at least 1 - eps of it; the shared GQA choice holds no more than the per-head one.
TEST(Coverage, SplitAgreesWithSelectorSupports) {
  for (const std::string name : {"llama", "mistral"}) {
    const Model model = Model::load(fixture(name));
    Decoder decoder(model);
    std::vector<int32_t> tokens = token_stream(model, 100);
    CoverageOptions options;
    options.from = 20;
    options.anchors = 1;
    options.window = 4;
    options.top_k = 8;
    const std::vector<std::string> selectors = {
        "sparse:a1:w4:k8:exact:gqa=head", "sparse:a1:w4:k8:exact", "sparse:a9999:w9999:k1:exact",
        "certified:a1:w4:b4:eps0.2"};
    const CoverageResult r =
        attention_coverage(decoder, tokens, parse_selectors(selectors), options);
    ASSERT_EQ(static_cast<int64_t>(r.layers.size()), model.config().layers);
    EXPECT_EQ(r.queries_per_layer, 80 * model.config().heads);
    for (const CoverageLayer& l : r.layers) {
      EXPECT_NEAR(l.selectors[0].mean, l.total.mean, 1e-6) << name;
      EXPECT_NEAR(l.selectors[0].min, l.total.min, 1e-6) << name;
      EXPECT_NEAR(l.total.mean, l.anchors.mean + l.window.mean + l.top_k.mean, 1e-9);
      EXPECT_LE(l.selectors[1].mean, l.selectors[0].mean + 1e-9) << name;
      EXPECT_NEAR(l.selectors[2].min, 1.0, 1e-5) << name;
      EXPECT_GE(l.selectors[3].min, 1.0 - 0.2 - 1e-5) << name;
      // llama: the split left mass out, so the agreement is not vacuous; mistral's sliding
      // window of 8 is covered whole.
      if (name == "llama")
        EXPECT_LT(l.total.mean, 0.99);
      else
        EXPECT_NEAR(l.total.min, 1.0, 1e-5);
      EXPECT_LE(l.support_mean[0], 13.0 + 1e-9);
      // Exact top-k scores every visible position; the certified block choice reads the keys of
      // its support only.
      EXPECT_NEAR(l.keys_mean[0], l.keys_mean[2], 1e-9) << name;
      EXPECT_NEAR(l.keys_mean[2], l.support_mean[2], 1e-9) << name;
      EXPECT_NEAR(l.keys_mean[3], l.support_mean[3], 1e-9) << name;
      // The needed support is the smallest holding 1 - eps with anchors and window read; the
      // certified support at the same eps reads those too and holds at least 1 - eps.
      EXPECT_GE(l.support_mean[3], l.needed.positions - 1e-9) << name;
      EXPECT_GT(l.needed.positions, 0.0);
      EXPECT_LE(l.needed.max, 1.0);
      EXPECT_LE(l.needed.p50, l.needed.p90);
      EXPECT_LE(l.needed.p90, l.needed.p99);
      if (name == "llama") EXPECT_LT(l.needed.mean, 1.0);  // something could be left out
    }
    if (name == "mistral")  // sliding window 8: at most 8 visible positions
      EXPECT_LE(r.context_mean, 8.0);
  }
  const Model model = Model::load(fixture("llama"));
  Decoder decoder(model);
  const std::vector<int32_t> tokens = token_stream(model, 50);
  CoverageOptions bad;
  bad.from = 50;
  EXPECT_THROW(attention_coverage(decoder, tokens, parse_selectors({"dense"}), bad), Error);
  EXPECT_THROW(
      attention_coverage(decoder, tokens,
                         parse_selectors({"sparse:a1:w4:k8:b4:bound", "sparse:a1:w4:k8:b8:bound"}),
                         CoverageOptions{.from = 10}),
      Error);
  EXPECT_THROW(attention_coverage(decoder, tokens, parse_selectors({"sparse:zz"}),
                                  CoverageOptions{.from = 10}),
               Error);
}

TEST(EvalCommand, CoverageWritesTheTableAndJson) {
  const fs::path json_path = fs::path(testing::TempDir()) / "coverage.json";
  const ProgramRun r =
      run("eval coverage " + fixture("llama") + " --text " + std::string(VISIKV_SOURCE_DIR) +
          "/README.md --tokens 64 --from 16 "
          "--selectors sparse:a1:w4:k8:exact,certified:a1:w4:b4:eps0.1 --json " +
          json_path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("a+w+k"), std::string::npos) << r.output;
  const auto j = read_json(json_path);
  ASSERT_EQ(j["layers"].size(), 2u);
  EXPECT_EQ(j["all_layers"]["selectors"].size(), 2u);
  EXPECT_GE(j["all_layers"]["selectors"][1]["coverage"]["min"].get<double>(), 0.9 - 1e-5);
  EXPECT_NE(r.output.find("keys read"), std::string::npos) << r.output;
  // Exact top-k scores every key it sees: more keys than the values it reads.
  EXPECT_GT(j["all_layers"]["selectors"][0]["keys_read_mean"].get<double>(),
            j["all_layers"]["selectors"][0]["support_mean"].get<double>());
  const ProgramRun bad = run("eval coverage " + fixture("llama") + " --text " +
                             std::string(VISIKV_SOURCE_DIR) + "/README.md --tokens 64 --from 64");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--from"), std::string::npos) << bad.output;
}

TEST(Survival, SlidingWindowModelKeepsItsWindow) {
  SurvivalFixture s("mistral", 48, 8, 1);  // sliding window 8
  const SurvivalRow r = survival_row(s.decoder, s.refs,
                                     parse_named_selector_spec("sparse:a1:w2:k2:exact"), s.options);
  expect_consistent(r, s);
  EXPECT_LE(r.support_max, 8);
  EXPECT_DOUBLE_EQ(r.context_mean, 8.0);
}

TEST(Survival, BadInputIsAClearError) {
  SurvivalFixture s("llama", 16, 4, 1);
  EXPECT_THROW(survival_row(s.decoder, s.refs, parse_named_selector_spec("sparse:a1:w4:k2:bogus"),
                            s.options),
               Error);
  EXPECT_THROW(survival_row(s.decoder, s.refs, parse_named_selector_spec("sparse:a1:w4:k0:exact"),
                            s.options),
               Error);
  SurvivalOptions bad = s.options;
  bad.prefix = 0;
  EXPECT_THROW(check_survival_options(s.model.config(), bad), Error);
  bad = s.options;
  bad.continuation = 0;
  EXPECT_THROW(check_survival_options(s.model.config(), bad), Error);
  bad = s.options;
  bad.prefix = 120;
  bad.continuation = 16;  // 136 > the fixture's 128 positions
  EXPECT_THROW(check_survival_options(s.model.config(), bad), Error);
  bad = s.options;
  bad.samples = 100;
  bad.prefix = 64;
  EXPECT_THROW(survival_prefixes(token_stream(s.model, 200), bad), Error);
}

TEST(Needle, PromptsHoldTheNeedlesAtTheirDepths) {
  const Model model = Model::load(fixture("llama"));
  NeedleOptions o;
  o.contexts = {96, 120};
  o.depths = {0.0, 0.5, 1.0};
  o.needles = {1, 2};
  o.answer_tokens = 4;
  check_needle_options(model.config(), o);
  std::string sentences;
  for (int i = 0; i < 60; ++i) sentences += "the quick brown fox jumps over the lazy dog . ";
  const std::vector<int32_t> haystack = model.tokenizer().encode(sentences, false);
  ASSERT_GE(haystack.size(), 400u);
  const auto cases = needle_cases(model.tokenizer(), haystack, o);
  ASSERT_EQ(cases.size(), 2u * 3u * 2u);
  double last_fraction = -1;
  for (const NeedleCase& c : cases) {
    EXPECT_EQ(static_cast<int64_t>(c.prompt.size()), c.context);
    EXPECT_EQ(c.digits.size(), 6u);
    const std::string text = model.tokenizer().decode(c.prompt);
    const std::string needle = "The secret number of " + c.name + " is " + c.digits + ".";
    const size_t at = text.find(needle);
    ASSERT_NE(at, std::string::npos) << text;
    EXPECT_NE(text.find("What is the secret number of " + c.name + "? The secret number of " +
                        c.name + " is"),
              std::string::npos);
    if (c.needles == 1) {  // the asked needle moves deeper with the depth
      const double fraction = static_cast<double>(at) / text.size();
      if (c.depth > 0) EXPECT_GT(fraction, last_fraction) << c.depth;
      last_fraction = c.depth == 1.0 ? -1 : fraction;
    }
  }
  // Deterministic: the same options give the same prompts.
  EXPECT_EQ(needle_cases(model.tokenizer(), haystack, o)[5].prompt, cases[5].prompt);

  Decoder decoder(model);
  const NeedleRow dense = needle_row(decoder, cases, parse_named_selector_spec("dense"), o);
  ASSERT_EQ(dense.results.size(), cases.size());
  EXPECT_GE(dense.exact_match_rate, 0.0);
  EXPECT_LE(dense.exact_match_rate, 1.0);
  const NeedleRow full =
      needle_row(decoder, cases, parse_named_selector_spec("sparse:a9999:w9999:k1:exact"), o);
  for (size_t i = 0; i < cases.size(); ++i)
    EXPECT_EQ(full.results[i].answer, dense.results[i].answer);  // full support = dense

  NeedleOptions bad = o;
  bad.depths = {1.5};
  EXPECT_THROW(check_needle_options(model.config(), bad), Error);
  bad = o;
  bad.contexts = {200};  // beyond 128 positions
  EXPECT_THROW(check_needle_options(model.config(), bad), Error);
  bad = o;
  bad.contexts = {8};  // too short for the needle and the question
  EXPECT_THROW(needle_cases(model.tokenizer(), haystack, bad), Error);
}

// ---- the commands ----

fs::path temp_file(const std::string& name) {
  return fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()) + ".json");
}

TEST(EvalCommand, SparseWritesTheTableAndJson) {
  const fs::path json_path = temp_file("eval_sparse");
  const ProgramRun r = run("eval sparse " + fixture("llama") +
                           " --prefix 40 -T 8 -S 2 --selectors "
                           "sparse:a9999:w9999:k1:exact,sparse:a1:w4:k4:exact,"
                           "certified:a1:w4:b4:eps0.5 --json " +
                           json_path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("identical over 8 tokens"), std::string::npos) << r.output;
  std::ifstream in(json_path);
  const nlohmann::json j = nlohmann::json::parse(in);
  fs::remove(json_path);
  EXPECT_EQ(j["prefix"], 40);
  EXPECT_EQ(j["continuation"], 8);
  EXPECT_EQ(j["samples"], 2);
  EXPECT_TRUE(j.contains("model"));
  ASSERT_EQ(j["rows"].size(), 3u);
  for (const auto& row : j["rows"])
    for (const char* key : {"selector", "support_mean", "first_divergence", "tf_match",
                            "delta_ppl_pct", "bound_max", "measured_err_max"})
      EXPECT_TRUE(row.contains(key)) << key;
  EXPECT_EQ(j["rows"][0]["first_divergence"], 8.0);
  EXPECT_EQ(j["rows"][0]["tf_match"], 1.0);
  EXPECT_EQ(j["rows"][0]["delta_ppl_pct"], 0.0);
  EXPECT_TRUE(j["rows"][0]["bound_max"].is_null());
  EXPECT_TRUE(j["rows"][1]["bound_max"].is_null());
  ASSERT_TRUE(j["rows"][2]["bound_max"].is_number());
  EXPECT_LE(j["rows"][2]["bound_max"].get<double>(), 0.5);
  EXPECT_LE(j["rows"][2]["measured_err_max"].get<double>(),
            j["rows"][2]["bound_max"].get<double>());
}

TEST(EvalCommand, NeedleWritesTheTableAndJson) {
  const fs::path json_path = temp_file("eval_needle");
  const ProgramRun r = run("eval needle " + fixture("llama") +
                           " --contexts 100,120 --depths 0.2,0.8 --needles 1,2 --answer-tokens 4 "
                           "--selectors sparse:a1:w8:k8:exact --json " +
                           json_path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("exact-match rate"), std::string::npos) << r.output;
  std::ifstream in(json_path);
  const nlohmann::json j = nlohmann::json::parse(in);
  fs::remove(json_path);
  ASSERT_EQ(j["rows"].size(), 2u);  // dense first, then the selector
  EXPECT_EQ(j["rows"][0]["selector"], "dense");
  EXPECT_EQ(j["rows"][1]["cases"].size(), 2u * 2u * 2u);
  const double rate = j["rows"][1]["exact_match_rate"];
  EXPECT_GE(rate, 0.0);
  EXPECT_LE(rate, 1.0);
}

TEST(EvalCommand, BadFlagsFailClearly) {
  ProgramRun r = run("eval sparse " + fixture("llama") +
                     " --prefix 16 -T 4 -S 1 --selectors "
                     "sparse:a1:w4:k2:bogus");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("bogus"), std::string::npos) << r.output;
  r = run("eval sparse " + fixture("llama") + " --prefix 0");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("prefix"), std::string::npos) << r.output;
  r = run("eval sparse " + fixture("llama") + " --prefix 120 -T 16 -S 1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("positions"), std::string::npos) << r.output;
  r = run("eval needle " + fixture("llama") + " --depths 2");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("depth"), std::string::npos) << r.output;
  r = run("eval");
  EXPECT_NE(r.status, 0);
  r = run("eval sparse " + fixture("llama") + " --keys nonsense -S 1 --prefix 16 -T 2");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("nonsense"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace visikv

// The K-only decode-perplexity grid (eval/kv_grid.h) and `visikv eval kv`, on the tiny Llama
// fixture: the rows and their bit budgets (closed form from docs/CACHE_SPECS.md), the dense row
// against the engine's decode-mode perplexity, the excess-removed formula, the JSON, bad flags.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/calibration/basis_file.h"
#include "visikv/calibration/calibrate.h"
#include "visikv/core/error.h"
#include "visikv/eval/kv_grid.h"
#include "visikv/eval/logit_store.h"
#include "visikv/eval/perplexity.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

namespace fs = std::filesystem;
using test_support::error_of;

const std::string kModels = std::string(VISIKV_FIXTURES) + "/models";

const std::string& kText = test_support::kEnglishText;

const KvGridRow* find_row(const std::vector<KvGridRow>& rows, const std::string& name) {
  for (const KvGridRow& r : rows)
    if (r.name == name) return &r;
  return nullptr;
}

TEST(KvGrid, RowsAndBudgetsForHeadDim64) {
  const std::vector<KvGridRow> rows = kv_grid_rows(64, KvGridSpec{});
  // dense, 6 plain, 2 x (3 HeadQ + 3 controls), 2 x 3 same-budget, 6 + 3 + 4 + 4 + 5 + 4 values
  // only, 2 x 4 full KV.
  EXPECT_EQ(rows.size(), 1u + 6 + 12 + 6 + 26 + 8);
  std::vector<std::string> names;
  for (const KvGridRow& r : rows) names.push_back(r.name);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(std::unique(names.begin(), names.end()), names.end()) << "row names are unique";

  auto key_codec = [&](const std::string& name) {
    const KvGridRow* r = find_row(rows, name);
    EXPECT_NE(r, nullptr) << name;
    return r ? r->key_codec.text() : std::string();
  };
  EXPECT_EQ(key_codec("dense"), "f32");
  EXPECT_EQ(key_codec("k2-tok"), "int2:g64:tok");
  EXPECT_EQ(key_codec("k4-chan"), "int4:g32:chan:r128");
  EXPECT_EQ(key_codec("k2-tok+hq-r8"), "int2:g64:tok+headq:r8:s4");
  EXPECT_EQ(key_codec("k2-chan+hq-r16"), "int2:g32:chan:r128+headq:r16:s4");
  EXPECT_EQ(key_codec("k2-tok+hq-r8-wrongsign"), "int2:g64:tok+headq:r8:s4:wrongsign");
  EXPECT_EQ(key_codec("k2-tok+hq-r8-random"), "int2:g64:tok+headq:r8:s4:random");
  EXPECT_EQ(key_codec("k2-chan+hq-r8-keypca"), "int2:g32:chan:r128+headq:r8:s4:keypca");
  // Same budget: HeadQ costs 160 + 4r + 32 bits per key at d = 64 (per-token base).
  EXPECT_EQ(key_codec("budget-tok-r8"), "int3:g64:tok");   // 224 = 224
  EXPECT_EQ(key_codec("budget-tok-r16"), "int3:g32:tok");  // 256 = 256 (beats int2:g16 on ties)
  EXPECT_EQ(key_codec("budget-tok-r4"), "int2:g32:tok");   // 192 <= 208
  // Per-channel base 192 bits: r8 -> 256 = int3:g32:chan, r16 -> 288 = int4:g64:chan.
  EXPECT_EQ(key_codec("budget-chan-r8"), "int3:g32:chan:r128");
  EXPECT_EQ(key_codec("budget-chan-r16"), "int4:g64:chan:r128");
  const KvGridRow* kv = find_row(rows, "kv2-tok+hq-r8");
  ASSERT_NE(kv, nullptr);
  EXPECT_EQ(kv->value_codec.text(), "int2:g64:tok");
  EXPECT_EQ(kv->base, "kv2-tok");
  EXPECT_EQ(find_row(rows, "k2-tok+hq-r8-keypca")->base, "k2-tok");
  EXPECT_EQ(find_row(rows, "k3-tok")->value_codec.text(), "f32");
  // Value rows: f32 keys; the policies spend 3 code bits on average, as int3 does.
  EXPECT_EQ(find_row(rows, "v3-uniform")->value_codec.text(), "int3:g64:tok");
  EXPECT_EQ(find_row(rows, "v3-a2")->value_codec.text(), "a2:int2/int4:g64:w64:avg3");
  EXPECT_EQ(find_row(rows, "v3-recency")->key_codec.text(), "f32");
  for (const char* name :
       {"v3-uniform", "v3-recency", "v3-a1", "v3-a2", "v3-a2-3lvl", "v3-a2e", "v3-a2e-3lvl",
        "v3-a2-fromfloat", "v3-a2-3lvl-fromfloat", "v3-a2e-fromfloat", "v3-a2e-3lvl-fromfloat"})
    EXPECT_EQ(codec_bits(find_row(rows, name)->value_codec.codec, 64).bits_per_vector, 64 * 3.5)
        << name;
  EXPECT_EQ(find_row(rows, "v3-a2-3lvl")->value_codec.text(), "a2:int2/int3/int4:g64:w64:avg3");
  EXPECT_EQ(find_row(rows, "v3-a2e")->value_codec.text(), "a2e:int2/int4:g64:w64:avg3");
  EXPECT_EQ(find_row(rows, "v3-a2e-3lvl-fromfloat")->value_codec.text(),
            "a2e:int2/int3/int4:g64:w64:avg3:fromfloat");
  EXPECT_EQ(find_row(rows, "v2.5-a2-3lvl-ramp")->value_codec.text(),
            "a2:int2/int3/int4:g64:w64:avg2.5:ramp");
  // At 2.5 code bits: 192 bits per value, the plain int2:g32 codec's.
  EXPECT_EQ(find_row(rows, "v2.5-plain")->value_codec.text(), "int2:g32:tok");
  EXPECT_EQ(find_row(rows, "v2.5-a2e-3lvl")->value_codec.text(),
            "a2e:int2/int3/int4:g64:w64:avg2.5");
  for (const char* name : {"v2.5-plain", "v2.5-a2", "v2.5-a2-3lvl", "v2.5-a2e", "v2.5-a2e-3lvl"})
    EXPECT_EQ(codec_bits(find_row(rows, name)->value_codec.codec, 64).bits_per_vector, 192.0)
        << name;
  // The composition: HeadQ keys with A2 values at 2.5 code bits (192 bits per value), and the
  // plain codec of the same bits.
  EXPECT_EQ(find_row(rows, "kv2-tok+hq-r8+a2")->value_codec.text(), "a2:int2/int4:g64:w64:avg2.5");
  EXPECT_EQ(find_row(rows, "kv2-tok+hq-r8+a2")->base, "kv2-tok");
  EXPECT_EQ(find_row(rows, "kv2-chan+hq-r8+v192")->value_codec.text(), "int2:g32:tok");

  for (const KvGridRow& r : rows) {
    if (r.kind != KvGridRowKind::SameBudget) continue;
    const std::string rank = r.name.substr(r.name.rfind("-r") + 2);
    const std::string headq_row = "k2-" + r.name.substr(7, r.name.rfind("-r") - 7) + "+hq-r" + rank;
    const double budget = codec_bits(parse_codec_spec(key_codec(headq_row)), 64).bits_per_vector;
    const double plain = codec_bits(r.key_codec.codec, 64).bits_per_vector;
    EXPECT_LE(plain, budget) << r.name;
    EXPECT_GT(plain, budget - 32) << r.name;
  }

  // Without rank 8, the controls use the largest rank.
  const std::vector<KvGridRow> other = kv_grid_rows(64, KvGridSpec{{2, 4}, 4});
  EXPECT_NE(find_row(other, "k2-tok+hq-r4-random"), nullptr);
  EXPECT_EQ(find_row(other, "k2-tok+hq-r8"), nullptr);
}

TEST(KvGrid, SelectionAddsWhatTheFiguresNeedAndBadInputIsAnError) {
  const std::vector<KvGridRow> rows = kv_grid_rows(64, KvGridSpec{});
  const std::vector<KvGridRow> picked = select_kv_grid_rows(rows, {"k2-chan+hq-r4"});
  ASSERT_EQ(picked.size(), 3u);
  EXPECT_EQ(picked[0].name, "dense");
  EXPECT_EQ(picked[1].name, "k2-chan");
  EXPECT_EQ(picked[2].name, "k2-chan+hq-r4");
  EXPECT_EQ(kv_grid_basis_rank(picked), 4);
  EXPECT_EQ(kv_grid_basis_rank(select_kv_grid_rows(rows, {"k2-tok+hq-r8-random", "k4-tok"})), 0);
  EXPECT_EQ(kv_grid_basis_rank(rows), 16);

  EXPECT_NE(error_of([&] {
              select_kv_grid_rows(rows, {"k5-tok"});
            }).find("unknown row 'k5-tok' (rows: dense, k2-tok"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              kv_grid_rows(64, KvGridSpec{{0}, 4});
            }).find("rank 0 is outside 1..64"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              kv_grid_rows(16, KvGridSpec{{4, 32}, 4});
            }).find("rank 32"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              kv_grid_rows(64, KvGridSpec{{}, 4});
            }).find("no HeadQ rank"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              kv_grid_rows(64, KvGridSpec{{8}, 5});
            }).find("side bits"),
            std::string::npos);
}

// `eval kv --keys`: extra rows named by their specs; a query-basis row needs a full-rank basis.
TEST(KvGrid, KeyCodecRowsAndTheBasisTheyNeed) {
  const std::vector<KvGridRow> dense =
      select_kv_grid_rows(kv_grid_rows(64, KvGridSpec{}), {"dense"});
  const std::vector<KvGridRow> rows =
      with_key_codec_rows(dense, {parse_key_codec_spec("qbasis:b3:g32:chan:r128:random"),
                                  parse_key_codec_spec("int2:g32:tok:had")});
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[1].name, "qbasis:b3:g32:chan:r128:random");
  EXPECT_EQ(rows[2].name, "int2:g32:tok:had");
  EXPECT_TRUE(rows[2].value_codec.codec.is_dense());
  EXPECT_EQ(kv_grid_run_count(rows), 3);
  // Even the random-basis control reads λ and σ from the calibration, at full rank.
  EXPECT_EQ(kv_grid_basis_rank(rows, 64), 64);
  EXPECT_EQ(kv_grid_basis_rank(dense, 64), 0);
  EXPECT_NE(error_of([&] { kv_grid_basis_rank(rows); }).find("head dimension"), std::string::npos);
  EXPECT_NE(error_of([&] {
              with_key_codec_rows(rows, {parse_key_codec_spec("int2:g32:tok:had")});
            }).find("'int2:g32:tok:had' given twice"),
            std::string::npos);
}

// The whole grid on the fixture (head_dim 16: per-token groups of 16 channels).
TEST(KvGrid, RunsOnTheFixtureAndTheDenseRowIsDecodePerplexity) {
  const Model llama = Model::load(kModels + "/llama");
  CalibrationOptions calibration;
  calibration.tokens = 64;
  calibration.rank = 16;
  calibration.window = 32;
  const HeadqBasis basis = calibrate_headq(llama, kText, "inline", calibration);
  Decoder decoder(llama);
  const int64_t d = decoder.cache_shape().head_dim;
  ASSERT_EQ(d, 16);
  const std::vector<KvGridRow> rows = kv_grid_rows(d, KvGridSpec{});
  EXPECT_EQ(find_row(rows, "k2-tok")->key_codec.text(), "int2:g16:tok");

  std::vector<int32_t> tokens = llama.tokenizer().encode(kText + kText, false);
  KvGridOptions options;
  options.window = 32;
  options.max_tokens = 45;
  options.bos = llama.tokenizer().bos_id();
  int64_t progress_calls = 0, last_run = -1, runs_seen = 0;
  const std::vector<KvGridResult> results =
      run_kv_grid(decoder, tokens, rows, options, &basis,
                  [&](int64_t run, int64_t runs, const KvGridRow&, int64_t done, int64_t total) {
                    ++progress_calls;
                    EXPECT_GE(run, last_run);
                    last_run = run;
                    runs_seen = runs;
                    EXPECT_LE(done, total);
                  });
  ASSERT_EQ(results.size(), rows.size());
  EXPECT_GT(progress_calls, 0);
  EXPECT_EQ(last_run + 1, runs_seen);
  EXPECT_EQ(runs_seen, static_cast<int64_t>(rows.size()));  // no two rows share codecs at d = 16

  PerplexityOptions ppl;
  EXPECT_EQ(options.mode, PerplexityMode::DecodeBatched);  // the grid's default
  ppl.mode = PerplexityMode::DecodeBatched;
  ppl.window = 32;
  ppl.max_tokens = 45;
  ppl.bos = llama.tokenizer().bos_id();
  const PerplexityResult dense = perplexity(decoder, tokens, ppl);
  ASSERT_EQ(results[0].row.name, "dense");
  EXPECT_EQ(results[0].ppl.ppl, dense.ppl);  // exactly
  EXPECT_EQ(results[0].ppl.nll, dense.nll);
  EXPECT_EQ(results[0].ppl.tokens, 45);
  // The token-by-token reference differs only by the rounding of the weight products.
  ppl.mode = PerplexityMode::Decode;
  EXPECT_NEAR(perplexity(decoder, tokens, ppl).nll, dense.nll, 1e-5 * dense.nll);
  ppl.mode = PerplexityMode::DecodeBatched;

  // A plain row: the same as perplexity() with its codec.
  ppl.key_codec = parse_key_codec_spec("int2:g16:tok");
  const double int2 = perplexity(decoder, tokens, ppl).ppl;
  const auto by_name = [&](const std::string& name) -> const KvGridResult& {
    const auto it = std::find_if(results.begin(), results.end(),
                                 [&](const KvGridResult& r) { return r.row.name == name; });
    EXPECT_NE(it, results.end()) << name;
    return *it;
  };
  EXPECT_EQ(by_name("k2-tok").ppl.ppl, int2);
  // The grid compares every row with the logits the dense run recorded; the dense run beside the
  // row (PerplexityOptions::reference) gives the same figures, bit for bit.
  PerplexityOptions beside = ppl;
  beside.reference = ReferenceRun{};
  const PerplexityResult side_by_side = perplexity(decoder, tokens, beside);
  const PerplexityResult& recorded = by_name("k2-tok").ppl;
  ASSERT_TRUE(side_by_side.divergence.has_value());
  ASSERT_TRUE(recorded.divergence.has_value());
  EXPECT_GT(recorded.divergence->kl_mean, 0);
  EXPECT_EQ(recorded.divergence->kl_mean, side_by_side.divergence->kl_mean);
  EXPECT_EQ(recorded.divergence->kl_p99, side_by_side.divergence->kl_p99);
  EXPECT_EQ(recorded.divergence->kl_max, side_by_side.divergence->kl_max);
  EXPECT_EQ(recorded.divergence->top1_agreement, side_by_side.divergence->top1_agreement);
  EXPECT_EQ(recorded.divergence->positions, 45);
  ASSERT_TRUE(recorded.reference_nll.has_value());
  EXPECT_EQ(*recorded.reference_nll, dense.nll);
  EXPECT_EQ(*side_by_side.reference_nll, dense.nll);
  EXPECT_FALSE(results[0].ppl.divergence.has_value());  // dense is the reference
  // Misused stores are errors that say what is wrong.
  {
    PerplexityOptions bad = ppl;
    LogitStore wrong_vocab(7), empty(llama.config().vocab_size);
    bad.reference_logits = &wrong_vocab;
    EXPECT_NE(error_of([&] { perplexity(decoder, tokens, bad); }).find("a logit store of 7 logits"),
              std::string::npos);
    bad.reference_logits = &empty;
    EXPECT_NE(
        error_of([&] { perplexity(decoder, tokens, bad); }).find("holds 0 rows, 45 are scored"),
        std::string::npos);
    bad.reference = ReferenceRun{};
    EXPECT_NE(error_of([&] { perplexity(decoder, tokens, bad); }).find("given together"),
              std::string::npos);
    bad = ppl;
    empty.append(std::vector<float>(static_cast<size_t>(llama.config().vocab_size)));
    bad.record_logits = &empty;
    EXPECT_NE(error_of([&] { perplexity(decoder, tokens, bad); }).find("holds 1 rows already"),
              std::string::npos);
  }
  // Rows with the same codecs run once and share the result.
  const std::vector<KvGridRow> twins = {
      rows[0],
      *find_row(rows, "k2-tok"),
      {"twin", KvGridRowKind::Plain, parse_key_codec_spec("int2:g16:tok"), {}, "", ""}};
  int64_t twin_runs = 0;
  const std::vector<KvGridResult> twin_results = run_kv_grid(
      decoder, tokens, twins, options, nullptr,
      [&](int64_t, int64_t runs, const KvGridRow&, int64_t, int64_t) { twin_runs = runs; });
  EXPECT_EQ(twin_runs, 2);
  EXPECT_EQ(twin_results[2].ppl.ppl, int2);
  EXPECT_EQ(twin_results[2].row.name, "twin");
  EXPECT_EQ(twin_results[2].same_run_as, "k2-tok");  // marked as computed once
  EXPECT_EQ(twin_results[1].same_run_as, "");

  for (int64_t r : {4, 8, 16}) {
    const KvGridResult& h = by_name("k2-tok+hq-r" + std::to_string(r));
    EXPECT_TRUE(std::isfinite(h.ppl.ppl));
    EXPECT_EQ(h.key_bits.side_bits_per_vector, r * 4 + 32);
  }
  for (const KvGridResult& x : results) {
    EXPECT_EQ(x.key_bits.bits_per_vector, codec_bits(x.row.key_codec.codec, d).bits_per_vector)
        << x.row.name;
    EXPECT_EQ(x.value_bits.bits_per_vector, codec_bits(x.row.value_codec.codec, d).bits_per_vector)
        << x.row.name;
    EXPECT_DOUBLE_EQ(x.delta_ppl, x.ppl.ppl - dense.ppl);
    const bool headq = x.row.kind == KvGridRowKind::Headq || x.row.kind == KvGridRowKind::Control ||
                       x.row.kind == KvGridRowKind::FullKvHeadq ||
                       x.row.kind == KvGridRowKind::FullKvHeadqValues;
    if (!headq) {
      EXPECT_FALSE(x.excess_removed.has_value()) << x.row.name;
      continue;
    }
    const double base = by_name(x.row.base).ppl.ppl;
    ASSERT_TRUE(x.excess_removed.has_value()) << x.row.name;
    EXPECT_DOUBLE_EQ(*x.excess_removed, (base - x.ppl.ppl) / (base - dense.ppl)) << x.row.name;
  }
  EXPECT_EQ(by_name("dense").key_bits.bits_per_vector, 32 * 16);
  EXPECT_EQ(by_name("k2-tok+hq-r8").key_bits.bits_per_vector, 16 * 2 + 32 + 8 * 4 + 32);
  EXPECT_EQ(by_name("kv2-tok").value_bits.bits_per_vector, 16 * 2 + 32);

  // Bad options.
  KvGridOptions bad = options;
  bad.max_tokens = -1;
  EXPECT_NE(error_of([&] { run_kv_grid(decoder, tokens, rows, bad, &basis); }).find("negative"),
            std::string::npos);
  bad = options;
  bad.window = 1000;  // beyond the fixture's 128 positions
  EXPECT_NE(error_of([&] { run_kv_grid(decoder, tokens, rows, bad, &basis); }).find("context"),
            std::string::npos);
  EXPECT_NE(error_of([&] { run_kv_grid(decoder, tokens, rows, options, nullptr); }).find("basis"),
            std::string::npos);
}

// --- the command ------------------------------------------------------------------------------

ProgramRun run_cli(const std::string& args) { return run_visikv("-t 1 " + args); }

// Rows go out and come back in order; bad requests are errors that name the problem.
TEST(LogitStore, RoundTripsRowsAndRejectsBadRequests) {
  LogitStore store(5);
  EXPECT_EQ(store.vocab(), 5);
  std::vector<float> rows(15);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = 0.25f * static_cast<float>(i) - 1.0f;
  store.append(std::span<const float>(rows).subspan(0, 10));
  store.append(std::span<const float>(rows).subspan(10, 5));
  EXPECT_EQ(store.rows(), 3);
  std::vector<float> back(10, -99.0f);
  store.read(1, 2, back);
  EXPECT_TRUE(std::equal(back.begin(), back.end(), rows.begin() + 5));
  store.read(0, 1, back);
  EXPECT_TRUE(std::equal(back.begin(), back.begin() + 5, rows.begin()));
  EXPECT_NE(error_of([&] { store.read(2, 2, back); }).find("rows [2, 4) asked for, 3 stored"),
            std::string::npos);
  EXPECT_NE(error_of([&] { store.read(0, 3, back); }).find("10 floats for 3 rows"),
            std::string::npos);
  EXPECT_NE(error_of([&] { store.append(std::vector<float>(7)); }).find("not whole rows of 5"),
            std::string::npos);
  EXPECT_NE(error_of([] { LogitStore bad(0); }).find("must be positive"), std::string::npos);
}

TEST(EvalKvCommand, WritesTheTableAndJson) {
  const fs::path text = temp_path("eval_kv_text.txt"), json_path = temp_path("eval_kv.json");
  std::ofstream(text) << kText << kText << kText;
  const std::string common = "eval kv " + kModels + "/llama --text " + text.string() +
                             " --calibration-text " + text.string() + " --window 32";
  ProgramRun r =
      run_cli(common + " --tokens 20 --calibration-tokens 64 --json " + json_path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("k2-tok+hq-r8-keypca"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("v3-a2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[1/56] dense: 20/20 tokens"), std::string::npos) << r.output;
  std::ifstream in(json_path);
  const nlohmann::json j = nlohmann::json::parse(in);
  fs::remove(json_path);
  EXPECT_EQ(j["tokens"], 20);
  EXPECT_EQ(j["window"], 32);
  EXPECT_TRUE(j["model"].is_string());
  EXPECT_EQ(j["basis"]["source"], "calibrated");
  EXPECT_EQ(j["basis"]["rank"], 16);
  EXPECT_EQ(j["basis"]["tokens"], 64);
  ASSERT_EQ(j["rows"].size(), 56u);
  for (const auto& row : j["rows"]) {
    for (const char* key : {"name", "key_codec", "value_codec", "bits_per_key", "bits_per_value",
                            "ppl", "excess_removed"})
      EXPECT_TRUE(row.contains(key)) << key;
    const std::string name = row["name"];
    const bool headq = name.find("+hq-") != std::string::npos;
    EXPECT_EQ(row["excess_removed"].is_null(), !headq) << name;
    // KL from dense: every row but dense itself (and a row that reports dense's run).
    const bool reference = name == "dense" || row["same_run_as"] == "dense";
    for (const char* key : {"kl_mean", "kl_p99", "kl_max", "top1_agreement"})
      EXPECT_EQ(row[key].is_null(), reference) << name << " " << key;
    if (!reference) {
      EXPECT_GE(row["kl_p99"].get<double>(), 0) << name;
      EXPECT_LE(row["kl_p99"].get<double>(), row["kl_max"].get<double>()) << name;
      EXPECT_GE(row["top1_agreement"].get<double>(), 0) << name;
      EXPECT_LE(row["top1_agreement"].get<double>(), 1) << name;
    }
    EXPECT_EQ(
        row["bits_per_key"].get<double>(),
        codec_bits(parse_codec_spec(row["key_codec"].get<std::string>()), 16).bits_per_vector);
  }
  EXPECT_EQ(j["rows"][0]["name"], "dense");
  EXPECT_EQ(j["rows"][0]["bits_per_value"], 512);
  EXPECT_EQ(j["mode"], "decode-batched");
  EXPECT_EQ(j["complete"], true);
  EXPECT_EQ(j["parameters"]["window"], 32);
  EXPECT_TRUE(j["rows"][0]["same_run_as"].is_null());

  // A basis file; then one for another model.
  const fs::path basis_path = temp_path("eval_kv.basis");
  CalibrationOptions calibration;
  calibration.tokens = 40;
  calibration.rank = 8;
  calibration.window = 32;
  save_headq_basis(calibrate_headq(Model::load(kModels + "/llama"), kText, "t", calibration),
                   basis_path);
  r = run_cli(common + " --tokens 10 --basis " + basis_path.string() +
              " --ranks 4,8 --rows k2-tok+hq-r8,k2-tok+hq-r8-random");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("k2-tok+hq-r8-random"), std::string::npos) << r.output;
  r = run_cli(common + " --tokens 10 --basis " + basis_path.string());  // rank 16 needed
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("rank 16"), std::string::npos) << r.output;
  save_headq_basis(calibrate_headq(Model::load(kModels + "/mistral"), kText, "t", calibration),
                   basis_path);
  r = run_cli(common + " --tokens 10 --ranks 8 --basis " + basis_path.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("fingerprint"), std::string::npos) << r.output;
  fs::remove(basis_path);

  // Bad flags.
  r = run_cli(common + " --tokens 10 --ranks 0");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--ranks: rank 0"), std::string::npos) << r.output;
  r = run_cli(common + " --tokens 10 --rows k2-tok,nonsense");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("unknown row 'nonsense'"), std::string::npos) << r.output;
  r = run_cli(common + " --tokens -5");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--tokens"), std::string::npos) << r.output;
  r = run_cli(common + " --tokens 10 --mode prefill");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--mode"), std::string::npos) << r.output;
  r = run_cli(common + " --tokens 10 --ranks 64");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("rank 64 is outside 1..16"), std::string::npos) << r.output;
  fs::remove(text);
}

}  // namespace
}  // namespace visikv

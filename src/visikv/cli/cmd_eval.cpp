// `visikv eval ...`: evaluation protocols that compare a compressed or sparse model with the dense
// one. The protocols live in src/visikv/eval/; each subcommand here parses its flags, runs the
// protocol, prints its table and writes its JSON.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/cli/basis_source.h"
#include "visikv/cli/commands.h"
#include "visikv/cli/long_run.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/coverage.h"
#include "visikv/eval/kv_grid.h"
#include "visikv/eval/needle.h"
#include "visikv/eval/report.h"
#include "visikv/eval/survival.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {

using nlohmann::json;

// The paper's setting, block selectors at a similar support, larger supports, and the certified
// mode: its per-channel box (which reads nearly the whole context, docs/RESULTS.md) and its
// position sketches at two targets.
const std::vector<std::string> kSparseGrid = {"sparse:a1:w64:k32:exact",
                                              "sparse:a1:w64:k32:b16:centroid",
                                              "sparse:a1:w64:k32:b16:bound",
                                              "sparse:a1:w64:k128:exact",
                                              "sparse:a1:w64:k128:b16:bound",
                                              "sparse:a1:w64:k512:exact",
                                              "sparse:a1:w64:k512:b16:bound",
                                              "certified:a1:w64:b16:eps0.01",
                                              "certified:a1:w64:b16:eps0.05:p8:gqa=head",
                                              "certified:a1:w64:b16:eps0.01:p8:gqa=head"};
const std::vector<std::string> kSparseQuickGrid = {
    "sparse:a1:w64:k32:exact", "sparse:a1:w64:k32:b16:centroid", "sparse:a1:w64:k32:b16:bound",
    "certified:a1:w64:b16:eps0.05:p8:gqa=head"};
const std::vector<std::string> kNeedleGrid = {
    "sparse:a1:w64:k32:exact", "sparse:a1:w64:k32:b16:bound", "sparse:a1:w64:k128:b16:bound",
    "certified:a1:w64:b16:eps0.01:p8:gqa=head"};
const std::vector<std::string> kNeedleQuickGrid = {"sparse:a1:w64:k32:exact",
                                                   "sparse:a1:w64:k32:b16:bound"};

// Flags every eval subcommand shares.
struct CommonFlags {
  std::string model, keys = "f32", values = "f32", text;
  std::vector<std::string> selectors;
  bool quick = false;
  RunOutputFlags output;
};

void add_common_flags(CLI::App* cmd, CommonFlags& f) {
  cmd->add_option("model", f.model, "Hugging Face directory, .gguf file, or 'default'")->required();
  cmd->add_option("--selectors", f.selectors,
                  "comma-separated selector specs (docs/SELECTOR_SPECS.md); default: a grid")
      ->delimiter(',');
  cmd->add_option("--keys", f.keys, "key cache codec (docs/CACHE_SPECS.md; default f32)");
  cmd->add_option("--values", f.values, "value cache codec (default f32)");
  cmd->add_option("--text", f.text, "text file (default: WikiText-103 test)");
  add_run_output_options(*cmd, f.output, "the results");
  cmd->add_flag("--quick", f.quick, "a small grid that runs in a few minutes on 2 cores");
}

// The codecs and selectors of an eval command, parsed once from its flags.
struct ParsedSpecs {
  KeyCodecSpec keys;
  ValueCodecSpec values;
  std::vector<NamedSelectorSpec> selectors;
};

// Parses every spec up front, so a typo fails before any model time is spent. The codecs are
// also checked against the model's heads by building a one-token cache.
ParsedSpecs parse_specs(const std::vector<std::string>& selectors, const CommonFlags& f,
                        const Decoder& decoder) {
  require(!selectors.empty(), "no selectors given");
  ParsedSpecs specs{parse_flag("--keys", f.keys, parse_key_codec_spec),
                    parse_flag("--values", f.values, parse_value_codec_spec),
                    {}};
  for (const std::string& s : selectors)
    specs.selectors.push_back(parse_flag("--selectors", s, parse_named_selector_spec));
  make_cache(decoder.cache_shape(), specs.keys, specs.values, 1);
  return specs;
}

// ---- eval sparse ----

struct SparseFlags : CommonFlags {
  int64_t prefix = 1024, continuation = 64, samples = 4;
  double temperature = 0;
  uint64_t seed = 0;
};

// What the table and the JSON report: the inputs as used and one row per selector.
struct SparseRun {
  std::string model, text;
  SurvivalOptions options;
  std::vector<SurvivalRow> rows;
};

json sparse_json(const SparseRun& run, const SparseFlags& f);
SurvivalRow survival_row_from_json(const json& j);

SparseRun run_eval_sparse(CLI::App* cmd, SparseFlags& f) {
  if (f.quick) {  // quick values for what was not given explicitly
    if (cmd->count("--prefix") == 0) f.prefix = 512;
    if (cmd->count("--continuation") == 0) f.continuation = 32;
    if (cmd->count("--samples") == 0) f.samples = 2;
  }
  const std::vector<std::string> selectors =
      !f.selectors.empty() ? f.selectors : (f.quick ? kSparseQuickGrid : kSparseGrid);
  require(f.prefix >= 1, "--prefix must be at least 1, got ", f.prefix);
  require(f.continuation >= 1, "--continuation must be at least 1, got ", f.continuation);
  require(f.samples >= 1, "--samples must be at least 1, got ", f.samples);

  const Model model = Model::load(f.model);
  SparseRun run;
  run.model = model.source();
  Decoder decoder(model);
  const ParsedSpecs specs = parse_specs(selectors, f, decoder);
  SurvivalOptions& options = run.options;
  options.prefix = f.prefix;
  options.continuation = f.continuation;
  options.samples = f.samples;
  options.key_codec = specs.keys;
  options.value_codec = specs.values;
  options.temperature = f.temperature;
  options.seed = f.seed;
  if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
  check_survival_options(model.config(), options);

  const std::filesystem::path text_path = text_or_default_test_text(f.text);
  run.text = text_path.string();
  const std::vector<int32_t> tokens =
      text_file_tokens(model.tokenizer(), text_path, survival_text_tokens(options));
  const auto prefixes = survival_prefixes(tokens, options);

  const RowJournal journal = open_row_journal(f.output, "eval sparse",
                                              {{"model", run.model},
                                               {"text", run.text},
                                               {"prefix", f.prefix},
                                               {"continuation", f.continuation},
                                               {"samples", f.samples},
                                               {"key_codec", specs.keys.text()},
                                               {"value_codec", specs.values.text()},
                                               {"temperature", f.temperature},
                                               {"seed", f.seed}},
                                              {.key = "selector"});
  journal.check_rows(selectors);
  RowProgress progress(static_cast<int64_t>(selectors.size()), f.output.quiet);
  std::optional<std::vector<DenseReference>> refs;  // computed when a row needs them
  for (const NamedSelectorSpec& selector : specs.selectors) {
    if (const json* kept = journal.kept_row(selector.text)) {
      run.rows.push_back(
          journal.read(*kept, "row '" + selector.text + "'", survival_row_from_json));
      progress.kept(selector.text);
    } else {
      if (!refs) {
        progress.note(str_cat("dense reference: ", f.samples, " prefixes of ", f.prefix,
                              " tokens, ", f.continuation, " greedy tokens each"));
        refs = dense_references(decoder, prefixes, options);
      }
      progress.start(selector.text);
      run.rows.push_back(survival_row(
          decoder, *refs, selector, options,
          [&](int64_t done, int64_t n) { progress.update(selector.text, done, n, "samples"); }));
      progress.finish();
    }
    journal.save(sparse_json(run, f), run.rows.size() == specs.selectors.size());
  }
  return run;
}

void print_sparse_table(const SparseRun& run, const SparseFlags& f) {
  const SurvivalOptions& options = run.options;
  const std::vector<SurvivalRow>& rows = run.rows;
  const long long T = f.continuation;
  std::printf("model:        %s\n", run.model.c_str());
  std::printf("text:         %s\n", run.text.c_str());
  std::printf(
      "protocol:     %lld prefixes of %lld tokens%s, dense greedy reference of %lld tokens\n",
      static_cast<long long>(f.samples), static_cast<long long>(f.prefix),
      options.bos ? " (BOS first)" : "", T);
  std::printf("cache:        keys %s, values %s\n", f.keys.c_str(), f.values.c_str());
  std::printf("dense PPL of its own continuation: %.4f\n\n",
              rows.empty() ? 0.0 : rows[0].ppl_dense);
  std::printf("%-36s %9s %7s %8s %10s %8s %9s %10s %10s  %s\n", "selector", "support", "max",
              "context", "first div", "TF top1", "dPPL %", "delta max", "err max", "note");
  for (const SurvivalRow& r : rows) {
    std::string note;
    if (r.identical) {
      note = "identical over " + std::to_string(T) + " tokens in every sample";
    } else {
      note = "first divergence min " + std::to_string(r.first_divergence_min);
    }
    if (r.bound_max) {
      note += r.bound_violations == 0
                  ? "; bound held in " + std::to_string(r.queries_measured) + " queries"
                  : "; BOUND VIOLATED in " + std::to_string(r.bound_violations) + " of " +
                        std::to_string(r.queries_measured) + " queries";
    }
    std::printf("%-36s %9.1f %7lld %8.1f %5.1f/%-4lld %8.4f %9.3f %10s %10s  %s\n",
                r.selector.c_str(), r.support_mean, static_cast<long long>(r.support_max),
                r.context_mean, r.first_divergence_mean, T, r.tf_match, r.delta_ppl_pct,
                format_optional(r.bound_max, "%.2e").c_str(),
                format_optional(r.measured_err_max, "%.2e").c_str(), note.c_str());
  }
  if (f.temperature > 0) {
    std::printf(
        "\nsampling at temperature %g, seed %llu (sample i: seed + i), dense and sparse "
        "coupled through the same random draws:\n%-36s %14s %11s\n",
        f.temperature, static_cast<unsigned long long>(f.seed), "selector", "sampled div",
        "agreement");
    for (const SurvivalRow& r : rows)
      std::printf("%-36s %8.1f/%-5lld %11.4f\n", r.selector.c_str(),
                  r.sampling_first_divergence_mean, T, r.sampling_agreement.value_or(NAN));
  }
  std::printf(
      "\nsupport: unique positions read per KV head per prediction query (mean over queries, "
      "layers, KV heads); context: visible positions; first div: mean step of the first "
      "greedy token that differs from the dense reference, over samples; TF top1: teacher-forced "
      "top-1 agreement; dPPL: sparse vs dense PPL on the dense continuation; delta: certified "
      "bound on the dropped attention mass; err: max ||o_S - o|| / (2 max||v||) against dense "
      "attention over the same cache.\n");
}

json survival_row_json(const SurvivalRow& r) {
  return {{"selector", r.selector},
          {"support_mean", r.support_mean},
          {"support_max", r.support_max},
          {"context_mean", r.context_mean},
          {"first_divergence", r.first_divergence_mean},
          {"first_divergence_min", r.first_divergence_min},
          {"first_divergence_per_sample", r.first_divergence},
          {"identical", r.identical},
          {"tf_match", r.tf_match},
          {"delta_ppl_pct", r.delta_ppl_pct},
          {"nll_dense", r.nll_dense},
          {"nll_sparse", r.nll_sparse},
          {"ppl_dense", r.ppl_dense},
          {"ppl_sparse", r.ppl_sparse},
          {"bound_max", optional_json(r.bound_max)},
          {"measured_err_max", optional_json(r.measured_err_max)},
          {"bound_violations", r.bound_max ? json(r.bound_violations) : json(nullptr)},
          {"queries_measured", r.queries_measured},
          {"sampling_first_divergence",
           r.sampling_agreement ? json(r.sampling_first_divergence_mean) : json(nullptr)},
          {"sampling_first_divergence_per_sample", r.sampling_first_divergence},
          {"sampling_agreement", optional_json(r.sampling_agreement)},
          {"seconds", r.seconds}};
}

// The row survival_row_json wrote (--resume).
SurvivalRow survival_row_from_json(const json& j) {
  SurvivalRow r;
  r.selector = j.at("selector").get<std::string>();
  r.support_mean = j.at("support_mean").get<double>();
  r.support_max = j.at("support_max").get<int64_t>();
  r.context_mean = j.at("context_mean").get<double>();
  r.first_divergence_mean = j.at("first_divergence").get<double>();
  r.first_divergence_min = j.at("first_divergence_min").get<int64_t>();
  r.first_divergence = j.at("first_divergence_per_sample").get<std::vector<int64_t>>();
  r.identical = j.at("identical").get<bool>();
  r.tf_match = j.at("tf_match").get<double>();
  r.delta_ppl_pct = j.at("delta_ppl_pct").get<double>();
  r.nll_dense = j.at("nll_dense").get<double>();
  r.nll_sparse = j.at("nll_sparse").get<double>();
  r.ppl_dense = j.at("ppl_dense").get<double>();
  r.ppl_sparse = j.at("ppl_sparse").get<double>();
  r.bound_max = optional_from_json(j.at("bound_max"));
  r.measured_err_max = optional_from_json(j.at("measured_err_max"));
  r.bound_violations = optional_from_json(j.at("bound_violations")).value_or(0);
  r.queries_measured = j.at("queries_measured").get<int64_t>();
  r.sampling_first_divergence_mean =
      optional_from_json(j.at("sampling_first_divergence")).value_or(0);
  r.sampling_first_divergence =
      j.at("sampling_first_divergence_per_sample").get<std::vector<int64_t>>();
  r.sampling_agreement = optional_from_json(j.at("sampling_agreement"));
  r.seconds = j.at("seconds").get<double>();
  return r;
}

json sparse_json(const SparseRun& run, const SparseFlags& f) {
  const SurvivalOptions& options = run.options;
  json out = {{"model", run.model},           {"text", run.text},
              {"prefix", f.prefix},           {"continuation", f.continuation},
              {"samples", f.samples},         {"bos_first", options.bos.has_value()},
              {"key_codec", f.keys},          {"value_codec", f.values},
              {"temperature", f.temperature}, {"seed", f.seed},
              {"rows", json::array()}};
  for (const SurvivalRow& r : run.rows) out["rows"].push_back(survival_row_json(r));
  return out;
}

void add_eval_sparse_command(CLI::App& eval) {
  auto flags = std::make_shared<SparseFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "sparse",
      "Survival of sparse attention against the dense greedy continuation (first divergence, "
      "teacher-forced agreement, dPPL, support, certified bound vs measured error)");
  add_common_flags(cmd, *flags);
  cmd->add_option("--prefix,-N", flags->prefix, "tokens per prefix (default 1024; quick 512)");
  cmd->add_option("--continuation,-T", flags->continuation,
                  "dense reference tokens (default 64; quick 32)");
  cmd->add_option("--samples,-S", flags->samples,
                  "prefixes, from consecutive parts of the text (default 4; quick 2)");
  cmd->add_option("--temperature", flags->temperature,
                  "also measure agreement under sampling at this temperature with a shared seed "
                  "(default 0: off)");
  cmd->add_option("--seed", flags->seed, "sampling seed of the first prefix (default 0)");
  cmd->callback([cmd, flags] {
    apply_global_options();
    // The JSON file is written row by row.
    print_sparse_table(run_eval_sparse(cmd, *flags), *flags);
  });
}

// ---- eval needle ----

struct NeedleFlags : CommonFlags {
  std::vector<int64_t> contexts;
  std::vector<double> depths;
  std::vector<int64_t> needles;
  int64_t answer_tokens = 10;
};

std::string cell_key(int64_t context, int64_t needles) {
  return "L" + std::to_string(context) + " k" + std::to_string(needles);
}

// What the table and the JSON report: the inputs as used and one row per selector.
struct NeedleRun {
  std::string model, text;
  NeedleOptions options;
  size_t cases = 0;
  std::vector<NeedleRow> rows;
};

json needle_json(const NeedleRun& run, const NeedleFlags& f);
NeedleRow needle_row_from_json(const json& j);

NeedleRun run_eval_needle(const NeedleFlags& f) {
  NeedleRun run;
  NeedleOptions& options = run.options;
  if (f.quick) options.contexts = {256, 512};
  if (!f.contexts.empty()) options.contexts = f.contexts;
  if (!f.depths.empty()) options.depths = f.depths;
  if (!f.needles.empty()) options.needles = f.needles;
  options.answer_tokens = f.answer_tokens;
  std::vector<std::string> selectors = {"dense"};
  const auto& grid =
      !f.selectors.empty() ? f.selectors : (f.quick ? kNeedleQuickGrid : kNeedleGrid);
  for (const std::string& s : grid)
    if (s != "dense") selectors.push_back(s);

  const Model model = Model::load(f.model);
  run.model = model.source();
  Decoder decoder(model);
  const ParsedSpecs specs = parse_specs(selectors, f, decoder);
  options.key_codec = specs.keys;
  options.value_codec = specs.values;
  check_needle_options(model.config(), options);
  const std::filesystem::path text_path = text_or_default_test_text(f.text);
  run.text = text_path.string();
  const int64_t longest = *std::max_element(options.contexts.begin(), options.contexts.end());
  const std::vector<int32_t> haystack = text_file_tokens(model.tokenizer(), text_path, longest);
  const std::vector<NeedleCase> cases = needle_cases(model.tokenizer(), haystack, options);

  run.cases = cases.size();
  const RowJournal journal = open_row_journal(f.output, "eval needle",
                                              {{"model", run.model},
                                               {"text", run.text},
                                               {"contexts", options.contexts},
                                               {"depths", options.depths},
                                               {"needles", options.needles},
                                               {"answer_tokens", options.answer_tokens},
                                               {"key_codec", specs.keys.text()},
                                               {"value_codec", specs.values.text()}},
                                              {.key = "selector"});
  journal.check_rows(selectors);
  RowProgress progress(static_cast<int64_t>(selectors.size()), f.output.quiet);
  for (const NamedSelectorSpec& selector : specs.selectors) {
    if (const json* kept = journal.kept_row(selector.text)) {
      run.rows.push_back(journal.read(*kept, "row '" + selector.text + "'", needle_row_from_json));
      progress.kept(selector.text);
    } else {
      progress.start(selector.text);
      run.rows.push_back(needle_row(
          decoder, cases, selector, options,
          [&](int64_t done, int64_t n) { progress.update(selector.text, done, n, "cases"); }));
      progress.finish();
    }
    journal.save(needle_json(run, f), run.rows.size() == specs.selectors.size());
  }
  return run;
}

void print_needle_table(const NeedleRun& run, const NeedleFlags& f) {
  const NeedleOptions& options = run.options;
  // Columns: (context, needle count), each pooling the depths.
  std::vector<std::pair<int64_t, int64_t>> columns;
  for (int64_t c : options.contexts)
    for (int64_t k : options.needles) columns.emplace_back(c, k);
  std::printf("model:   %s\ntext:    %s\ncache:   keys %s, values %s\n", run.model.c_str(),
              run.text.c_str(), f.keys.c_str(), f.values.c_str());
  std::printf("cases:   contexts x depths x needle counts = %zu, greedy answer of %lld tokens\n\n",
              run.cases, static_cast<long long>(options.answer_tokens));
  std::printf("%-32s", "exact-match rate (hits/cases)");
  for (const auto& [c, k] : columns) std::printf(" %12s", cell_key(c, k).c_str());
  std::printf(" %12s\n", "all");
  for (const NeedleRow& r : run.rows) {
    std::printf("%-32s", r.selector.c_str());
    for (const auto& [c, k] : columns) {
      int64_t hits = 0, total = 0;
      for (const NeedleResult& x : r.results)
        if (x.context == c && x.needles == k) {
          ++total;
          hits += x.hit ? 1 : 0;
        }
      std::printf(" %5lld/%-6lld", static_cast<long long>(hits), static_cast<long long>(total));
    }
    std::printf(" %12.3f\n", r.exact_match_rate);
  }
  std::printf(
      "\nA hit: the asked needle's six digits appear in the greedy answer. Depths per column: ");
  for (size_t i = 0; i < options.depths.size(); ++i)
    std::printf("%s%g", i ? ", " : "", options.depths[i]);
  std::printf(".\n");
}

// The row needle_json wrote (--resume).
NeedleRow needle_row_from_json(const json& j) {
  NeedleRow r;
  r.selector = j.at("selector").get<std::string>();
  r.exact_match_rate = j.at("exact_match_rate").get<double>();
  r.seconds = j.at("seconds").get<double>();
  for (const json& c : j.at("cases"))
    r.results.push_back({c.at("context").get<int64_t>(), c.at("depth").get<double>(),
                         c.at("needles").get<int64_t>(), c.at("expected").get<std::string>(),
                         c.at("answer").get<std::string>(), c.at("hit").get<bool>()});
  return r;
}

json needle_json(const NeedleRun& run, const NeedleFlags& f) {
  const NeedleOptions& options = run.options;
  json out = {{"model", run.model},           {"text", run.text},
              {"contexts", options.contexts}, {"depths", options.depths},
              {"needles", options.needles},   {"answer_tokens", options.answer_tokens},
              {"key_codec", f.keys},          {"value_codec", f.values},
              {"rows", json::array()}};
  for (const NeedleRow& r : run.rows) {
    json cells = json::array();
    for (const NeedleResult& x : r.results)
      cells.push_back({{"context", x.context},
                       {"depth", x.depth},
                       {"needles", x.needles},
                       {"expected", x.expected},
                       {"answer", x.answer},
                       {"hit", x.hit}});
    out["rows"].push_back({{"selector", r.selector},
                           {"exact_match_rate", r.exact_match_rate},
                           {"seconds", r.seconds},
                           {"cases", cells}});
  }
  return out;
}

void add_eval_needle_command(CLI::App& eval) {
  auto flags = std::make_shared<NeedleFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "needle", "Needle-in-a-haystack retrieval, dense versus sparse attention (exact-match rate)");
  add_common_flags(cmd, *flags);
  cmd->add_option("--contexts", flags->contexts,
                  "comma-separated prompt lengths in tokens (default 512,1024,2048; quick 256,512)")
      ->delimiter(',');
  cmd->add_option("--depths", flags->depths,
                  "comma-separated depth fractions of the asked needle (default 0.1,0.5,0.9)")
      ->delimiter(',');
  cmd->add_option("--needles", flags->needles, "comma-separated needle counts (default 1,3)")
      ->delimiter(',');
  cmd->add_option("--answer-tokens", flags->answer_tokens, "greedy answer length (default 10)");
  cmd->callback([flags] {
    apply_global_options();
    // The JSON file is written row by row.
    print_needle_table(run_eval_needle(*flags), *flags);
  });
}

// ---- eval coverage ----

// The last row (the per-channel box, which reads nearly the whole context) is left out by --quick.
const std::vector<std::string> kCoverageGrid = {
    "sparse:a1:w64:k32:exact",         "sparse:a1:w64:k32:b16:centroid",
    "sparse:a1:w64:k32:b16:bound",     "certified:a1:w64:b16:eps0.01:p8:gqa=head",
    "certified:a1:w64:b16:eps0.01:p8", "certified:a1:w64:b16:eps0.01"};

struct CoverageFlags : CommonFlags {
  int64_t tokens = 2048, from = 256, anchors = 1, window = 64, top_k = 32;
  double epsilon = 0.01;
  std::string basis;
};

json shares_json(const CoverageSummary& s) {
  return {{"mean", s.mean}, {"p10", s.p10}, {"p1", s.p1}, {"min", s.min}};
}

json support_share_json(const SupportShareSummary& s) {
  return {{"mean", s.mean}, {"p50", s.p50}, {"p90", s.p90},
          {"p99", s.p99},   {"max", s.max}, {"positions", s.positions}};
}

SupportShareSummary support_share_from_json(const json& j) {
  return {j.at("mean").get<double>(), j.at("p50").get<double>(), j.at("p90").get<double>(),
          j.at("p99").get<double>(),  j.at("max").get<double>(), j.at("positions").get<double>()};
}

// What the tables and the JSON report: the inputs as used and the shares.
struct CoverageRun {
  std::string model, text;
  bool bos = false;
  CoverageResult result;
};

json coverage_json(const CoverageRun& run, const CoverageFlags& f);
CoverageResult coverage_from_json(const json& j);

CoverageRun run_eval_coverage(CLI::App* cmd, CoverageFlags& f) {
  if (f.quick && cmd->count("--tokens") == 0) f.tokens = 1024;
  std::vector<std::string> selectors = !f.selectors.empty() ? f.selectors : kCoverageGrid;
  if (f.quick && f.selectors.empty()) selectors.pop_back();
  require(f.tokens >= 2, "--tokens must be at least 2, got ", f.tokens);
  require(f.from >= 0 && f.from < f.tokens, "--from must be a position below --tokens (", f.tokens,
          "), got ", f.from);
  require(f.anchors >= 0 && f.window >= 0 && f.top_k >= 0,
          "--anchors, --window and --top-k must not be negative");
  require(f.epsilon >= 0 && f.epsilon < 1, "--epsilon must be in [0, 1), got ", f.epsilon);

  const Model model = Model::load(f.model);
  CoverageRun run;
  run.model = model.source();
  Decoder decoder(model);
  const ParsedSpecs specs = parse_specs(selectors, f, decoder);
  // The context before the text: a window past it needs no tokenizing to be refused.
  check_context(model.config(), f.tokens, str_cat("coverage: a window of ", f.tokens, " tokens"));
  const BasisSource basis = load_basis_file(model, f.basis);
  const std::filesystem::path text_path = text_or_default_test_text(f.text);
  run.text = text_path.string();
  const bool bos = run.bos = model.tokenizer().adds_bos();
  json selector_texts = json::array();
  for (const NamedSelectorSpec& s : specs.selectors) selector_texts.push_back(s.text);
  // One row: the whole measurement (a done run is read back, not rerun).
  const RowJournal journal = open_row_journal(f.output, "eval coverage",
                                              {{"model", run.model},
                                               {"text", run.text},
                                               {"tokens", f.tokens},
                                               {"from", f.from},
                                               {"anchors", f.anchors},
                                               {"window", f.window},
                                               {"top_k", f.top_k},
                                               {"epsilon", f.epsilon},
                                               {"basis", basis.json},
                                               {"key_codec", specs.keys.text()},
                                               {"value_codec", specs.values.text()},
                                               {"selectors", selector_texts}},
                                              {.rows = ""});
  if (journal.kept_complete()) {
    run.result = journal.read(journal.kept_document(), "the coverage", coverage_from_json);
    return run;
  }
  std::vector<int32_t> tokens;
  if (bos) tokens.push_back(*model.tokenizer().bos_id());
  const int64_t text_needed = bos ? f.tokens - 1 : f.tokens;
  const std::vector<int32_t> text = text_file_tokens(model.tokenizer(), text_path, text_needed);
  require(static_cast<int64_t>(text.size()) >= text_needed, "the text has ", text.size(),
          " tokens; --tokens ", f.tokens, " needs ", text_needed);
  tokens.insert(tokens.end(), text.begin(), text.begin() + text_needed);

  CoverageOptions options;
  options.from = f.from;
  options.anchors = f.anchors;
  options.window = f.window;
  options.top_k = f.top_k;
  options.epsilon = f.epsilon;
  options.basis = basis.get();
  options.key_codec = specs.keys;
  options.value_codec = specs.values;
  RowProgress progress(1, f.output.quiet);
  progress.start("coverage");
  // Steps: the dense prefill, then one per layer.
  run.result = attention_coverage(
      decoder, tokens, specs.selectors, options,
      [&](int64_t done, int64_t n) { progress.update("coverage", done, n, "steps"); });
  progress.finish();
  journal.save(coverage_json(run, f), true);
  return run;
}

void print_coverage_tables(const CoverageRun& run, const CoverageFlags& f) {
  const CoverageResult& r = run.result;
  const std::vector<std::string>& selectors = r.selectors;
  const bool bos = run.bos;
  std::printf("model:     %s\ntext:      %s\n", run.model.c_str(), run.text.c_str());
  std::printf(
      "window:    %lld tokens%s; queries at positions >= %lld, every query head (%lld per "
      "layer), mean context %.1f\n",
      static_cast<long long>(f.tokens), bos ? " (BOS first)" : "", static_cast<long long>(f.from),
      static_cast<long long>(r.queries_per_layer), r.context_mean);
  std::printf("cache:     keys %s, values %s\n", f.keys.c_str(), f.values.c_str());
  std::printf("split:     anchors a%lld, window w%lld, top-k k%lld (exact, per query head)\n\n",
              static_cast<long long>(f.anchors), static_cast<long long>(f.window),
              static_cast<long long>(f.top_k));
  std::printf("%-6s %8s %8s %8s %8s %8s %8s\n", "layer", "anchors", "window", "top-k", "a+w+k",
              "p10", "p1");
  const auto split_row = [](const std::string& name, const CoverageLayer& l) {
    std::printf("%-6s %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f\n", name.c_str(), l.anchors.mean,
                l.window.mean, l.top_k.mean, l.total.mean, l.total.p10, l.total.p1);
  };
  for (size_t i = 0; i < r.layers.size(); ++i) split_row(std::to_string(i), r.layers[i]);
  split_row("all", r.pooled);
  std::printf(
      "\nneeded: fewest positions holding 1 - %g of the mass with anchors and window read (the "
      "floor of any certified support at that epsilon), as a share of the visible context\n"
      "%-6s %9s %8s %8s %8s %8s %8s\n",
      f.epsilon, "layer", "positions", "mean", "p50", "p90", "p99", "max");
  const auto needed_row = [](const std::string& name, const CoverageLayer& l) {
    std::printf("%-6s %9.1f %8.4f %8.4f %8.4f %8.4f %8.4f\n", name.c_str(), l.needed.positions,
                l.needed.mean, l.needed.p50, l.needed.p90, l.needed.p99, l.needed.max);
  };
  for (size_t i = 0; i < r.layers.size(); ++i) needed_row(std::to_string(i), r.layers[i]);
  needed_row("all", r.pooled);
  std::printf(
      "\nmass inside each selector's support (mean / p10 / p1), support = positions read\n");
  for (size_t s = 0; s < selectors.size(); ++s) {
    std::printf("\n%s  (mean support %.1f, keys read %.1f)\n%-6s %8s %8s %8s %8s %9s\n",
                selectors[s].c_str(), r.pooled.support_mean[s], r.pooled.keys_mean[s], "layer",
                "mean", "p10", "p1", "support", "keys read");
    const auto row = [&](const std::string& name, const CoverageLayer& l) {
      std::printf("%-6s %8.4f %8.4f %8.4f %8.1f %9.1f\n", name.c_str(), l.selectors[s].mean,
                  l.selectors[s].p10, l.selectors[s].p1, l.support_mean[s], l.keys_mean[s]);
    };
    for (size_t i = 0; i < r.layers.size(); ++i) row(std::to_string(i), r.layers[i]);
    row("all", r.pooled);
  }
  std::printf(
      "\nShares of the dense softmax mass per (position, query head): mean and the 10th / 1st "
      "percentiles over queries. top-k: the k largest weights between anchors and window (the "
      "best any k dynamic positions could hold for that head).\n");
}

CoverageSummary shares_from_json(const json& j) {
  return {j.at("mean").get<double>(), j.at("p10").get<double>(), j.at("p1").get<double>(),
          j.at("min").get<double>()};
}

// The result coverage_json wrote (--resume).
CoverageResult coverage_from_json(const json& j) {
  CoverageResult r;
  r.positions = j.at("tokens").get<int64_t>();
  r.queries_per_layer = j.at("queries_per_layer").get<int64_t>();
  r.context_mean = j.at("context_mean").get<double>();
  const auto layer_from_json = [&](const json& l) {
    CoverageLayer layer{shares_from_json(l.at("anchors")),
                        shares_from_json(l.at("window")),
                        shares_from_json(l.at("top_k")),
                        shares_from_json(l.at("total")),
                        support_share_from_json(l.at("needed")),
                        {},
                        {},
                        {}};
    for (const json& s : l.at("selectors")) {
      layer.selectors.push_back(shares_from_json(s.at("coverage")));
      layer.support_mean.push_back(s.at("support_mean").get<double>());
      // Files written before keys were counted: not recorded (NaN), not guessed from the support.
      const auto keys = s.find("keys_read_mean");
      layer.keys_mean.push_back(keys != s.end() && keys->is_number()
                                    ? keys->get<double>()
                                    : std::numeric_limits<double>::quiet_NaN());
    }
    return layer;
  };
  for (const json& l : j.at("layers")) r.layers.push_back(layer_from_json(l));
  r.pooled = layer_from_json(j.at("all_layers"));
  for (const json& s : j.at("all_layers").at("selectors"))
    r.selectors.push_back(s.at("selector").get<std::string>());
  return r;
}

json coverage_json(const CoverageRun& run, const CoverageFlags& f) {
  const CoverageResult& r = run.result;
  const std::vector<std::string>& selectors = r.selectors;
  const bool bos = run.bos;
  json out = {{"model", run.model},
              {"text", run.text},
              {"tokens", f.tokens},
              {"from", f.from},
              {"bos_first", bos},
              {"anchors", f.anchors},
              {"window", f.window},
              {"top_k", f.top_k},
              {"epsilon", f.epsilon},
              {"key_codec", f.keys},
              {"value_codec", f.values},
              {"queries_per_layer", r.queries_per_layer},
              {"context_mean", r.context_mean},
              {"layers", json::array()}};
  const auto layer_json = [&](const CoverageLayer& l) {
    json sel = json::array();
    for (size_t s = 0; s < selectors.size(); ++s)
      sel.push_back({{"selector", selectors[s]},
                     {"coverage", shares_json(l.selectors[s])},
                     {"support_mean", l.support_mean[s]},
                     {"keys_read_mean", l.keys_mean[s]}});
    return json{{"anchors", shares_json(l.anchors)},      {"window", shares_json(l.window)},
                {"top_k", shares_json(l.top_k)},          {"total", shares_json(l.total)},
                {"needed", support_share_json(l.needed)}, {"selectors", sel}};
  };
  for (size_t i = 0; i < r.layers.size(); ++i) {
    json l = layer_json(r.layers[i]);
    l["layer"] = i;
    out["layers"].push_back(l);
  }
  out["all_layers"] = layer_json(r.pooled);
  return out;
}

void add_eval_coverage_command(CLI::App& eval) {
  auto flags = std::make_shared<CoverageFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "coverage",
      "Attention-mass coverage per layer: the dense softmax mass on anchors, window and the "
      "exact top-k, and inside each selector's support");
  add_common_flags(cmd, *flags);
  cmd->add_option("--tokens,-n", flags->tokens,
                  "window length, BOS included (default 2048; quick 1024)");
  cmd->add_option("--from", flags->from, "count queries at positions >= this (default 256)");
  cmd->add_option("--anchors", flags->anchors, "anchors of the split (default 1)");
  cmd->add_option("--window", flags->window, "window of the split (default 64)");
  cmd->add_option("--top-k", flags->top_k, "dynamic positions of the split (default 32)");
  cmd->add_option("--epsilon", flags->epsilon,
                  "mass the 'needed' support may leave out (default 0.01)");
  cmd->add_option("--basis", flags->basis,
                  "calibrated basis file (visikv calibrate) for selectors with a query frame qN");
  cmd->callback([cmd, flags] {
    apply_global_options();
    // The JSON file is written when the measurement is done.
    print_coverage_tables(run_eval_coverage(cmd, *flags), *flags);
  });
}

// ---- eval sparse-ppl ----

const std::vector<std::string> kSparsePplGrid = {"sparse:a1:w64:k32:exact",
                                                 "sparse:a1:w64:k32:b16:centroid",
                                                 "sparse:a1:w64:k32:b16:bound",
                                                 "certified:a1:w64:b16:eps0.1:p8:gqa=head",
                                                 "certified:a1:w64:b16:eps0.05:p8:gqa=head",
                                                 "certified:a1:w64:b16:eps0.01:p8:gqa=head"};

struct SparsePplFlags {
  std::string model, basis, text;
  std::vector<std::string> selectors, keys;
  int64_t tokens = 2048, window = 1024;
  bool quick = false;
  RunOutputFlags output;
};

// What the table and the JSON report: the inputs as used and one result per row, dense first.
struct SparsePplRun {
  std::string model, text;
  KvGridOptions options;
  std::vector<KvGridResult> results;
};

json sparse_ppl_json(const SparsePplRun& run, const SparsePplFlags& f);

SparsePplRun run_eval_sparse_ppl(CLI::App* cmd, SparsePplFlags& f) {
  if (f.quick && cmd->count("--tokens") == 0) f.tokens = 1024;
  require(f.tokens >= 1, "--tokens must be at least 1, got ", f.tokens);
  require(f.window >= 2, "--window must be at least 2 tokens, got ", f.window);
  const std::vector<std::string> selectors = !f.selectors.empty() ? f.selectors : kSparsePplGrid;
  std::vector<NamedSelectorSpec> selector_specs;
  for (const std::string& s : selectors)
    selector_specs.push_back(parse_flag("--selectors", s, parse_named_selector_spec));
  std::vector<KeyCodecSpec> key_codecs;
  for (const std::string& k : f.keys)
    key_codecs.push_back(parse_flag("--keys", k, parse_key_codec_spec));
  const std::vector<KvGridRow> rows = kv_grid_sparse_rows(selector_specs, key_codecs);

  const Model model = Model::load(f.model);
  SparsePplRun run;
  run.model = model.source();
  Decoder decoder(model);
  check_context(model.config(), f.window, str_cat("--window ", f.window));
  const BasisSource basis = load_basis_file(model, f.basis);
  const std::filesystem::path text_path = text_or_default_test_text(f.text);
  run.text = text_path.string();
  KvGridOptions& options = run.options;
  options.window = f.window;
  options.max_tokens = f.tokens;
  if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
  const std::vector<int32_t> tokens =
      text_file_tokens(model.tokenizer(), text_path, text_tokens_to_score(f.tokens, f.window));
  // Every row's figures depend on these (a row's codecs and selector are checked as it is kept).
  const RowJournal journal = open_row_journal(f.output, "eval sparse-ppl",
                                              {{"model", run.model},
                                               {"text", run.text},
                                               {"window", f.window},
                                               {"tokens", f.tokens},
                                               {"basis", basis.json}});
  RowProgress progress(kv_grid_run_count(rows), f.output.quiet);
  const auto document = [&](const std::vector<KvGridResult>& results) {
    run.results = results;
    return sparse_ppl_json(run, f);
  };
  run.results = run_kv_grid(decoder, tokens, rows, options, basis.get(), kv_grid_progress(progress),
                            kv_grid_journal(journal, progress, rows, document));
  return run;
}

void print_sparse_ppl_table(const SparsePplRun& run, const SparsePplFlags& f) {
  const KvGridOptions& options = run.options;
  const std::vector<KvGridResult>& results = run.results;
  const KvGridResult& dense = results.front();
  std::printf("model:     %s\ntext:      %s\n", run.model.c_str(), run.text.c_str());
  std::printf(
      "protocol:  K-only decode perplexity (token by token through the cache, every key "
      "stored when written), windows of %lld%s; values f32\n",
      static_cast<long long>(f.window), options.bos ? " (BOS first)" : "");
  std::printf("tokens:    %lld scored in %lld windows\n\n",
              static_cast<long long>(dense.ppl.tokens), static_cast<long long>(dense.ppl.windows));
  std::printf("%-52s %-22s %8s %10s %9s %9s %9s %9s %9s %6s\n", "row", "key codec", "bits/key",
              "PPL", "dPPL", "support", "context", "KL", "KL p99", "top1");
  for (const KvGridResult& r : results)
    std::printf("%-52s %-22s %8.0f %10.4f %+9.4f %9.1f %9.1f %s\n", r.row.name.c_str(),
                r.row.key_codec.text().c_str(), r.key_bits.bits_per_vector, r.ppl.ppl, r.delta_ppl,
                r.ppl.support_mean, r.ppl.context_mean, divergence_cells(r.ppl.divergence).c_str());
  std::printf(
      "\ndPPL: PPL - PPL(dense f32). support: positions each scored query read, per query head "
      "and layer (mean); context: positions it could see. KL: mean KL(dense || row) of the "
      "next-token distribution per scored token (nats), KL p99 its 99th percentile, top1: share "
      "of tokens where the row's top-1 token is dense's.\n");
}

json sparse_ppl_json(const SparsePplRun& run, const SparsePplFlags& f) {
  const KvGridOptions& options = run.options;
  const std::vector<KvGridResult>& results = run.results;
  const KvGridResult& dense = results.front();
  json out = {{"model", run.model},
              {"text", run.text},
              {"mode", "decode"},
              {"tokens", dense.ppl.tokens},
              {"windows", dense.ppl.windows},
              {"window", f.window},
              {"bos_first", options.bos.has_value()},
              {"rows", json::array()}};
  for (const KvGridResult& r : results) out["rows"].push_back(kv_grid_result_json(r));
  return out;
}

void add_eval_sparse_ppl_command(CLI::App& eval) {
  auto flags = std::make_shared<SparsePplFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "sparse-ppl",
      "K-only sparse decode perplexity: a grid of selectors, alone and with key codecs");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option(
         "--selectors", flags->selectors,
         "comma-separated selector specs (docs/SELECTOR_SPECS.md; default: paper setting "
         "a1 w64 k32 exact/centroid/bound, certified with position sketches per query head "
         "(p8:gqa=head) at eps 0.1, 0.05, 0.01)")
      ->delimiter(',');
  cmd->add_option("--keys", flags->keys,
                  "comma-separated key codecs (docs/CACHE_SPECS.md) to run alone and under each "
                  "selector (default: none, f32 keys only)")
      ->delimiter(',');
  cmd->add_option("--tokens,-n", flags->tokens, "tokens to score (default 2048; quick 1024)");
  cmd->add_option("--window,-L", flags->window, "tokens per window, BOS included (default 1024)");
  cmd->add_option("--basis", flags->basis, "HeadQ basis file for +headq key codecs");
  cmd->add_option("--text", flags->text, "evaluation text (default: WikiText-103 test)");
  add_run_output_options(*cmd, flags->output, "the table");
  cmd->add_flag("--quick", flags->quick, "1024 tokens");
  cmd->callback([cmd, flags] {
    apply_global_options();
    // The JSON file is written row by row as the grid runs.
    print_sparse_ppl_table(run_eval_sparse_ppl(cmd, *flags), *flags);
  });
}

}  // namespace

void add_eval_command(CLI::App& app) {
  CLI::App* eval = app.add_subcommand("eval",
                                      "Evaluation protocols: K-only decode perplexity grid (kv), "
                                      "sparse attention survival, needle retrieval, attention "
                                      "coverage, sparse decode perplexity (sparse-ppl), "
                                      "RULER-style retrieval (ruler)");
  eval->require_subcommand(1);
  add_eval_sparse_command(*eval);
  add_eval_needle_command(*eval);
  add_eval_coverage_command(*eval);
  add_eval_sparse_ppl_command(*eval);
  // Further eval subcommands register here, one line each (each defined in its own file and
  // declared in commands.h).
  add_eval_kv_command(*eval);
  add_eval_numerics_command(*eval);
  add_eval_ruler_command(*eval);
}

const std::vector<std::string>& retrieval_selector_grid() { return kNeedleGrid; }

}  // namespace visikv::cli

// `visikv analyze MODEL`: key MSE and the Fisher score-space error F against measured attention
// KL for a set of key specs (eval/analyze.h): flags, the basis (from a file or calibrated
// in-process), the per-codec table, and the CSV, JSON and PNG outputs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "visikv/cli/basis_source.h"
#include "visikv/cli/commands.h"
#include "visikv/cli/long_run.h"
#include "visikv/core/error.h"
#include "visikv/eval/analyze.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/report.h"
#include "visikv/eval/scatter_plot.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/headq.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {

using nlohmann::json;

struct AnalyzeFlags {
  std::string model, values, text, csv, plot;
  RunOutputFlags output;
  std::vector<std::string> keys;
  std::vector<double> entropy_bins = {0.5, 1, 2, 4};
  int64_t tokens = 0;  // 0: 512, or the context if shorter
  double null_energy = 0.999;
  BasisFlags basis;
};

// What the reports read: the inputs as given and the result.
struct AnalyzeRun {
  std::string model, text;
  bool bos_first = false;
  int64_t head_dim = 0;
  BasisSource basis;
  AttentionTrace trace;
  AnalyzeResult result;
};

std::string bin_name(const std::vector<double>& edges, size_t b) {
  char buffer[64];
  if (b == 0)
    std::snprintf(buffer, sizeof buffer, "H<%g", edges.empty() ? INFINITY : edges[0]);
  else if (b == edges.size())
    std::snprintf(buffer, sizeof buffer, "H>=%g", edges[b - 1]);
  else
    std::snprintf(buffer, sizeof buffer, "%g<=H<%g", edges[b - 1], edges[b]);
  return buffer;
}

json bins_json(const std::vector<double>& edges, const std::vector<EntropyBinCount>& bins) {
  json out = json::array();
  for (size_t b = 0; b < bins.size(); ++b)
    out.push_back({{"entropy_lo", b == 0 ? 0.0 : edges[b - 1]},
                   {"entropy_hi", b == edges.size() ? json(nullptr) : json(edges[b])},
                   {"queries", bins[b].queries},
                   {"flips", bins[b].flips}});
  return out;
}

// The key specs to run: the given ones, or the defaults for the model (without the controls when
// a basis file holds too low a rank to place them).
std::vector<AnalyzeKeySpec> key_specs_to_run(std::vector<AnalyzeKeySpec> given, int64_t head_dim,
                                             const HeadqBasis* basis, double null_energy) {
  if (!given.empty()) return given;
  std::vector<AnalyzeKeySpec> specs = default_analyze_key_specs(head_dim, basis != nullptr);
  if (!basis) return specs;
  const int64_t needed = parse_analyze_key_spec("null").needed_rank(*basis, null_energy);
  if (needed > basis->rank) {
    std::fprintf(stderr,
                 "note: the basis holds rank %lld but the query span needs %lld vectors; the "
                 "null/span controls are left out (calibrate with --rank %lld)\n",
                 static_cast<long long>(basis->rank), static_cast<long long>(needed),
                 static_cast<long long>(head_dim));
    std::erase_if(specs,
                  [](const AnalyzeKeySpec& s) { return s.kind != AnalyzeKeySpec::Kind::Codec; });
  }
  return specs;
}

// The first `count` tokens of the text, BOS first when the model adds one.
std::vector<int32_t> analyze_tokens(const Model& model, const std::filesystem::path& text_path,
                                    int64_t count) {
  std::vector<int32_t> tokens;
  if (model.tokenizer().adds_bos() && model.tokenizer().bos_id())
    tokens.push_back(*model.tokenizer().bos_id());
  const int64_t wanted = count - static_cast<int64_t>(tokens.size());
  const std::vector<int32_t> text = text_file_tokens(model.tokenizer(), text_path, wanted);
  tokens.insert(tokens.end(), text.begin(),
                text.begin() + std::min<int64_t>(static_cast<int64_t>(text.size()), wanted));
  require(tokens.size() >= 2, "text ", text_path.string(), " gives fewer than 2 tokens");
  return tokens;
}

json analyze_json(const AnalyzeRun& run, const AnalyzeFlags& f);
CodecSummary codec_summary_from_json(const json& j);
AnalyzeCell analyze_cell_from_json(const json& j);

AnalyzeRun run_analyze(const AnalyzeFlags& f) {
  require(f.tokens == 0 || f.tokens >= 2, "--tokens must be at least 2, got ", f.tokens);
  check_basis_flags(f.basis);
  require(f.null_energy > 0 && f.null_energy <= 1, "--null-energy must be in (0, 1], got ",
          f.null_energy);
  // Specs are parsed once, before the model loads.
  std::vector<AnalyzeKeySpec> keys;
  for (const std::string& k : f.keys)
    keys.push_back(parse_flag("--keys", k, parse_analyze_key_spec));
  AnalyzeOptions options;
  if (!f.values.empty())
    options.value_codec = parse_flag("--values", f.values, parse_value_codec_spec);

  const Model model = Model::load(f.model);
  const Config& c = model.config();
  const int64_t tokens =
      f.tokens != 0 ? f.tokens
                    : (c.max_positions > 1 ? std::min<int64_t>(512, c.max_positions) : 512);
  check_context(c, tokens, str_cat("--tokens ", tokens));
  const bool wants_basis =
      keys.empty() || std::ranges::any_of(keys, [](const auto& k) { return k.needs_basis(); });

  AnalyzeRun run;
  run.model = model.source();
  run.bos_first = model.tokenizer().adds_bos();
  run.head_dim = c.head_dim;
  // Calibrated at full rank when no file is given: the controls need every eigenvector of the
  // query span.
  run.basis = load_or_calibrate_basis(model, f.basis,
                                      {.needed = wants_basis, .calibration_rank = c.head_dim});
  options.entropy_edges = f.entropy_bins;
  options.basis = run.basis.get();
  options.null_energy = f.null_energy;
  options.key_specs = key_specs_to_run(std::move(keys), c.head_dim, options.basis, f.null_energy);

  const std::filesystem::path text_path = text_or_default_test_text(f.text);
  run.text = text_path.string();
  const std::vector<int32_t> input = analyze_tokens(model, text_path, tokens);
  // A row per key spec, with its cells (a row's spec is its key).
  const RowJournal journal = open_row_journal(f.output, "analyze",
                                              {{"model", run.model},
                                               {"text", run.text},
                                               {"tokens", tokens},
                                               {"values", f.values},
                                               {"null_energy", f.null_energy},
                                               {"entropy_edges", f.entropy_bins},
                                               {"basis", run.basis.json}},
                                              {.rows = "codecs", .key = "key_codec"});
  std::vector<std::string> names;
  for (const AnalyzeKeySpec& spec : options.key_specs) names.push_back(spec.text());
  journal.check_rows(names);
  RowProgress progress(static_cast<int64_t>(options.key_specs.size()), f.output.quiet);
  progress.note(str_cat("running the dense model over ", input.size(), " tokens"));
  run.trace = trace_attention(model, input);
  check_analyze_options(run.trace, options);
  for (const AnalyzeKeySpec& spec : options.key_specs) {
    const std::string name = spec.text();
    if (const json* kept = journal.kept_row(name)) {
      const std::string what = "key spec '" + name + "'";
      run.result.codecs.push_back(journal.read(*kept, what, codec_summary_from_json));
      for (const json& cell :
           journal.read(journal.kept_document(), what, [](const json& d) { return d.at("cells"); }))
        if (journal.read(cell, what, [](const json& c) { return c.at("key_codec"); }) == name)
          run.result.cells.push_back(journal.read(cell, what, analyze_cell_from_json));
      progress.kept(name);
    } else {
      progress.start(name);
      AnalyzeOptions one = options;
      one.key_specs = {spec};
      AnalyzeResult r = analyze_attention(run.trace, one, [&](int64_t done, int64_t total) {
        progress.update(name, done, total, "layers");
      });
      progress.finish();
      run.result.codecs.push_back(std::move(r.codecs.front()));
      for (AnalyzeCell& cell : r.cells) run.result.cells.push_back(std::move(cell));
    }
    correlate_cells(run.result);
    // Indented by one space: the cells make this file large.
    journal.save(analyze_json(run, f), run.result.codecs.size() == options.key_specs.size(), 1);
  }
  return run;
}

void print_analyze_table(const AnalyzeRun& run, const AnalyzeFlags& f) {
  const AnalyzeResult& result = run.result;
  const AttentionTrace& trace = run.trace;
  const bool value_metrics = !f.values.empty();
  std::printf("model:   %s\n", run.model.c_str());
  std::printf("text:    %s, %lld tokens%s, teacher-forced on the dense model's q/k/v\n",
              run.text.c_str(), static_cast<long long>(trace.tokens),
              run.bos_first ? " (BOS first)" : "");
  if (const HeadqBasis* basis = run.basis.get())
    std::printf("basis:   %s (%s, %lld positions, rank %lld); query span energy %g\n",
                run.basis.source().c_str(), basis->text.c_str(),
                static_cast<long long>(basis->tokens), static_cast<long long>(basis->rank),
                f.null_energy);
  std::printf("values:  %s\n", value_metrics ? f.values.c_str() : "f32 (no value metrics)");
  std::printf("cells:   %zu (key spec x %lld layers x %lld query heads)\n\n", result.cells.size(),
              static_cast<long long>(trace.layers), static_cast<long long>(trace.heads));
  std::printf("%-34s %8s %11s %11s %11s %9s %7s", "key spec", "bits/key", "key MSE", "F", "KL",
              "KL/(F/2)", "flips%");
  if (value_metrics) std::printf(" %11s %11s %11s", "value err", "val-only", "A2 surr");
  std::printf("\n");
  for (const CodecSummary& s : result.codecs) {
    const std::string bits = s.bits_per_key ? str_cat(*s.bits_per_key) : "-";
    std::printf("%-34s %8s %11.4g %11.4g %11.4g %9.3f %7.3f", s.key_codec.c_str(), bits.c_str(),
                s.mse_mean, s.fisher_mean, s.kl_mean,
                s.fisher_mean > 0 ? s.kl_mean / (s.fisher_mean / 2) : NAN, 100 * s.flip_rate);
    if (value_metrics)
      std::printf(" %11.4g %11.4g %11.4g", *s.value_error_mean, *s.value_only_error_mean,
                  *s.a2_surrogate_mean);
    std::printf("\n");
  }
  std::printf("\nacross %zu cells:  Spearman(key MSE, KL) = %.3f   Spearman(F, KL) = %.3f\n",
              result.cells.size(), result.spearman_mse, result.spearman_fisher);
  std::printf("                   Pearson(key MSE, KL)  = %.3f   Pearson(F, KL)  = %.3f\n",
              result.pearson_mse, result.pearson_fisher);
  std::printf("\nroute flips by attention entropy H (nats): flips / queries\n%-34s", "key spec");
  for (size_t b = 0; b <= f.entropy_bins.size(); ++b)
    std::printf(" %16s", bin_name(f.entropy_bins, b).c_str());
  std::printf("\n");
  for (const CodecSummary& s : result.codecs) {
    std::printf("%-34s", s.key_codec.c_str());
    for (const EntropyBinCount& b : s.bins)
      std::printf(" %16s", str_cat(b.flips, "/", b.queries).c_str());
    std::printf("\n");
  }
  for (const CodecSummary& s : result.codecs)
    if (s.span_rank_min)
      std::printf("%s: query span of %lld..%lld of %lld dimensions per head\n", s.key_codec.c_str(),
                  static_cast<long long>(*s.span_rank_min),
                  static_cast<long long>(*s.span_rank_max), static_cast<long long>(run.head_dim));
  std::printf(
      "\nMeans over the (layer, query head) cells of each key spec, each cell a mean over its %lld "
      "queries. key MSE: mean ||k - k_stored||^2 / d over the keys a query reads; F: "
      "Var_a(dscore); "
      "KL: KL(a || a_hat); flips: argmax changes.\n",
      static_cast<long long>(trace.tokens));
}

std::string analyze_csv(const AnalyzeRun& run, const std::vector<double>& entropy_bins) {
  std::string csv =
      "key_codec,layer,head,kv_head,queries,key_mse,fisher,kl,flip_rate,entropy,"
      "value_error,value_only_error,a2_surrogate";
  for (size_t b = 0; b <= entropy_bins.size(); ++b)
    csv +=
        str_cat(",queries[", bin_name(entropy_bins, b), "],flips[", bin_name(entropy_bins, b), "]");
  csv += "\n";
  auto opt = [](const std::optional<double>& x) { return x ? str_cat(*x) : std::string(); };
  char buffer[256];
  for (const AnalyzeCell& cell : run.result.cells) {
    std::snprintf(buffer, sizeof buffer, "%lld,%lld,%lld,%lld,%.9g,%.9g,%.9g,%.9g,%.9g",
                  static_cast<long long>(cell.layer), static_cast<long long>(cell.head),
                  static_cast<long long>(cell.kv_head), static_cast<long long>(cell.queries),
                  cell.key_mse, cell.fisher, cell.kl, cell.flip_rate, cell.entropy);
    csv += str_cat(cell.key_codec, ",", buffer, ",", opt(cell.value_error), ",",
                   opt(cell.value_only_error), ",", opt(cell.a2_surrogate));
    for (const EntropyBinCount& b : cell.bins) csv += str_cat(",", b.queries, ",", b.flips);
    csv += "\n";
  }
  return csv;
}

std::vector<EntropyBinCount> bins_from_json(const json& bins) {
  std::vector<EntropyBinCount> out;
  for (const json& b : bins)
    out.push_back({b.at("queries").get<int64_t>(), b.at("flips").get<int64_t>()});
  return out;
}

// The rows analyze_json wrote (--resume).
CodecSummary codec_summary_from_json(const json& j) {
  CodecSummary s;
  s.key_codec = j.at("key_codec").get<std::string>();
  s.bits_per_key = optional_from_json(j.at("bits_per_key"));
  s.cells = j.at("cells").get<int64_t>();
  s.queries = j.at("queries").get<int64_t>();
  s.mse_mean = j.at("mse_mean").get<double>();
  s.fisher_mean = j.at("fisher_mean").get<double>();
  s.kl_mean = j.at("kl_mean").get<double>();
  s.flip_rate = j.at("flip_rate").get<double>();
  s.bins = bins_from_json(j.at("flips_by_entropy"));
  s.value_error_mean = optional_from_json(j.at("value_error_mean"));
  s.value_only_error_mean = optional_from_json(j.at("value_only_error_mean"));
  s.a2_surrogate_mean = optional_from_json(j.at("a2_surrogate_mean"));
  if (j.contains("query_span_rank")) {
    s.span_rank_min = j.at("query_span_rank").at(0).get<int64_t>();
    s.span_rank_max = j.at("query_span_rank").at(1).get<int64_t>();
  }
  return s;
}

AnalyzeCell analyze_cell_from_json(const json& j) {
  AnalyzeCell c;
  c.key_codec = j.at("key_codec").get<std::string>();
  c.layer = j.at("layer").get<int64_t>();
  c.head = j.at("head").get<int64_t>();
  c.kv_head = j.at("kv_head").get<int64_t>();
  c.queries = j.at("queries").get<int64_t>();
  c.key_mse = j.at("key_mse").get<double>();
  c.fisher = j.at("fisher").get<double>();
  c.kl = j.at("kl").get<double>();
  c.flip_rate = j.at("flip_rate").get<double>();
  c.entropy = j.at("entropy").get<double>();
  c.bins = bins_from_json(j.at("flips_by_entropy"));
  c.value_error = optional_from_json(j.at("value_error"));
  c.value_only_error = optional_from_json(j.at("value_only_error"));
  c.a2_surrogate = optional_from_json(j.at("a2_surrogate"));
  return c;
}

json analyze_json(const AnalyzeRun& run, const AnalyzeFlags& f) {
  const AnalyzeResult& result = run.result;
  const AttentionTrace& trace = run.trace;
  const std::vector<double>& edges = f.entropy_bins;
  json out = {{"model", run.model},
              {"text", run.text},
              {"tokens", trace.tokens},
              {"bos_first", run.bos_first},
              {"layers", trace.layers},
              {"heads", trace.heads},
              {"kv_heads", trace.kv_heads},
              {"head_dim", trace.head_dim},
              {"value_codec", f.values.empty() ? json(nullptr) : json(f.values)},
              {"null_energy", f.null_energy},
              {"entropy_edges", edges},
              {"basis", run.basis.json},
              {"spearman", {{"key_mse", result.spearman_mse}, {"fisher", result.spearman_fisher}}},
              {"pearson", {{"key_mse", result.pearson_mse}, {"fisher", result.pearson_fisher}}},
              {"codecs", json::array()},
              {"cells", json::array()}};
  for (const CodecSummary& s : result.codecs) {
    json codec = {{"key_codec", s.key_codec},
                  {"bits_per_key", optional_json(s.bits_per_key)},
                  {"cells", s.cells},
                  {"queries", s.queries},
                  {"mse_mean", s.mse_mean},
                  {"fisher_mean", s.fisher_mean},
                  {"kl_mean", s.kl_mean},
                  {"flip_rate", s.flip_rate},
                  {"flips_by_entropy", bins_json(edges, s.bins)},
                  {"value_error_mean", optional_json(s.value_error_mean)},
                  {"value_only_error_mean", optional_json(s.value_only_error_mean)},
                  {"a2_surrogate_mean", optional_json(s.a2_surrogate_mean)}};
    if (s.span_rank_min) codec["query_span_rank"] = {*s.span_rank_min, *s.span_rank_max};
    out["codecs"].push_back(std::move(codec));
  }
  for (const AnalyzeCell& cell : result.cells)
    out["cells"].push_back({{"key_codec", cell.key_codec},
                            {"layer", cell.layer},
                            {"head", cell.head},
                            {"kv_head", cell.kv_head},
                            {"queries", cell.queries},
                            {"key_mse", cell.key_mse},
                            {"fisher", cell.fisher},
                            {"kl", cell.kl},
                            {"flip_rate", cell.flip_rate},
                            {"entropy", cell.entropy},
                            {"flips_by_entropy", bins_json(edges, cell.bins)},
                            {"value_error", optional_json(cell.value_error)},
                            {"value_only_error", optional_json(cell.value_only_error)},
                            {"a2_surrogate", optional_json(cell.a2_surrogate)}});
  return out;
}

// Key MSE and F/2 against measured KL, one point per cell, one series per key spec.
void write_analyze_plot(const AnalyzeRun& run, const std::string& path) {
  const AnalyzeResult& result = run.result;
  ScatterPanel by_mse{"key MSE vs KL", "key MSE", "measured KL", {}, ""};
  ScatterPanel by_fisher{"F/2 vs KL", "F/2", "measured KL", {}, "KL = F/2"};
  for (const CodecSummary& s : result.codecs) {
    ScatterSeries mse{s.key_codec, {}, {}}, fisher{s.key_codec, {}, {}};
    for (const AnalyzeCell& cell : result.cells)
      if (cell.key_codec == s.key_codec) {
        mse.x.push_back(cell.key_mse);
        mse.y.push_back(cell.kl);
        fisher.x.push_back(cell.fisher / 2);
        fisher.y.push_back(cell.kl);
      }
    by_mse.series.push_back(std::move(mse));
    by_fisher.series.push_back(std::move(fisher));
  }
  char title[256];
  std::snprintf(title, sizeof title,
                "predicted vs measured attention KL per (layer, head, codec): Spearman MSE %.2f, "
                "F %.2f",
                result.spearman_mse, result.spearman_fisher);
  write_loglog_scatter({by_mse, by_fisher}, title, path);
}

}  // namespace

void add_analyze_command(CLI::App& app) {
  auto flags = std::make_shared<AnalyzeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "analyze",
      "Key MSE and the Fisher score-space error F against measured attention KL, route flips "
      "by entropy, value readout error and its A2 surrogate, per (layer, head, key spec)");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--keys", flags->keys,
                  "comma-separated key specs: cache codecs (docs/CACHE_SPECS.md), null[:a<A>], "
                  "span:query:<codec>, span:null:<codec> (default: a standard set)")
      ->delimiter(',');
  cmd->add_option("--values", flags->values,
                  "value codec; adds the value readout error and its A2 surrogate (default: f32, "
                  "no value metrics)");
  cmd->add_option(
      "--tokens,-n", flags->tokens,
      "positions to run, BOS included (default 512, or the model's context if shorter)");
  cmd->add_option("--text", flags->text, "text file (default: WikiText-103 test)");
  add_basis_options(*cmd, flags->basis,
                    "HeadQ basis file from `visikv calibrate` (default: calibrate in-process at "
                    "full rank when a spec needs one)");
  cmd->add_option("--null-energy", flags->null_energy,
                  "share of the query energy the query span holds (default 0.999)");
  cmd->add_option("--entropy-bins", flags->entropy_bins,
                  "comma-separated attention-entropy bin edges in nats (default 0.5,1,2,4)")
      ->delimiter(',');
  cmd->add_option("--csv", flags->csv, "write one row per (key spec, layer, head) cell");
  add_run_output_options(*cmd, flags->output, "the cells, per-codec means and correlations");
  cmd->add_option("--plot", flags->plot, "write a PNG of key MSE and F/2 against measured KL");
  cmd->callback([flags] {
    apply_global_options();
    const AnalyzeRun run = run_analyze(*flags);
    print_analyze_table(run, *flags);
    if (!flags->csv.empty()) write_text_file(flags->csv, analyze_csv(run, flags->entropy_bins));
    if (!flags->plot.empty()) write_analyze_plot(run, flags->plot);
  });
}

}  // namespace visikv::cli

// `visikv eval kv MODEL`: the HeadQ paper's K-only decode-perplexity table (eval/kv_grid.h) in
// one command: flags, the basis (from a file or calibrated in-process), progress, the table and
// the JSON file.
#include <algorithm>
#include <chrono>
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
#include "visikv/eval/context_limit.h"
#include "visikv/eval/kv_grid.h"
#include "visikv/eval/report.h"
#include "visikv/eval/scatter_plot.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {

using nlohmann::json;

struct EvalKvFlags {
  std::string model, text, mode = "decode-batched", plot, numerics = "exact";
  RunOutputFlags output;
  int64_t tokens = 0, window = 1024;
  std::vector<int64_t> ranks = {4, 8, 16};
  std::vector<std::string> rows, keys;
  int side_bits = 4;
  BasisFlags basis;
};

// What the table and the JSON report besides the rows.
struct EvalKvRun {
  std::string model, text, numerics;
  KvGridOptions options;
  int64_t head_dim = 0;
  BasisSource basis;
  std::vector<KvGridResult> results;
  double grid_seconds = 0, total_seconds = 0;

  const KvGridResult& dense() const {
    return *std::find_if(results.begin(), results.end(),
                         [](const KvGridResult& r) { return r.row.name == "dense"; });
  }
};

json eval_kv_json(const EvalKvRun& run);

EvalKvRun run_eval_kv(const EvalKvFlags& f) {
  const auto command_started = std::chrono::steady_clock::now();
  require(f.tokens >= 0, "--tokens must not be negative, got ", f.tokens);
  require(f.window >= 2, "--window must be at least 2 tokens, got ", f.window);
  check_basis_flags(f.basis);
  for (int64_t r : f.ranks) require(r >= 1, "--ranks: rank ", r, " must be at least 1");

  const Model model = Model::load(f.model);
  Decoder decoder(model);
  // Every row's forward (not the calibration) with the chosen products.
  apply_numerics(f.numerics, decoder);
  check_decode_order_products(decoder, perplexity_mode_from_name(f.mode));
  EvalKvRun run;
  run.model = model.source();
  run.numerics = f.numerics;
  run.head_dim = decoder.cache_shape().head_dim;
  KvGridSpec spec;
  spec.ranks = f.ranks;
  spec.side_bits = f.side_bits;
  // Extra key codecs are parsed before any model time; with --keys and no --rows only the dense
  // row of the grid runs beside them.
  std::vector<KeyCodecSpec> keys;
  for (const std::string& text : f.keys) keys.push_back(parse_key_codec_spec(text));
  const std::vector<std::string> names =
      f.rows.empty() && !keys.empty() ? std::vector<std::string>{"dense"} : f.rows;
  const std::vector<KvGridRow> rows =
      with_key_codec_rows(select_kv_grid_rows(kv_grid_rows(run.head_dim, spec), names), keys);
  check_context(model.config(), f.window, str_cat("--window ", f.window));

  // Calibrated at rank 16 (or the largest rank the rows need) when no file is given.
  const int64_t needed_rank = kv_grid_basis_rank(rows, run.head_dim);
  run.basis = load_or_calibrate_basis(
      model, f.basis,
      {.needed = needed_rank > 0,
       .min_rank = std::max<int64_t>(needed_rank, 1),
       .calibration_rank = std::min(run.head_dim, std::max<int64_t>(16, needed_rank)),
       .calibration_window = f.window});

  const std::filesystem::path text_path = text_or_default_test_text(f.text);
  run.text = text_path.string();
  KvGridOptions& options = run.options;
  options.mode = perplexity_mode_from_name(f.mode);
  require(options.mode != PerplexityMode::Prefill,
          "--mode: the grid runs in decode order (decode or decode-batched), not prefill");
  options.window = f.window;
  options.max_tokens = f.tokens;
  if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
  // With --tokens, only the leading tokens the windows score are read.
  const std::vector<int32_t> tokens = text_file_tokens(
      model.tokenizer(), text_path,
      f.tokens > 0 ? std::optional(text_tokens_to_score(f.tokens, f.window)) : std::nullopt);
  // Every row's figures depend on these (a row's codecs are checked as it is kept). The products
  // are named only where they are not the default, so that runs from before the option resume.
  json parameters = {{"model", run.model}, {"text", run.text},   {"mode", f.mode},
                     {"window", f.window}, {"tokens", f.tokens}, {"basis", run.basis.json}};
  if (f.numerics != "exact") parameters["numerics"] = f.numerics;
  const RowJournal journal = open_row_journal(f.output, "eval kv", parameters);
  RowProgress progress(kv_grid_run_count(rows), f.output.quiet);
  const auto grid_started = std::chrono::steady_clock::now();
  const auto seconds_since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  const auto document = [&](const std::vector<KvGridResult>& results) {
    run.results = results;
    run.grid_seconds = seconds_since(grid_started);
    // Model loading, calibration and tokenization included.
    run.total_seconds = seconds_since(command_started);
    return eval_kv_json(run);
  };
  run.results =
      run_kv_grid(decoder, tokens, rows, options, run.basis.get(), kv_grid_progress(progress),
                  kv_grid_journal(journal, progress, rows, document));
  return run;
}

void print_eval_kv_table(const EvalKvRun& run) {
  const KvGridResult& dense = run.dense();
  std::printf("model:        %s\n", run.model.c_str());
  std::printf("text:         %s\n", run.text.c_str());
  std::printf("protocol:     decode order through the cache (%s), windows of %lld%s\n",
              run.options.mode == PerplexityMode::Decode
                  ? "token by token"
                  : "batched where identical to token by token",
              static_cast<long long>(run.options.window), run.options.bos ? " (BOS first)" : "");
  std::printf("tokens:       %lld scored in %lld windows\n",
              static_cast<long long>(dense.ppl.tokens), static_cast<long long>(dense.ppl.windows));
  std::printf("products:     %s\n", run.numerics.c_str());
  std::printf("grid time:    %.1f s (rows %zu); %.1f s with loading and calibration\n",
              run.grid_seconds, run.results.size(), run.total_seconds);
  if (const HeadqBasis* basis = run.basis.get())
    std::printf("basis:        %s (%s, %lld positions, rank %lld)\n", run.basis.source().c_str(),
                basis->text.c_str(), static_cast<long long>(basis->tokens),
                static_cast<long long>(basis->rank));
  std::printf("\n%-26s %-40s %-32s %8s %8s %10s %9s %8s %9s %9s %6s\n", "row", "key codec",
              "value codec", "bits/key", "bits/val", "PPL", "dPPL", "excess", "KL", "KL p99",
              "top1");
  for (const KvGridResult& r : run.results) {
    std::printf("%-26s %-40s %-32s %8.0f %8.0f %10.4f %+9.4f %8s %s\n", r.row.name.c_str(),
                r.row.key_codec.text().c_str(), r.row.value_codec.text().c_str(),
                r.key_bits.bits_per_vector, r.value_bits.bits_per_vector, r.ppl.ppl, r.delta_ppl,
                format_optional(r.excess_removed, "%.3f").c_str(),
                divergence_cells(r.ppl.divergence).c_str());
  }
  std::printf(
      "\nbits/key, bits/val: per key (value) per KV head (head_dim %lld), scales, zeros and HeadQ "
      "side codes included; chan rows also keep the newest 128-159 tokens of each head in fp16. "
      "dPPL: PPL - PPL(dense). excess: excess PPL removed by HeadQ, (PPL_base - PPL) / (PPL_base "
      "- PPL_dense), against k2-<axis> (kv2-<axis> for the full-KV rows); controls included. KL: "
      "mean KL(dense || row) of the next-token distribution per scored token (nats), KL p99 its "
      "99th percentile, top1: share of tokens where the row's top-1 token is dense's.\n",
      static_cast<long long>(run.head_dim));
  for (const KvGridResult& r : run.results) {
    if (!r.row.note.empty()) std::printf("  %-26s %s\n", r.row.name.c_str(), r.row.note.c_str());
    if (!r.same_run_as.empty())
      std::printf("  %-26s same codecs as %s: computed once, reported twice\n", r.row.name.c_str(),
                  r.same_run_as.c_str());
  }
  std::printf(
      "Value policies (<rule>:int2/int4:g<G>:w64:avg<A>): bits/val is the budget, the newest 64 "
      "tokens at int4 included; the exact figure for n stored tokens is in docs/CACHE_SPECS.md.\n");
}

// The family a key codec belongs to on the bits frontier plot.
std::string key_codec_family(const CodecSpec& spec) {
  if (spec.is_qbasis()) {
    std::string out = spec.axis == CodecSpec::Axis::Tokens ? "qbasis tok" : "qbasis chan";
    if (spec.window > 0) out += " +window";
    // Short enough for the plot's legend.
    if (spec.qbasis->basis == QBasisSpec::Basis::Random) out += " (random basis)";
    if (spec.qbasis->basis == QBasisSpec::Basis::KeyPca) out += " (key PCA)";
    if (spec.qbasis->basis == QBasisSpec::Basis::Weighted) out += " (weighted)";
    if (spec.qbasis->fisher) out += " +Fisher";
    return out;
  }
  std::string out = spec.axis == CodecSpec::Axis::Tokens ? "int tok" : "int chan";
  if (spec.window > 0) out += " +window";
  if (spec.hadamard) out += " +Hadamard";
  if (spec.headq) out += " +HeadQ";
  return out;
}

// PPL excess and KL of every K-only row (f32 values, dense attention) against bits per key
// channel, one series per codec family.
void write_eval_kv_plot(const EvalKvRun& run, const std::string& path) {
  std::vector<std::string> families;
  ScatterPanel ppl{"excess perplexity", "bits per key channel", "PPL - PPL(dense)"};
  ScatterPanel kl{"next-token KL from dense", "bits per key channel", "mean KL (nats)"};
  for (ScatterPanel* panel : {&ppl, &kl}) panel->linear_x = panel->lines = true;
  for (const KvGridResult& r : run.results) {
    const CodecSpec& keys = r.row.key_codec.codec;
    if (keys.is_dense() || !r.row.value_codec.codec.is_dense() ||
        r.row.value_codec.codec.dense != DenseFormat::F32 || !r.same_run_as.empty())
      continue;
    const std::string family = key_codec_family(keys);
    auto it = std::find(families.begin(), families.end(), family);
    if (it == families.end()) {
      families.push_back(family);
      ppl.series.push_back({family});
      kl.series.push_back({family});
      it = families.end() - 1;
    }
    const size_t k = static_cast<size_t>(it - families.begin());
    ppl.series[k].x.push_back(r.key_bits.bits_per_element);
    ppl.series[k].y.push_back(r.delta_ppl);
    kl.series[k].x.push_back(r.key_bits.bits_per_element);
    kl.series[k].y.push_back(r.ppl.divergence ? r.ppl.divergence->kl_mean : 0.0);
  }
  write_loglog_scatter(
      {ppl, kl},
      str_cat("K-only decode, ", std::filesystem::path(run.model).filename().string(), ", ",
              run.dense().ppl.tokens, " tokens"),
      path);
}

json eval_kv_json(const EvalKvRun& run) {
  const KvGridResult& dense = run.dense();
  json out = {{"model", run.model},
              {"text", run.text},
              {"mode", perplexity_mode_name(run.options.mode)},
              {"numerics", run.numerics},
              {"tokens", dense.ppl.tokens},
              {"windows", dense.ppl.windows},
              {"window", run.options.window},
              {"grid_seconds", run.grid_seconds},
              {"total_seconds", run.total_seconds},
              {"bos_first", run.options.bos.has_value()},
              {"head_dim", run.head_dim},
              {"basis", run.basis.json},
              {"rows", json::array()}};
  for (const KvGridResult& r : run.results) out["rows"].push_back(kv_grid_result_json(r));
  return out;
}

}  // namespace

void add_eval_kv_command(CLI::App& eval) {
  auto flags = std::make_shared<EvalKvFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "kv",
      "The K-only decode-perplexity grid of the HeadQ paper: dense, int2/3/4 per-token and "
      "per-channel keys, HeadQ ranks, controls, same-budget plain quantizers, value bit policies "
      "(uniform, recency, A1, A2, three widths, readout-error A2E), full-KV 2-bit");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--tokens,-n", flags->tokens,
                  "score only the first N tokens (default 0: the whole text)");
  cmd->add_option("--window,-L", flags->window, "tokens per window, BOS included (default 1024)");
  add_basis_options(*cmd, flags->basis,
                    "HeadQ basis file from `visikv calibrate` (default: calibrate in-process)");
  cmd->add_option("--ranks", flags->ranks, "comma-separated HeadQ ranks (default 4,8,16)")
      ->delimiter(',');
  cmd->add_option("--side-bits", flags->side_bits, "bits per HeadQ side-code number (default 4)");
  cmd->add_option("--rows", flags->rows,
                  "comma-separated row names (default: all; dense and base rows are added)")
      ->delimiter(',');
  cmd->add_option("--keys", flags->keys,
                  "comma-separated extra key codec specs, each a row with f32 values named by its "
                  "spec (e.g. qbasis:b3:g32:chan:r128,int2:g32:tok:had); with no --rows only the "
                  "dense row of the grid runs beside them")
      ->delimiter(',');
  cmd->add_option("--plot", flags->plot,
                  "write a PNG of excess PPL and KL against bits per key channel for the K-only "
                  "rows, one series per codec family");
  cmd->add_option("--text", flags->text, "evaluation text (default: WikiText-103 test)");
  add_numerics_option(*cmd, flags->numerics);
  cmd->add_option("--mode", flags->mode,
                  "decode-batched (default: decode order in the largest chunks the cache keeps "
                  "identical to token by token) or decode (token by token, the reference)");
  add_run_output_options(*cmd, flags->output, "the table");
  cmd->callback([flags] {
    apply_global_options();
    // The JSON file is written row by row as the grid runs.
    const EvalKvRun run = run_eval_kv(*flags);
    print_eval_kv_table(run);
    if (!flags->plot.empty()) write_eval_kv_plot(run, flags->plot);
  });
}

}  // namespace visikv::cli

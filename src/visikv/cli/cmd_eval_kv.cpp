// `visikv eval kv MODEL`: the HeadQ paper's K-only decode-perplexity table (eval/kv_grid.h) in
// one command: flags, the basis (from a file or calibrated in-process), progress, the table and
// the JSON file.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/eval/basis_file.h"
#include "visikv/eval/calibrate.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/kv_grid.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {

using nlohmann::json;

struct EvalKvFlags {
  std::string model, basis, json, text, calibration_text, mode = "decode-batched";
  int64_t tokens = 0, window = 1024, calibration_tokens = 8192;
  std::vector<int64_t> ranks = {4, 8, 16};
  std::vector<std::string> rows;
  int side_bits = 4;
};

std::string format_optional(const std::optional<double>& v, const char* format) {
  if (!v) return "-";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, *v);
  return buffer;
}

// One stderr line per tenth of each run, with the run's rate. Rows with the same codecs share a
// run (e.g. budget-tok-r8 is k3-tok at head_dim 64), so runs can be fewer than rows.
class GridProgress {
 public:
  void operator()(int64_t run, int64_t runs, const KvGridRow& row, int64_t done, int64_t total) {
    const auto now = std::chrono::steady_clock::now();
    if (run != run_) {
      run_ = run;
      started_ = now;
      last_tenth_ = 0;
    }
    const int64_t tenth = 10 * done / std::max<int64_t>(total, 1);
    if (tenth <= last_tenth_) return;
    last_tenth_ = tenth;
    const double seconds = std::chrono::duration<double>(now - started_).count();
    std::fprintf(stderr, "[run %lld/%lld] %s: %lld/%lld tokens, %.1f tokens/s\n",
                 static_cast<long long>(run + 1), static_cast<long long>(runs), row.name.c_str(),
                 static_cast<long long>(done), static_cast<long long>(total),
                 done / std::max(seconds, 1e-9));
  }

 private:
  int64_t run_ = -1, last_tenth_ = 0;
  std::chrono::steady_clock::time_point started_;
};

void run_eval_kv(EvalKvFlags& f) {
  const auto command_started = std::chrono::steady_clock::now();
  apply_global_options();
  require(f.tokens >= 0, "--tokens must not be negative, got ", f.tokens);
  require(f.window >= 2, "--window must be at least 2 tokens, got ", f.window);
  require(f.calibration_tokens >= 1, "--calibration-tokens must be positive, got ",
          f.calibration_tokens);
  for (int64_t r : f.ranks) require(r >= 1, "--ranks: rank ", r, " must be at least 1");

  const Model model = Model::load(f.model);
  Decoder decoder(model);
  const int64_t head_dim = decoder.cache_shape().head_dim;
  KvGridSpec spec;
  spec.ranks = f.ranks;
  spec.side_bits = f.side_bits;
  const std::vector<KvGridRow> rows = select_kv_grid_rows(kv_grid_rows(head_dim, spec), f.rows);
  const int64_t context = model.config().max_positions;
  require(context <= 0 || f.window <= context, "--window ", f.window,
          " exceeds the model's context of ", context, " positions");

  // The basis: from --basis (checked against the model and the rank the rows need), else
  // calibrated here on the calibration text at rank 16 (or the largest rank the rows need).
  const int64_t needed_rank = kv_grid_basis_rank(rows);
  std::optional<HeadqBasis> basis;
  json basis_json = {{"source", "none"}};
  if (!f.basis.empty()) {
    basis = load_headq_basis(f.basis, model, std::max<int64_t>(needed_rank, 1));
    basis_json = {{"source", "file"}, {"path", f.basis}};
  } else if (needed_rank > 0) {
    const std::filesystem::path path = f.calibration_text.empty()
                                           ? default_calibration_text()
                                           : std::filesystem::path(f.calibration_text);
    CalibrationOptions options;
    options.tokens = f.calibration_tokens;
    options.rank = std::min(head_dim, std::max<int64_t>(16, needed_rank));
    options.window = f.window;
    std::fprintf(stderr, "calibrating HeadQ bases on %s (%lld positions, rank %lld)\n",
                 path.string().c_str(), static_cast<long long>(options.tokens),
                 static_cast<long long>(options.rank));
    basis = calibrate_headq(
        model, read_text_file(path), path.string(), options, [](int64_t done, int64_t total) {
          std::fprintf(stderr, "calibration: %lld/%lld positions\n", static_cast<long long>(done),
                       static_cast<long long>(total));
        });
    basis_json = {{"source", "calibrated"}};
  }
  if (basis) basis_json.update(headq_basis_json(*basis));

  const std::filesystem::path text_path =
      f.text.empty() ? default_test_text() : std::filesystem::path(f.text);
  const std::string text = read_text_file(text_path);
  KvGridOptions options;
  options.mode = perplexity_mode_from_name(f.mode);
  require(options.mode != PerplexityMode::Prefill,
          "--mode: the grid runs in decode order (decode or decode-batched), not prefill");
  options.window = f.window;
  options.max_tokens = f.tokens;
  if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
  // Scoring N tokens needs N text tokens with BOS, and one more per window without.
  const std::vector<int32_t> tokens =
      f.tokens > 0
          ? leading_tokens(model.tokenizer(), text, f.tokens + f.tokens / (f.window - 1) + 2)
          : model.tokenizer().encode(text, false);
  GridProgress progress;
  const auto grid_started = std::chrono::steady_clock::now();
  const std::vector<KvGridResult> results =
      run_kv_grid(decoder, tokens, rows, options, basis ? &*basis : nullptr, std::ref(progress));
  const auto grid_done = std::chrono::steady_clock::now();
  const double grid_seconds = std::chrono::duration<double>(grid_done - grid_started).count();
  // Model loading, calibration and tokenization included.
  const double total_seconds = std::chrono::duration<double>(grid_done - command_started).count();

  const KvGridResult& dense = *std::find_if(
      results.begin(), results.end(), [](const KvGridResult& r) { return r.row.name == "dense"; });
  std::printf("model:        %s\n", model.source().c_str());
  std::printf("text:         %s\n", text_path.string().c_str());
  std::printf("protocol:     decode order through the cache (%s), windows of %lld%s\n",
              options.mode == PerplexityMode::Decode ? "token by token"
                                                     : "batched where identical to token by token",
              static_cast<long long>(f.window), options.bos ? " (BOS first)" : "");
  std::printf("tokens:       %lld scored in %lld windows\n",
              static_cast<long long>(dense.ppl.tokens), static_cast<long long>(dense.ppl.windows));
  std::printf("grid time:    %.1f s (rows %zu); %.1f s with loading and calibration\n",
              grid_seconds, results.size(), total_seconds);
  if (basis)
    std::printf("basis:        %s (%s, %lld positions, rank %lld)\n",
                basis_json["source"].get<std::string>().c_str(), basis->text.c_str(),
                static_cast<long long>(basis->tokens), static_cast<long long>(basis->rank));
  std::printf("\n%-26s %-40s %-32s %8s %8s %10s %9s %8s\n", "row", "key codec", "value codec",
              "bits/key", "bits/val", "PPL", "dPPL", "excess");
  for (const KvGridResult& r : results) {
    std::printf("%-26s %-40s %-32s %8.0f %8.0f %10.4f %+9.4f %8s\n", r.row.name.c_str(),
                r.row.key_codec.text().c_str(), r.row.value_codec.text().c_str(),
                r.key_bits.bits_per_vector, r.value_bits.bits_per_vector, r.ppl.ppl, r.delta_ppl,
                format_optional(r.excess_removed, "%.3f").c_str());
  }
  std::printf(
      "\nbits/key, bits/val: per key (value) per KV head (head_dim %lld), scales, zeros and HeadQ "
      "side codes included; chan rows also keep the newest 128-159 tokens of each head in fp16. "
      "dPPL: PPL - PPL(dense). excess: excess PPL removed by HeadQ, (PPL_base - PPL) / (PPL_base "
      "- PPL_dense), against k2-<axis> (kv2-<axis> for the full-KV rows); controls included.\n",
      static_cast<long long>(head_dim));
  for (const KvGridResult& r : results) {
    if (!r.row.note.empty()) std::printf("  %-26s %s\n", r.row.name.c_str(), r.row.note.c_str());
    if (!r.same_run_as.empty())
      std::printf("  %-26s same codecs as %s: computed once, reported twice\n", r.row.name.c_str(),
                  r.same_run_as.c_str());
  }
  std::printf(
      "Value policies (<rule>:int2/int4:g<G>:w64:avg<A>): bits/val is the budget, the newest 64 "
      "tokens at int4 included; the exact figure for n stored tokens is in docs/CACHE_SPECS.md.\n");

  if (!f.json.empty()) {
    json out = {{"command", "eval kv"},
                {"model", model.source()},
                {"text", text_path.string()},
                {"mode", perplexity_mode_name(options.mode)},
                {"tokens", dense.ppl.tokens},
                {"windows", dense.ppl.windows},
                {"window", f.window},
                {"grid_seconds", grid_seconds},
                {"total_seconds", total_seconds},
                {"bos_first", options.bos.has_value()},
                {"head_dim", head_dim},
                {"basis", basis_json},
                {"rows", json::array()}};
    for (const KvGridResult& r : results) out["rows"].push_back(kv_grid_result_json(r));
    std::ofstream file(f.json);
    require(file.good(), "cannot write ", f.json);
    file << out.dump(2) << "\n";
    require(file.good(), "cannot write ", f.json);
  }
}

}  // namespace

json kv_grid_result_json(const KvGridResult& r) {
  return {{"name", r.row.name},
          {"key_codec", r.row.key_codec.text()},
          {"value_codec", r.row.value_codec.text()},
          {"bits_per_key", r.key_bits.bits_per_vector},
          {"bits_per_value", r.value_bits.bits_per_vector},
          {"key_side_bits", r.key_bits.side_bits_per_vector},
          {"key_fp16_window_tokens", {r.key_bits.window_min_tokens, r.key_bits.window_max_tokens}},
          {"ppl", r.ppl.ppl},
          {"nll", r.ppl.nll},
          {"delta_ppl", r.delta_ppl},
          {"excess_removed", r.excess_removed ? json(*r.excess_removed) : json(nullptr)},
          {"base", r.row.base.empty() ? json(nullptr) : json(r.row.base)},
          {"note", r.row.note},
          {"same_run_as", r.same_run_as.empty() ? json(nullptr) : json(r.same_run_as)},
          {"tokens", r.ppl.tokens},
          {"selector", r.row.selector.text},
          {"support_mean", r.ppl.support_mean},
          {"context_mean", r.ppl.context_mean},
          {"seconds", r.ppl.seconds}};
}

void add_eval_kv_command(CLI::App& eval) {
  auto flags = std::make_shared<EvalKvFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "kv",
      "The K-only decode-perplexity grid of the HeadQ paper: dense, int2/3/4 per-token and "
      "per-channel keys, HeadQ ranks, controls, same-budget plain quantizers, value bit policies "
      "(uniform, recency, A1, A2), full-KV 2-bit");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--tokens,-n", flags->tokens,
                  "score only the first N tokens (default 0: the whole text)");
  cmd->add_option("--window,-L", flags->window, "tokens per window, BOS included (default 1024)");
  cmd->add_option("--basis", flags->basis,
                  "HeadQ basis file from `visikv calibrate` (default: calibrate in-process)");
  cmd->add_option("--calibration-tokens", flags->calibration_tokens,
                  "positions for in-process calibration (default 8192)");
  cmd->add_option("--calibration-text", flags->calibration_text,
                  "calibration text (default: WikiText-2 validation)");
  cmd->add_option("--ranks", flags->ranks, "comma-separated HeadQ ranks (default 4,8,16)")
      ->delimiter(',');
  cmd->add_option("--side-bits", flags->side_bits, "bits per HeadQ side-code number (default 4)");
  cmd->add_option("--rows", flags->rows,
                  "comma-separated row names (default: all; dense and base rows are added)")
      ->delimiter(',');
  cmd->add_option("--text", flags->text, "evaluation text (default: WikiText-103 test)");
  cmd->add_option("--mode", flags->mode,
                  "decode-batched (default: decode order in the largest chunks the cache keeps "
                  "identical to token by token) or decode (token by token, the reference)");
  cmd->add_option("--json", flags->json, "write the table as JSON to this file");
  cmd->callback([flags] { run_eval_kv(*flags); });
}

}  // namespace visikv::cli

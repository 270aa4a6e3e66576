#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "visikv/cli/basis_source.h"
#include "visikv/cli/commands.h"
#include "visikv/cli/long_run.h"
#include "visikv/core/error.h"
#include "visikv/eval/perplexity.h"
#include "visikv/eval/report.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"
#include "visikv/model/weight_kernels.h"

namespace visikv::cli {

namespace {

struct PplFlags {
  std::string model, file, mode = "prefill", keys = "f32", values = "f32", selector = "dense";
  std::string basis;           // HeadQ basis file
  std::string reference_keys;  // empty: no reference run
  std::string numerics = "exact";
  int64_t window = 1024, tokens = 0;
  RunOutputFlags output;
};

// What the report shows besides the flags as given.
struct PplRun {
  std::string model, text;
  size_t text_tokens = 0;
  PerplexityOptions options;
  PerplexityResult result;
};

nlohmann::json ppl_json(const PplRun& run, const PplFlags& f);
PerplexityResult ppl_result_from_json(const nlohmann::json& j);

PplRun run_ppl(const PplFlags& f) {
  PplRun run;
  PerplexityOptions& options = run.options;
  options.key_codec = parse_flag("--keys", f.keys, parse_key_codec_spec);
  options.value_codec = parse_flag("--values", f.values, parse_value_codec_spec);
  options.selector = parse_flag("--selector", f.selector, parse_selector_spec);
  // The reference: the same model with these keys, f32 values and dense attention.
  if (!f.reference_keys.empty())
    options.reference =
        ReferenceRun{parse_flag("--reference-keys", f.reference_keys, parse_key_codec_spec)};
  const Model model = Model::load(f.model);
  run.model = model.source();
  require(f.numerics == "exact" || f.mode != "decode-batched", "--numerics ", f.numerics,
          ": decode-batched computes decode order with exact products only");
  Decoder decoder(model);
  apply_numerics(f.numerics, decoder);
  options.mode = perplexity_mode_from_name(f.mode);
  options.window = f.window;
  options.max_tokens = f.tokens;
  check_perplexity_options(model.config(), options);
  const std::filesystem::path text_path = text_or_default_test_text(f.file);
  run.text = text_path.string();
  const BasisSource basis = load_basis_file(model, f.basis);
  if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
  // One row: the whole run (a done run is read back, not rerun).
  const RowJournal journal = open_row_journal(
      f.output, "ppl",
      {{"model", run.model},
       {"text", run.text},
       {"mode", f.mode},
       {"window", f.window},
       {"tokens", f.tokens},
       {"numerics", f.numerics},
       {"key_codec", options.key_codec.text()},
       {"value_codec", options.value_codec.text()},
       {"selector", f.selector},
       {"basis", basis.json},
       {"reference_keys", options.reference ? nlohmann::json(options.reference->key_codec.text())
                                            : nlohmann::json(nullptr)}},
      {.rows = ""});
  if (journal.kept_complete()) {
    const nlohmann::json& kept = journal.kept_document();
    run.result = journal.read(kept, "the run", ppl_result_from_json);
    run.text_tokens = journal.read(
        kept, "the run", [](const nlohmann::json& j) { return j.at("text_tokens").get<size_t>(); });
    return run;
  }
  // With --tokens, only the leading tokens the windows score are read.
  const std::vector<int32_t> tokens = text_file_tokens(
      model.tokenizer(), text_path,
      f.tokens > 0 ? std::optional(text_tokens_to_score(f.tokens, f.window)) : std::nullopt);
  run.text_tokens = tokens.size();
  options.headq_basis = basis.get();
  RowProgress progress(1, f.output.quiet);
  run.result = perplexity(decoder, tokens, options, [&](int64_t done, int64_t total) {
    progress.update("ppl", done, total, "tokens");
  });
  progress.finish();
  options.headq_basis = nullptr;  // the basis ends with this call
  journal.save(ppl_json(run, f), true);
  return run;
}

void print_ppl_report(const PplRun& run, const PplFlags& f) {
  const PerplexityResult& r = run.result;
  std::printf(
      "model:        %s\ntext:         %s (%zu tokens read)\nmode:         %s, window %lld, %s "
      "numerics\n"
      "cache:        keys %s, values %s; attention %s\n"
      "tokens:       %lld scored in %lld windows\nmean NLL:     %.6f\nPPL:          %.4f\n"
      "speed:        %.1f tokens/s (%.1f s)\n",
      run.model.c_str(), run.text.c_str(), run.text_tokens, f.mode.c_str(),
      static_cast<long long>(run.options.window), f.numerics.c_str(), f.keys.c_str(),
      f.values.c_str(), f.selector.c_str(), static_cast<long long>(r.tokens),
      static_cast<long long>(r.windows), r.nll, r.ppl, r.tokens_per_s, r.seconds);
  if (const std::optional<DivergenceSummary>& d = r.divergence)
    std::printf(
        "reference:    keys %s, values f32, dense attention: PPL %.4f (mean NLL %.6f)\n"
        "KL:           mean %.4e, p99 %.4e, max %.4e nats per token: KL(reference || this run) "
        "of the next-token distribution\ntop-1:        %.4f of tokens agree with the reference\n",
        f.reference_keys.c_str(), r.reference_ppl.value_or(NAN), r.reference_nll.value_or(NAN),
        d->kl_mean, d->kl_p99, d->kl_max, d->top1_agreement);
}

nlohmann::json ppl_json(const PplRun& run, const PplFlags& f) {
  const PerplexityResult& r = run.result;
  nlohmann::json out = {
      {"model", run.model},
      {"text", run.text},
      {"text_tokens", run.text_tokens},
      {"mode", f.mode},
      {"window", run.options.window},
      {"numerics", f.numerics},
      {"kernels", weight_kernel_target()},
      {"key_codec", f.keys},
      {"value_codec", f.values},
      {"selector", f.selector},
      {"tokens", r.tokens},
      {"windows", r.windows},
      {"nll", r.nll},
      {"ppl", r.ppl},
      {"tokens_per_s", r.tokens_per_s},
      {"seconds", r.seconds},
      {"bos_per_window", run.options.bos.has_value()},
      {"reference_keys",
       f.reference_keys.empty() ? nlohmann::json(nullptr) : nlohmann::json(f.reference_keys)},
      {"reference_nll", optional_json(r.reference_nll)},
      {"reference_ppl", optional_json(r.reference_ppl)}};
  add_divergence_json(out, r.divergence);
  return out;
}

// The result ppl_json wrote (--resume).
PerplexityResult ppl_result_from_json(const nlohmann::json& j) {
  PerplexityResult r = perplexity_result_from_json(j);
  r.tokens_per_s = j.at("tokens_per_s").get<double>();  // as the run measured it
  r.reference_nll = optional_from_json(j.at("reference_nll"));
  r.reference_ppl = optional_from_json(j.at("reference_ppl"));
  return r;
}

}  // namespace

void add_ppl_command(CLI::App& app) {
  auto flags = std::make_shared<PplFlags>();
  CLI::App* cmd = app.add_subcommand("ppl", "Perplexity over non-overlapping windows of a text");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--file,-f", flags->file, "text file (default: WikiText-103 test)");
  cmd->add_option(
         "--mode", flags->mode,
         "prefill (whole windows), decode (token by token) or decode-batched (decode order in "
         "the largest chunks that compute what token by token computes)")
      ->check(CLI::IsMember({"prefill", "decode", "decode-batched"}));
  cmd->add_option("--window,-L", flags->window, "tokens per window")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--tokens,-n", flags->tokens, "score only the first N tokens (0 = all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option(
      "--keys,--cache", flags->keys,
      "key cache codec, e.g. f32, f16, int2:g64:tok, int2:g32:chan:r128 (docs/CACHE_SPECS.md)");
  cmd->add_option("--values", flags->values, "value cache codec (same grammar; default f32)");
  cmd->add_option(
      "--basis", flags->basis,
      "HeadQ basis file from `visikv calibrate`, for keys like int2:g64:tok+headq:r8:s4");
  cmd->add_option(
      "--selector", flags->selector,
      "attention support, e.g. dense, sparse:a1:w64:k32:exact, certified:a1:w64:b32:eps0.01 "
      "(docs/SELECTOR_SPECS.md)");
  cmd->add_option("--reference-keys", flags->reference_keys,
                  "also run the model with these keys, f32 values and dense attention (e.g. f32), "
                  "and report KL(reference || this run) of the next-token distribution (mean, "
                  "p99, max) and the top-1 agreement");
  add_numerics_option(*cmd, flags->numerics);
  add_run_output_options(*cmd, flags->output, "the result");
  cmd->callback([flags] {
    apply_global_options();
    print_ppl_report(run_ppl(*flags), *flags);
  });
}

}  // namespace visikv::cli

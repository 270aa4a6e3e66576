#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "visikv/cli/basis_source.h"
#include "visikv/cli/commands.h"
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
  std::string model, file, mode = "prefill", keys = "f32", values = "f32", selector = "dense", json;
  std::string basis;  // HeadQ basis file
  std::string numerics = "exact";
  int64_t window = 1024, tokens = 0;
};

// Progress on stderr: a one-line bar redrawn a few times a second on a terminal, otherwise a
// plain line at every tenth of the work (logs of long runs show how far they got).
class ProgressBar {
 public:
  ProgressBar() : terminal_(::isatty(STDERR_FILENO) != 0), started_(Clock::now()) {}
  void operator()(int64_t done, int64_t total) {
    const auto now = Clock::now();
    const double seconds = std::chrono::duration<double>(now - started_).count();
    const double rate = done / std::max(seconds, 1e-9);
    if (!terminal_) {
      const int64_t tenth = 10 * done / std::max<int64_t>(total, 1);
      if (tenth <= last_tenth_) return;
      last_tenth_ = tenth;
      std::fprintf(stderr, "%lld/%lld tokens scored, %.1f tokens/s\n", static_cast<long long>(done),
                   static_cast<long long>(total), rate);
      return;
    }
    if (done < total && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    const int width = 30, filled = static_cast<int>(width * done / std::max<int64_t>(total, 1));
    std::fprintf(stderr, "\r[%s%s] %lld/%lld tokens, %.1f tokens/s ",
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                 static_cast<long long>(done), static_cast<long long>(total), rate);
    if (done >= total) std::fprintf(stderr, "\n");
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool terminal_;
  Clock::time_point started_, last_{};
  int64_t last_tenth_ = 0;
};

// What the report shows besides the flags as given.
struct PplRun {
  std::string model, text;
  size_t text_tokens = 0;
  PerplexityOptions options;
  PerplexityResult result;
};

PplRun run_ppl(const PplFlags& f) {
  PplRun run;
  PerplexityOptions& options = run.options;
  options.key_codec = parse_flag("--keys", f.keys, parse_key_codec_spec);
  options.value_codec = parse_flag("--values", f.values, parse_value_codec_spec);
  options.selector = parse_flag("--selector", f.selector, parse_selector_spec);
  const Model model = Model::load(f.model);
  run.model = model.source();
  require(f.numerics == "exact" || f.mode != "decode-batched",
          "--numerics int8: decode-batched computes decode order with exact products only");
  Decoder decoder(model);
  apply_numerics(f.numerics, decoder);
  options.mode = perplexity_mode_from_name(f.mode);
  options.window = f.window;
  options.max_tokens = f.tokens;
  check_perplexity_options(model.config(), options);
  const std::filesystem::path text_path = text_or_default_test_text(f.file);
  run.text = text_path.string();
  // With --tokens, only the leading tokens the windows score are read.
  const std::vector<int32_t> tokens = text_file_tokens(
      model.tokenizer(), text_path,
      f.tokens > 0 ? std::optional(text_tokens_to_score(f.tokens, f.window)) : std::nullopt);
  run.text_tokens = tokens.size();
  const BasisSource basis = load_basis_file(model, f.basis);
  options.headq_basis = basis.get();
  if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
  ProgressBar bar;
  run.result = perplexity(decoder, tokens, options, std::ref(bar));
  options.headq_basis = nullptr;  // the basis ends with this call
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
}

nlohmann::json ppl_json(const PplRun& run, const PplFlags& f) {
  const PerplexityResult& r = run.result;
  return {{"model", run.model},     {"text", run.text},
          {"mode", f.mode},         {"window", run.options.window},
          {"numerics", f.numerics}, {"kernels", weight_kernel_target()},
          {"key_codec", f.keys},    {"value_codec", f.values},
          {"selector", f.selector}, {"tokens", r.tokens},
          {"windows", r.windows},   {"nll", r.nll},
          {"ppl", r.ppl},           {"tokens_per_s", r.tokens_per_s},
          {"seconds", r.seconds},   {"bos_per_window", run.options.bos.has_value()}};
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
  add_numerics_option(*cmd, flags->numerics);
  cmd->add_option("--json", flags->json, "write the result as JSON to this file");
  cmd->callback([flags] {
    apply_global_options();
    const PplRun run = run_ppl(*flags);
    print_ppl_report(run, *flags);
    if (!flags->json.empty()) write_json_file(flags->json, ppl_json(run, *flags));
  });
}

}  // namespace visikv::cli

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/eval/basis_file.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/perplexity.h"
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
    PerplexityOptions options;
    options.key_codec = parse_flag("--keys", flags->keys, parse_key_codec_spec);
    options.value_codec = parse_flag("--values", flags->values, parse_value_codec_spec);
    options.selector = parse_flag("--selector", flags->selector, parse_selector_spec);
    const Model model = Model::load(flags->model);
    require(flags->numerics == "exact" || flags->mode != "decode-batched",
            "--numerics int8: decode-batched computes decode order with exact products only");
    Decoder decoder(model);
    apply_numerics(flags->numerics, decoder);
    const std::filesystem::path text_path =
        flags->file.empty() ? default_test_text() : std::filesystem::path(flags->file);
    const std::string text = read_text_file(text_path);
    const std::vector<int32_t> tokens = model.tokenizer().encode(text, false);
    options.mode = perplexity_mode_from_name(flags->mode);
    options.window = flags->window;
    options.max_tokens = flags->tokens;
    std::optional<HeadqBasis> basis;
    if (!flags->basis.empty()) {
      basis = load_headq_basis(flags->basis, model);
      options.headq_basis = &*basis;
    }
    if (model.tokenizer().adds_bos()) options.bos = model.tokenizer().bos_id();
    ProgressBar bar;
    const PerplexityResult r = perplexity(decoder, tokens, options, std::ref(bar));
    std::printf(
        "model:        %s\ntext:         %s (%zu tokens)\nmode:         %s, window %lld, %s "
        "numerics\n"
        "cache:        keys %s, values %s; attention %s\n"
        "tokens:       %lld scored in %lld windows\nmean NLL:     %.6f\nPPL:          %.4f\n"
        "speed:        %.1f tokens/s (%.1f s)\n",
        model.source().c_str(), text_path.string().c_str(), tokens.size(), flags->mode.c_str(),
        static_cast<long long>(options.window), flags->numerics.c_str(), flags->keys.c_str(),
        flags->values.c_str(), flags->selector.c_str(), static_cast<long long>(r.tokens),
        static_cast<long long>(r.windows), r.nll, r.ppl, r.tokens_per_s, r.seconds);
    if (!flags->json.empty()) {
      const nlohmann::json out = {{"model", model.source()},
                                  {"text", text_path.string()},
                                  {"mode", flags->mode},
                                  {"window", options.window},
                                  {"numerics", flags->numerics},
                                  {"kernels", weight_kernel_target()},
                                  {"key_codec", flags->keys},
                                  {"value_codec", flags->values},
                                  {"selector", flags->selector},
                                  {"tokens", r.tokens},
                                  {"windows", r.windows},
                                  {"nll", r.nll},
                                  {"ppl", r.ppl},
                                  {"tokens_per_s", r.tokens_per_s},
                                  {"seconds", r.seconds},
                                  {"bos_per_window", options.bos.has_value()}};
      std::ofstream file(flags->json);
      require(file.good(), "cannot write ", flags->json);
      file << out.dump(2) << "\n";
    }
  });
}

}  // namespace visikv::cli

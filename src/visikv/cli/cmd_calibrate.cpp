// `visikv calibrate MODEL --out FILE`: HeadQ calibration (calibration/calibrate.h) and its basis
// file (calibration/basis_file.h).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "visikv/calibration/basis_file.h"
#include "visikv/calibration/calibrate.h"
#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {

struct CalibrateFlags {
  std::string model, text, out;
  CalibrationOptions options;
};

}  // namespace

void add_calibrate_command(CLI::App& app) {
  auto flags = std::make_shared<CalibrateFlags>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate",
      "HeadQ calibration: per layer and KV head, the top eigenvectors of the query second "
      "moment E[q qᵀ] (and of E[k kᵀ] for the key-PCA control), written to a basis file");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--text", flags->text, "calibration text file (default: WikiText-2 validation)");
  cmd->add_option("--tokens,-n", flags->options.tokens, "positions to run (default 8192)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--rank,-r", flags->options.rank, "eigenvectors kept per head (default 16)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--window,-L", flags->options.window,
                  "positions per prefill window (1024; at most the model's context)")
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--out,-o", flags->out, "basis file to write")->required();
  cmd->callback([cmd, flags] {
    apply_global_options();
    const Model model = Model::load(flags->model);
    // The default window shrinks to a shorter context; a window asked for must fit it.
    if (cmd->count("--window") > 0)
      check_context(model.config(), flags->options.window,
                    str_cat("--window ", flags->options.window));
    const std::filesystem::path text_path =
        flags->text.empty() ? default_calibration_text() : std::filesystem::path(flags->text);
    // Each position holds at most one text token, so --tokens text tokens are enough.
    const std::vector<int32_t> tokens =
        text_file_tokens(model.tokenizer(), text_path, flags->options.tokens);
    const HeadqBasis basis = calibrate_headq(
        model, tokens, text_path.string(), flags->options, [](int64_t done, int64_t total) {
          std::fprintf(stderr, "%lld/%lld positions\n", static_cast<long long>(done),
                       static_cast<long long>(total));
        });
    save_headq_basis(basis, flags->out);
    // Share of the query energy (trace of Σ_q) the top-r eigenvectors hold, averaged over heads.
    double captured = 0;
    const int64_t d = basis.head_dim;
    for (int64_t i = 0; i < basis.heads(); ++i) {
      double top = 0, all = 0;
      for (int64_t j = 0; j < d; ++j) {
        const double value = std::max(0.0, basis.query_eigenvalues[i * d + j]);
        all += value;
        if (j < basis.rank) top += value;
      }
      captured += all > 0 ? top / all : 0;
    }
    std::printf(
        "model:        %s\nfingerprint:  %s\ntext:         %s\npositions:    %lld (window %lld)\n"
        "heads:        %lld layers x %lld kv heads, head_dim %lld\nrank:         %lld "
        "(mean share of query energy in the top %lld: %.4f)\nwritten:      %s\n",
        model.source().c_str(), basis.fingerprint.c_str(), basis.text.c_str(),
        static_cast<long long>(basis.tokens), static_cast<long long>(basis.window),
        static_cast<long long>(basis.layers), static_cast<long long>(basis.kv_heads),
        static_cast<long long>(d), static_cast<long long>(basis.rank),
        static_cast<long long>(basis.rank), captured / static_cast<double>(basis.heads()),
        flags->out.c_str());
  });
}

}  // namespace visikv::cli

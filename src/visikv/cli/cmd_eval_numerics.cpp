// `visikv eval numerics`: the int8 products (8-bit activations) against the exact ones.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/numerics.h"
#include "visikv/eval/report.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/model.h"
#include "visikv/model/weight_kernels.h"

namespace visikv::cli {

namespace {
struct NumericsFlags {
  std::string model, file, json;
  int64_t tokens = 4096, window = 1024;
};
}  // namespace

void add_eval_numerics_command(CLI::App& eval) {
  auto flags = std::make_shared<NumericsFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "numerics", "int8 products (--numerics int8) against exact ones: top-1 agreement and KL");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--tokens,-n", flags->tokens, "positions compared (0 = the whole text)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--window,-L", flags->window, "tokens per window")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--file,-f", flags->file, "text file (default: WikiText-103 test)");
  cmd->add_option("--json", flags->json, "write the result as JSON to this file");
  cmd->callback([flags] {
    apply_global_options();
    const Model model = Model::load(flags->model);
    check_context(model.config(), flags->window, str_cat("a window of ", flags->window, " tokens"));
    const std::filesystem::path text_path = text_or_default_test_text(flags->file);
    std::optional<int32_t> bos;
    if (model.tokenizer().adds_bos()) bos = model.tokenizer().bos_id();
    // With --tokens, only the windows compared are read.
    const std::vector<int32_t> tokens = text_file_tokens(
        model.tokenizer(), text_path,
        flags->tokens > 0
            ? std::optional(numerics_text_tokens(flags->tokens, flags->window, bos.has_value()))
            : std::nullopt);
    const NumericsAgreement r =
        compare_numerics(model, tokens, flags->window, flags->tokens, ProductRounding::Fastest,
                         ProductRounding::QuantizedActivations, bos);
    std::printf(
        "model:          %s\nkernels:        %s\npositions:      %lld (windows of %lld)\n"
        "top-1 agreement %.4f\nmean KL:        %.3e (max %.3e)\nmean NLL:       exact %.6f, "
        "int8 %.6f\n",
        model.source().c_str(), weight_kernel_target().c_str(), static_cast<long long>(r.positions),
        static_cast<long long>(flags->window), r.top1_agreement, r.mean_kl, r.max_kl,
        r.reference_nll, r.candidate_nll);
    if (!flags->json.empty()) {
      const nlohmann::json out = {{"model", model.source()},
                                  {"text", text_path.string()},
                                  {"kernels", weight_kernel_target()},
                                  {"positions", r.positions},
                                  {"window", flags->window},
                                  {"top1_agreement", r.top1_agreement},
                                  {"mean_kl", r.mean_kl},
                                  {"max_kl", r.max_kl},
                                  {"exact_nll", r.reference_nll},
                                  {"int8_nll", r.candidate_nll}};
      write_json_file(flags->json, out);
    }
  });
}

}  // namespace visikv::cli

// `visikv eval numerics`: the int8 products (8-bit activations) against the exact ones.
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "visikv/cli/commands.h"
#include "visikv/cli/long_run.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/numerics.h"
#include "visikv/eval/report.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/model.h"
#include "visikv/model/weight_kernels.h"

namespace visikv::cli {

namespace {

using nlohmann::json;

struct NumericsFlags {
  std::string model, file;
  int64_t tokens = 4096, window = 1024;
  RunOutputFlags output;
};

json numerics_json(const NumericsAgreement& r) {
  json out = {{"positions", r.divergence.positions},
              {"exact_nll", r.reference_nll},
              {"int8_nll", r.candidate_nll}};
  add_divergence_json(out, r.divergence);
  return out;
}

NumericsAgreement numerics_from_json(const json& j) {
  NumericsAgreement r;
  const int64_t positions = j.at("positions").get<int64_t>();
  r.divergence = divergence_from_json(j, positions).value();
  r.reference_nll = j.at("exact_nll").get<double>();
  r.candidate_nll = j.at("int8_nll").get<double>();
  return r;
}

// One row: the comparison over every position (a done run is read back, not rerun).
NumericsAgreement run_eval_numerics(const NumericsFlags& f, const Model& model,
                                    const std::filesystem::path& text_path) {
  const RowJournal journal = open_row_journal(f.output, "eval numerics",
                                              {{"model", model.source()},
                                               {"text", text_path.string()},
                                               {"tokens", f.tokens},
                                               {"window", f.window}},
                                              {.rows = ""});
  if (journal.kept_complete())
    return journal.read(journal.kept_document(), "the comparison", numerics_from_json);
  std::optional<int32_t> bos;
  if (model.tokenizer().adds_bos()) bos = model.tokenizer().bos_id();
  // With --tokens, only the windows compared are read.
  const std::vector<int32_t> tokens = text_file_tokens(
      model.tokenizer(), text_path,
      f.tokens > 0 ? std::optional(numerics_text_tokens(f.tokens, f.window, bos.has_value()))
                   : std::nullopt);
  RowProgress progress(1, f.output.quiet);
  progress.start("exact vs int8");
  const NumericsAgreement r = compare_numerics(
      model, tokens, f.window, f.tokens, ProductRounding::Fastest,
      ProductRounding::QuantizedActivations, bos, [&](int64_t done, int64_t total) {
        progress.update("exact vs int8", done, total, "positions");
      });
  progress.finish();
  json out = numerics_json(r);
  out.update({{"model", model.source()},
              {"text", text_path.string()},
              {"kernels", weight_kernel_target()},
              {"window", f.window}});
  journal.save(out, true);
  return r;
}

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
  add_run_output_options(*cmd, flags->output, "the result");
  cmd->callback([flags] {
    apply_global_options();
    const Model model = Model::load(flags->model);
    check_context(model.config(), flags->window, str_cat("a window of ", flags->window, " tokens"));
    const std::filesystem::path text_path = text_or_default_test_text(flags->file);
    const NumericsAgreement r = run_eval_numerics(*flags, model, text_path);
    const DivergenceSummary& d = r.divergence;
    std::printf(
        "model:          %s\nkernels:        %s\npositions:      %lld (windows of %lld)\n"
        "top-1 agreement %.4f\nmean KL:        %.3e (p99 %.3e, max %.3e)\nmean NLL:       exact "
        "%.6f, int8 %.6f\n",
        model.source().c_str(), weight_kernel_target().c_str(), static_cast<long long>(d.positions),
        static_cast<long long>(flags->window), d.top1_agreement, d.kl_mean, d.kl_p99, d.kl_max,
        r.reference_nll, r.candidate_nll);
  });
}

}  // namespace visikv::cli

// `visikv eval numerics`: the int8 and int16 products (8- and 16-bit activations) against the
// exact ones, every mode against one run of the exact products.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "visikv/cli/commands.h"
#include "visikv/cli/long_run.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/numerics.h"
#include "visikv/eval/report.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/matmul.h"
#include "visikv/model/model.h"
#include "visikv/model/weight_kernels.h"

namespace visikv::cli {

namespace {

using nlohmann::json;

struct NumericsFlags {
  std::string model, file;
  int64_t tokens = 4096, window = 1024;
  std::vector<std::string> numerics = {"int8", "int16"};
  RunOutputFlags output;
};

json numerics_json(const std::string& numerics, const NumericsAgreement& r) {
  json out = {{"numerics", numerics},
              {"positions", r.divergence.positions},
              {"exact_nll", r.reference_nll},
              {"nll", r.candidate_nll}};
  add_divergence_json(out, r.divergence);
  return out;
}

NumericsAgreement numerics_from_json(const json& j) {
  NumericsAgreement r;
  const int64_t positions = j.at("positions").get<int64_t>();
  r.divergence = divergence_from_json(j, positions).value();
  r.reference_nll = j.at("exact_nll").get<double>();
  r.candidate_nll = j.at("nll").get<double>();
  return r;
}

// One row per mode, all from one pass over the text (a done run is read back, not rerun).
std::vector<NumericsAgreement> run_eval_numerics(const NumericsFlags& f, const Model& model,
                                                 const std::filesystem::path& text_path) {
  const RowJournal journal = open_row_journal(f.output, "eval numerics",
                                              {{"model", model.source()},
                                               {"text", text_path.string()},
                                               {"tokens", f.tokens},
                                               {"window", f.window},
                                               {"numerics", f.numerics}},
                                              {.rows = "rows", .key = "numerics"});
  journal.check_rows(f.numerics);
  if (journal.kept_complete()) {
    std::vector<NumericsAgreement> kept;
    for (const std::string& name : f.numerics)
      kept.push_back(journal.read(*journal.kept_row(name), "row " + name, numerics_from_json));
    return kept;
  }
  std::optional<int32_t> bos;
  if (model.tokenizer().adds_bos()) bos = model.tokenizer().bos_id();
  // With --tokens, only the windows compared are read.
  const std::vector<int32_t> tokens = text_file_tokens(
      model.tokenizer(), text_path,
      f.tokens > 0 ? std::optional(numerics_text_tokens(f.tokens, f.window, bos.has_value()))
                   : std::nullopt);
  std::vector<ProductRounding> candidates;
  std::string row_name = "exact vs";
  for (const std::string& name : f.numerics) {
    candidates.push_back(numerics_rounding(name));
    row_name += " " + name;
  }
  RowProgress progress(1, f.output.quiet);
  progress.start(row_name);
  const std::vector<NumericsAgreement> results = compare_numerics(
      model, tokens, f.window, f.tokens, ProductRounding::Fastest, candidates, bos,
      [&](int64_t done, int64_t total) { progress.update(row_name, done, total, "positions"); });
  progress.finish();
  json rows = json::array();
  for (size_t i = 0; i < results.size(); ++i)
    rows.push_back(numerics_json(f.numerics[i], results[i]));
  journal.save({{"model", model.source()},
                {"text", text_path.string()},
                {"kernels", weight_kernel_target()},
                {"window", f.window},
                {"rows", rows}},
               true);
  return results;
}

}  // namespace

void add_eval_numerics_command(CLI::App& eval) {
  auto flags = std::make_shared<NumericsFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "numerics",
      "int8 and int16 products (--numerics) against exact ones: top-1 agreement and KL");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--tokens,-n", flags->tokens, "positions compared (0 = the whole text)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--window,-L", flags->window, "tokens per window")->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--file,-f", flags->file, "text file (default: WikiText-103 test)");
  cmd->add_option("--numerics", flags->numerics,
                  "modes compared with exact, each once (default: int8 int16)")
      ->check(CLI::IsMember({"int8", "int16"}))
      ->expected(1, 2);
  add_run_output_options(*cmd, flags->output, "the result");
  cmd->callback([flags] {
    apply_global_options();
    std::vector<std::string> seen;
    for (const std::string& name : flags->numerics) {
      require(std::find(seen.begin(), seen.end(), name) == seen.end(), "--numerics: ", name,
              " given twice");
      seen.push_back(name);
    }
    const Model model = Model::load(flags->model);
    check_context(model.config(), flags->window, str_cat("a window of ", flags->window, " tokens"));
    const std::filesystem::path text_path = text_or_default_test_text(flags->file);
    const std::vector<NumericsAgreement> results = run_eval_numerics(*flags, model, text_path);
    std::printf("model:          %s\nkernels:        %s\npositions:      %lld (windows of %lld)\n",
                model.source().c_str(), weight_kernel_target().c_str(),
                static_cast<long long>(results[0].divergence.positions),
                static_cast<long long>(flags->window));
    std::printf("%-8s %8s %10s %10s %10s %10s %10s\n", "numerics", "top-1", "mean KL", "p99 KL",
                "max KL", "exact NLL", "NLL");
    for (size_t i = 0; i < results.size(); ++i) {
      const DivergenceSummary& d = results[i].divergence;
      std::printf("%-8s %8.4f %10.3e %10.3e %10.3e %10.6f %10.6f\n", flags->numerics[i].c_str(),
                  d.top1_agreement, d.kl_mean, d.kl_p99, d.kl_max, results[i].reference_nll,
                  results[i].candidate_nll);
    }
  });
}

}  // namespace visikv::cli

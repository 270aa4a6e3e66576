#include "visikv/cli/basis_source.h"

#include <cstdio>
#include <filesystem>

#include "visikv/calibration/basis_file.h"
#include "visikv/calibration/calibrate.h"
#include "visikv/core/error.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/report.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/model.h"

namespace visikv::cli {

void add_basis_options(CLI::App& cmd, BasisFlags& flags, const std::string& basis_help) {
  cmd.add_option("--basis", flags.path, basis_help);
  cmd.add_option("--calibration-tokens", flags.calibration_tokens,
                 "positions for in-process calibration (default 8192)");
  cmd.add_option("--calibration-text", flags.calibration_text,
                 "calibration text (default: WikiText-2 validation)");
}

void check_basis_flags(const BasisFlags& flags) {
  require(flags.calibration_tokens >= 1, "--calibration-tokens must be positive, got ",
          flags.calibration_tokens);
}

BasisSource load_or_calibrate_basis(const Model& model, const BasisFlags& flags,
                                    const BasisRequest& request) {
  BasisSource out;
  out.json = {{"source", "none"}};
  if (!flags.path.empty()) {
    out.basis = load_headq_basis(flags.path, model, request.min_rank);
    out.json = {{"source", "file"}, {"path", flags.path}};
  } else if (request.needed) {
    const std::filesystem::path path = flags.calibration_text.empty()
                                           ? default_calibration_text()
                                           : std::filesystem::path(flags.calibration_text);
    CalibrationOptions options;
    options.tokens = flags.calibration_tokens;
    options.rank = request.calibration_rank;
    options.window = request.calibration_window;
    std::fprintf(stderr, "calibrating HeadQ bases on %s (%lld positions, rank %lld)\n",
                 path.string().c_str(), static_cast<long long>(options.tokens),
                 static_cast<long long>(options.rank));
    // Each position holds at most one text token, so options.tokens text tokens are enough.
    out.basis =
        calibrate_headq(model, text_file_tokens(model.tokenizer(), path, options.tokens),
                        path.string(), options, [](int64_t done, int64_t total) {
                          std::fprintf(stderr, "calibration: %lld/%lld positions\n",
                                       static_cast<long long>(done), static_cast<long long>(total));
                        });
    out.json = {{"source", "calibrated"}};
  }
  if (out.basis) out.json.update(headq_basis_json(*out.basis));
  return out;
}

BasisSource load_basis_file(const Model& model, const std::string& path) {
  BasisFlags flags;
  flags.path = path;
  return load_or_calibrate_basis(model, flags, BasisRequest{});
}

}  // namespace visikv::cli

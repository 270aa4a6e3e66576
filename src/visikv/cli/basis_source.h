// The HeadQ basis a command reads: from `--basis`, or calibrated in-process on
// `--calibration-text` when the command needs one and no file is given.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "visikv/calibration/headq_basis.h"

namespace visikv {
class Model;
}

namespace visikv::cli {

struct BasisFlags {
  std::string path;              // --basis
  std::string calibration_text;  // empty: WikiText-2 validation
  int64_t calibration_tokens = 8192;
};

// Registers --basis (described by `basis_help`), --calibration-tokens and --calibration-text.
void add_basis_options(CLI::App& cmd, BasisFlags& flags, const std::string& basis_help);

// Throws visikv::Error for a calibration length below one token.
void check_basis_flags(const BasisFlags& flags);

struct BasisRequest {
  bool needed = false;   // calibrate when no file is given
  int64_t min_rank = 1;  // vectors per head a basis file must hold
  int64_t calibration_rank = 16;
  int64_t calibration_window = 1024;  // positions per calibration prefill
};

struct BasisSource {
  std::optional<HeadqBasis> basis;
  // For the JSON report: {"source": "none"}, {"source": "file", "path", ...} or
  // {"source": "calibrated", ...}, with the basis's own fields (headq_basis_json).
  nlohmann::json json;

  const HeadqBasis* get() const { return basis ? &*basis : nullptr; }
  std::string source() const { return json["source"].get<std::string>(); }
};

// Loads --basis (checked against the model and `request.min_rank`), else calibrates when
// `request.needed`, with progress on stderr; else no basis.
BasisSource load_or_calibrate_basis(const Model& model, const BasisFlags& flags,
                                    const BasisRequest& request);

// The basis of a `--basis` file (empty: none), for commands that never calibrate.
BasisSource load_basis_file(const Model& model, const std::string& path);

}  // namespace visikv::cli

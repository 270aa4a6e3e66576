// Report writers shared by the commands: files that fail loudly, the JSON shapes of results that
// more than one command reports, and the small formatting rules of the tables. PNG plots are
// drawn by eval/scatter_plot.h.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

namespace visikv {

struct HeadqBasis;
struct KvGridResult;
struct PerplexityResult;
struct DivergenceSummary;

// Writes `text` to `path`, replacing the file atomically: the text goes to `path`.partial, which is
// then renamed over `path` (a device or pipe is written in place). Throws visikv::Error naming
// the path when it cannot be written or the write does not complete (a full disk, a directory in
// the way).
void write_text_file(const std::filesystem::path& path, std::string_view text);

// Writes `document` as JSON indented by `indent` spaces with a final newline (write_text_file).
void write_json_file(const std::filesystem::path& path, const nlohmann::json& document,
                     int indent = 2);

// A number that may be missing: its value, or null.
nlohmann::json optional_json(const std::optional<double>& value);

// The number optional_json wrote: std::nullopt for null. Throws nlohmann::json::exception for
// anything but a number or null.
std::optional<double> optional_from_json(const nlohmann::json& value);

// A number that may be missing, for a table cell: printf `format`, or "-".
std::string format_optional(const std::optional<double>& value, const char* format);

// The KL, KL p99 and top-1 agreement cells of a table row (widths 9, 9, 6), "-" for a row
// without them (the reference itself).
std::string divergence_cells(const std::optional<DivergenceSummary>& divergence);

// One row of a decode-perplexity grid (eval/kv_grid.h), as `eval kv` and `eval sparse-ppl`
// report it (with the KL fields of eval/divergence.h: null for the dense row).
nlohmann::json kv_grid_result_json(const KvGridResult& result);
// The run such a row reports, read back for --resume (tokens_per_s from tokens and seconds).
// Throws nlohmann::json::exception for a missing or mistyped field.
PerplexityResult kv_grid_run_from_json(const nlohmann::json& row);
// What every perplexity row holds (tokens, windows, nll, ppl, seconds, divergence), read back;
// tokens_per_s is derived from them.
PerplexityResult perplexity_result_from_json(const nlohmann::json& row);

// Where a HeadQ basis came from: text, tokens, window, rank, fingerprint.
nlohmann::json headq_basis_json(const HeadqBasis& basis);

}  // namespace visikv

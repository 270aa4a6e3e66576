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

// Writes `text` to `path`, replacing the file. Throws visikv::Error naming the path when it cannot
// be opened or the write does not complete (a full disk, a directory in the way).
void write_text_file(const std::filesystem::path& path, std::string_view text);

// Writes `document` as JSON indented by `indent` spaces with a final newline (write_text_file).
void write_json_file(const std::filesystem::path& path, const nlohmann::json& document,
                     int indent = 2);

// A number that may be missing: its value, or null.
nlohmann::json optional_json(const std::optional<double>& value);

// A number that may be missing, for a table cell: printf `format`, or "-".
std::string format_optional(const std::optional<double>& value, const char* format);

// One row of a decode-perplexity grid (eval/kv_grid.h), as `eval kv` and `eval sparse-ppl`
// report it.
nlohmann::json kv_grid_result_json(const KvGridResult& result);

// Where a HeadQ basis came from: text, tokens, window, rank, fingerprint.
nlohmann::json headq_basis_json(const HeadqBasis& basis);

}  // namespace visikv

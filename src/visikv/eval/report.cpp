#include "visikv/eval/report.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <system_error>

#include "visikv/calibration/headq_basis.h"
#include "visikv/core/error.h"
#include "visikv/eval/divergence.h"
#include "visikv/eval/kv_grid.h"

namespace visikv {

namespace {

void write_in_place(const std::filesystem::path& path, std::string_view text) {
  std::ofstream file(path);
  require(file.good(), "cannot write ", path.string());
  file << text;
  file.close();
  // A stream that failed while writing or flushing on close says so only here.
  require(file.good(), "cannot write ", path.string());
}

}  // namespace

void write_text_file(const std::filesystem::path& path, std::string_view text) {
  // A device or a pipe (/dev/stdout) cannot be replaced: written in place.
  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (std::filesystem::exists(status) && !std::filesystem::is_regular_file(status))
    return write_in_place(path, text);
  // Otherwise a sibling file renamed over it: a reader (or a run killed mid-write) sees the old
  // file or the new one, never a part of it.
  std::filesystem::path partial = path;
  partial += ".partial";
  try {
    write_in_place(partial, text);
  } catch (const Error&) {
    std::filesystem::remove(partial, error);
    fail("cannot write ", path.string());
  }
  std::filesystem::rename(partial, path, error);
  if (error) {
    std::filesystem::remove(partial, error);
    fail("cannot write ", path.string(), " (", error.message(), ")");
  }
}

void write_json_file(const std::filesystem::path& path, const nlohmann::json& document,
                     int indent) {
  write_text_file(path, document.dump(indent) + "\n");
}

nlohmann::json optional_json(const std::optional<double>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
}

std::optional<double> optional_from_json(const nlohmann::json& value) {
  if (value.is_null()) return std::nullopt;
  return value.get<double>();
}

std::string format_optional(const std::optional<double>& value, const char* format) {
  if (!value) return "-";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, *value);
  return buffer;
}

std::string divergence_cells(const std::optional<DivergenceSummary>& d) {
  char buffer[64];
  if (d)
    std::snprintf(buffer, sizeof buffer, "%9.2e %9.2e %6.4f", d->kl_mean, d->kl_p99,
                  d->top1_agreement);
  else
    std::snprintf(buffer, sizeof buffer, "%9s %9s %6s", "-", "-", "-");
  return buffer;
}

nlohmann::json kv_grid_result_json(const KvGridResult& r) {
  using nlohmann::json;
  const auto text_or_null = [](const std::string& s) {
    return s.empty() ? json(nullptr) : json(s);
  };
  json row = {
      {"name", r.row.name},
      {"key_codec", r.row.key_codec.text()},
      {"value_codec", r.row.value_codec.text()},
      {"bits_per_key", r.key_bits.bits_per_vector},
      {"bits_per_value", r.value_bits.bits_per_vector},
      {"key_side_bits", r.key_bits.side_bits_per_vector},
      {"key_fp16_window_tokens", {r.key_bits.window_min_tokens, r.key_bits.window_max_tokens}},
      {"ppl", r.ppl.ppl},
      {"nll", r.ppl.nll},
      {"delta_ppl", r.delta_ppl},
      {"excess_removed", optional_json(r.excess_removed)},
      {"base", text_or_null(r.row.base)},
      {"note", r.row.note},
      {"same_run_as", text_or_null(r.same_run_as)},
      {"tokens", r.ppl.tokens},
      {"windows", r.ppl.windows},
      {"selector", r.row.selector.text},
      {"support_mean", r.ppl.support_mean},
      {"context_mean", r.ppl.context_mean},
      {"seconds", r.ppl.seconds}};
  add_divergence_json(row, r.ppl.divergence);
  return row;
}

PerplexityResult perplexity_result_from_json(const nlohmann::json& row) {
  PerplexityResult r;
  r.tokens = row.at("tokens").get<int64_t>();
  r.windows = row.at("windows").get<int64_t>();
  r.nll = row.at("nll").get<double>();
  r.ppl = row.at("ppl").get<double>();
  r.seconds = row.at("seconds").get<double>();
  r.tokens_per_s = r.tokens / std::max(r.seconds, 1e-9);
  r.divergence = divergence_from_json(row, r.tokens);
  return r;
}

PerplexityResult kv_grid_run_from_json(const nlohmann::json& row) {
  PerplexityResult r = perplexity_result_from_json(row);
  r.support_mean = row.at("support_mean").get<double>();
  r.context_mean = row.at("context_mean").get<double>();
  return r;
}

nlohmann::json headq_basis_json(const HeadqBasis& basis) {
  return {{"text", basis.text},
          {"tokens", basis.tokens},
          {"window", basis.window},
          {"rank", basis.rank},
          {"fingerprint", basis.fingerprint}};
}

}  // namespace visikv

#include "visikv/eval/report.h"

#include <cstdio>
#include <fstream>

#include "visikv/calibration/headq_basis.h"
#include "visikv/core/error.h"
#include "visikv/eval/kv_grid.h"

namespace visikv {

void write_text_file(const std::filesystem::path& path, std::string_view text) {
  std::ofstream file(path);
  require(file.good(), "cannot write ", path.string());
  file << text;
  file.close();
  // A stream that failed while writing or flushing on close says so only here.
  require(file.good(), "cannot write ", path.string());
}

void write_json_file(const std::filesystem::path& path, const nlohmann::json& document,
                     int indent) {
  write_text_file(path, document.dump(indent) + "\n");
}

nlohmann::json optional_json(const std::optional<double>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
}

std::string format_optional(const std::optional<double>& value, const char* format) {
  if (!value) return "-";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, *value);
  return buffer;
}

nlohmann::json kv_grid_result_json(const KvGridResult& r) {
  using nlohmann::json;
  const auto text_or_null = [](const std::string& s) {
    return s.empty() ? json(nullptr) : json(s);
  };
  return {{"name", r.row.name},
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
          {"selector", r.row.selector.text},
          {"support_mean", r.ppl.support_mean},
          {"context_mean", r.ppl.context_mean},
          {"seconds", r.ppl.seconds}};
}

nlohmann::json headq_basis_json(const HeadqBasis& basis) {
  return {{"text", basis.text},
          {"tokens", basis.tokens},
          {"window", basis.window},
          {"rank", basis.rank},
          {"fingerprint", basis.fingerprint}};
}

}  // namespace visikv

// JSON read from disk: every file the project reads (config.json, generation_config.json, the
// shard index, tokenizer.json, tokenizer_config.json, the safetensors and basis-file headers)
// goes through parse_json, so nesting depth is bounded before nlohmann's parser and the code
// that walks the result (both recursive) ever see the text.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace visikv {

// The deepest nesting of arrays and objects accepted. Real files nest a handful of levels
// (tokenizer.json's Sequence of Sequences about five); 128 leaves ample room while keeping any
// recursion over the result shallow.
inline constexpr int kMaxJsonDepth = 128;

// Parses `text`, throwing visikv::Error that starts with `what` (which names the file) when it
// nests deeper than kMaxJsonDepth or is not valid JSON.
nlohmann::json parse_json(std::string_view text, const std::string& what);

// Reads and parses a JSON file; the path must name a regular file.
nlohmann::json read_json_file(const std::filesystem::path& path);

}  // namespace visikv

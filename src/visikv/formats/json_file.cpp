#include "visikv/formats/json_file.h"

#include <fstream>
#include <iterator>

#include "visikv/core/error.h"

namespace visikv {

namespace {

// Scans the text once, without recursion: brackets inside strings (with their escapes) do not
// count. Unbalanced or otherwise malformed text is left for the parser to report.
void check_depth(std::string_view text, const std::string& what) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      require(++depth <= kMaxJsonDepth, what, ": JSON nests arrays and objects more than ",
              kMaxJsonDepth, " levels deep (at byte ", i, ")");
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
}

}  // namespace

nlohmann::json parse_json(std::string_view text, const std::string& what) {
  check_depth(text, what);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(what, ": malformed JSON: ", e.what());
  }
}

nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::error_code error;
  require(std::filesystem::is_regular_file(path, error), "cannot open JSON file ", path,
          ": missing, or not a regular file");
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "cannot open JSON file ", path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  require(!in.bad(), "cannot read JSON file ", path);
  return parse_json(text, str_cat("JSON file ", path));
}

}  // namespace visikv

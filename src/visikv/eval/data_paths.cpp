#include "visikv/eval/data_paths.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "visikv/core/error.h"

namespace visikv {

std::filesystem::path data_dir() {
  if (const char* env = std::getenv("VISIKV_DATA_DIR"); env != nullptr && *env != '\0') return env;
  return std::filesystem::path(VISIKV_SOURCE_DIR).parent_path() / "shared" / "data";
}

std::filesystem::path default_test_text() { return data_dir() / "wikitext-103-test.txt"; }
std::filesystem::path default_calibration_text() {
  return data_dir() / "wikitext-2-valid-tokenized.txt";
}

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "cannot read text file ", path,
          std::filesystem::exists(path) ? "" : " (no such file)");
  std::ostringstream content;
  content << in.rdbuf();
  return content.str();
}

std::vector<int32_t> leading_tokens(const Tokenizer& tokenizer, const std::string& text,
                                    int64_t needed) {
  size_t chars = static_cast<size_t>(needed) * 8 + 4096;
  while (true) {
    const bool whole = chars >= text.size();
    size_t cut = whole ? text.size() : text.rfind('\n', chars);
    if (cut == std::string::npos || cut == 0) cut = std::min(chars, text.size());
    std::vector<int32_t> tokens = tokenizer.encode(std::string_view(text).substr(0, cut), false);
    if (static_cast<int64_t>(tokens.size()) >= needed || whole) return tokens;
    chars *= 2;
  }
}

}  // namespace visikv

#include "visikv/eval/data_paths.h"

#include <cstdlib>

namespace visikv {

std::filesystem::path data_dir() {
  if (const char* env = std::getenv("VISIKV_DATA_DIR"); env != nullptr && *env != '\0') return env;
  return std::filesystem::path(VISIKV_SOURCE_DIR).parent_path() / "shared" / "data";
}

std::filesystem::path default_test_text() { return data_dir() / "wikitext-103-test.txt"; }
std::filesystem::path default_calibration_text() {
  return data_dir() / "wikitext-2-valid-tokenized.txt";
}

}  // namespace visikv

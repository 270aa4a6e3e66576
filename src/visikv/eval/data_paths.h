// Where the evaluation and calibration texts are found by default: $VISIKV_DATA_DIR, else the
// shared data folder beside the project root (../shared/data). Any user path overrides these.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "visikv/tokenizer/tokenizer.h"

namespace visikv {

std::filesystem::path data_dir();
std::filesystem::path default_test_text();         // WikiText-103 test
std::filesystem::path default_calibration_text();  // WikiText-2 validation
// The whole file; throws naming the path when it cannot be read.
std::string read_text_file(const std::filesystem::path& path);

// The first tokens of `text`, at least `needed` of them when the text has that many: tokenizes a
// growing leading piece cut at a line end (so no word is split) rather than the whole file.
std::vector<int32_t> leading_tokens(const Tokenizer& tokenizer, const std::string& text,
                                    int64_t needed);

}  // namespace visikv

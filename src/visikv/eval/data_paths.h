// Where the evaluation and calibration texts are found by default: $VISIKV_DATA_DIR, else the
// shared data folder beside the project root (../shared/data). Any user path overrides these.
#pragma once

#include <filesystem>

namespace visikv {

std::filesystem::path data_dir();
std::filesystem::path default_test_text();         // WikiText-103 test
std::filesystem::path default_calibration_text();  // WikiText-2 validation

}  // namespace visikv

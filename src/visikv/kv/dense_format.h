// How a dense cache row stores its numbers: float32, float16 or bfloat16. Kept apart from the
// caches so codec specs and element traits can name a format without pulling in a cache.
#pragma once

#include <string>

namespace visikv {

enum class DenseFormat { F32, F16, BF16 };

DenseFormat dense_format_from_name(const std::string& name);  // "f32", "f16", "bf16"

// "f32", "f16", "bf16"
const char* dense_format_name(DenseFormat format);

}  // namespace visikv

// Keys and values stored densely as float32, float16 or bfloat16.
#pragma once

#include <memory>
#include <string>

#include "visikv/kv/cache.h"

namespace visikv {

enum class DenseFormat { F32, F16, BF16 };

DenseFormat dense_format_from_name(const std::string& name);  // "f32", "f16", "bf16"

// `reserve_tokens` pre-sizes the storage (it still grows past it); summaries cover blocks of
// `block_size` positions.
std::unique_ptr<KVCache> make_dense_cache(const CacheShape& shape, DenseFormat format,
                                          int64_t reserve_tokens = 0, int64_t block_size = 32);

}  // namespace visikv

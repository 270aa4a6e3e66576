// Keys and values stored densely as float32, float16 or bfloat16: a CodecCache (kv/codec_cache.h)
// whose two sides are the same dense rows (the one dense store, kv/vector_store.h).
#pragma once

#include <cstdint>
#include <memory>

#include "visikv/kv/cache.h"
#include "visikv/kv/dense_format.h"

namespace visikv {

// `reserve_tokens` pre-sizes the storage (it still grows past it); summaries cover blocks of
// `block_size` positions. describe() gives "dense f32" (f16, bf16).
std::unique_ptr<KVCache> make_dense_cache(const CacheShape& shape, DenseFormat format,
                                          int64_t reserve_tokens = 0, int64_t block_size = 32);

}  // namespace visikv

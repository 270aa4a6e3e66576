// Builds a KV cache from one codec spec for the keys and one for the values (grammar in
// kv/codec_spec.h and docs/CACHE_SPECS.md), e.g. make_cache(shape, "int2:g32:chan:r128", "f16").
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "visikv/kv/cache.h"
#include "visikv/kv/codec_spec.h"

namespace visikv {

struct HeadqBasisVectors;

// The same dense format on both sides without rotation gives the dense cache
// (make_dense_cache); anything else gives a CodecCache (kv/codec_cache.h). Throws visikv::Error
// for a bad spec or a spec that does not fit shape.head_dim.
//
// `headq_basis`: the calibrated bases (kv/headq.h, from a basis file: calibration/basis_file.h)
// that a HeadQ key codec (`...+headq:r<r>:s<b>`) reads; null when the spec needs none (the
// `:random` control needs none). The cache copies the rows it uses.
std::unique_ptr<KVCache> make_cache(const CacheShape& shape, const std::string& key_spec,
                                    const std::string& value_spec, int64_t reserve_tokens = 0,
                                    int64_t block_size = 32,
                                    const HeadqBasisVectors* headq_basis = nullptr);

// The same from specs already parsed for their side (kv/codec_spec.h).
std::unique_ptr<KVCache> make_cache(const CacheShape& shape, const KeyCodecSpec& keys,
                                    const ValueCodecSpec& values, int64_t reserve_tokens = 0,
                                    int64_t block_size = 32,
                                    const HeadqBasisVectors* headq_basis = nullptr);

}  // namespace visikv

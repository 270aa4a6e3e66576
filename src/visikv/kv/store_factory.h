// Builds the store of one side of one (layer, KV head) from its codec spec: the only place that
// knows every store type (kv/vector_store.h), so the stores need not know each other.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "visikv/kv/codec_spec.h"
#include "visikv/kv/vector_store.h"

namespace visikv {

// Dense or integer rows; with a HeadQ side code (`spec.headq`) the rows are wrapped in the side
// code's store (kv/headq.h) with `headq_rows` ({r, head_dim}, in the coordinates the store sees)
// as its basis. Throws visikv::Error for a value policy spec or one that does not fit head_dim.
std::unique_ptr<KeyStore> make_key_store(const CodecSpec& spec, int64_t head_dim,
                                         int64_t reserve_tokens,
                                         std::vector<float> headq_rows = {});

// Dense or integer rows, or a value bit policy (kv/value_policy.h). Throws visikv::Error for a
// spec with a HeadQ side code or one that does not fit head_dim.
std::unique_ptr<ValueStore> make_value_store(const CodecSpec& spec, int64_t head_dim,
                                             int64_t reserve_tokens);

}  // namespace visikv

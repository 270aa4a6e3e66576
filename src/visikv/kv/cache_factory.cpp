#include "visikv/kv/cache_factory.h"

#include "visikv/kv/codec_cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/dense_cache.h"

namespace visikv {

std::unique_ptr<KVCache> make_dense_cache(const CacheShape& shape, DenseFormat format,
                                          int64_t reserve_tokens, int64_t block_size) {
  CodecSpec dense;
  dense.kind = CodecSpec::Kind::Dense;
  dense.dense = format;
  return std::make_unique<CodecCache>(shape, dense, dense, reserve_tokens, block_size);
}

std::unique_ptr<KVCache> make_cache(const CacheShape& shape, const std::string& key_spec,
                                    const std::string& value_spec, int64_t reserve_tokens,
                                    int64_t block_size, const HeadqBasisVectors* headq_basis) {
  return make_cache(shape, parse_key_codec_spec(key_spec), parse_value_codec_spec(value_spec),
                    reserve_tokens, block_size, headq_basis);
}

std::unique_ptr<KVCache> make_cache(const CacheShape& shape, const KeyCodecSpec& key_spec,
                                    const ValueCodecSpec& value_spec, int64_t reserve_tokens,
                                    int64_t block_size, const HeadqBasisVectors* headq_basis) {
  return std::make_unique<CodecCache>(shape, key_spec.codec, value_spec.codec, reserve_tokens,
                                      block_size, headq_basis);
}

}  // namespace visikv

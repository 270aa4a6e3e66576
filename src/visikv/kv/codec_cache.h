// A KV cache composed of a key store and a value store per (layer, KV head), each in its own
// codec (kv/codec_spec.h), plus block summaries of the stored keys. Build one with make_cache
// (kv/cache_factory.h); this header is for code that wants more than the KVCache interface:
// the specs, the bit accounting, and the stored keys and values as the model sees them.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "visikv/kv/block_summaries.h"
#include "visikv/kv/cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/hadamard.h"
#include "visikv/kv/vector_store.h"

namespace visikv {

struct HeadqBasisVectors;

class CodecCache final : public KVCache {
 public:
  // `headq_basis`: the calibrated bases a HeadQ key codec reads (kv/headq.h); the rows it needs
  // are copied, so the basis need not outlive the cache. May be null when no spec needs one.
  CodecCache(const CacheShape& shape, const CodecSpec& key_spec, const CodecSpec& value_spec,
             int64_t reserve_tokens, int64_t block_size,
             const HeadqBasisVectors* headq_basis = nullptr);

  const CacheShape& shape() const override { return shape_; }
  // "keys int2:g64:tok (2.5 bits/elt), values f16 (16 bits/elt)"; "dense f16" when both sides
  // are the same dense rows without rotation (make_dense_cache).
  std::string describe() const override;
  int64_t length(int64_t layer) const override;
  void append(int64_t layer, std::span<const float> keys, std::span<const float> values,
              int64_t tokens) override;
  void score(int64_t layer, int64_t kv_head, std::span<const float> queries,
             const PositionSet& positions, std::span<float> scores) const override;
  void accumulate(int64_t layer, int64_t kv_head, std::span<const float> weights,
                  const PositionSet& positions, std::span<float> out) const override;
  int64_t block_size() const override { return block_size_; }
  BlockSummaryTable summaries(int64_t layer, int64_t kv_head) const override;
  void set_summary_frames(std::span<const double> rows, int64_t rank) override;
  void set_position_sketches(int bits) override;
  void clear() override;
  // True when the value codec is a value bit policy; the weights go to the head's value store.
  bool records_attention() const override;
  void record_attention(int64_t layer, int64_t kv_head, std::span<const float> weights,
                        const PositionSet& positions) override;

  // The tightest rule among the key and value stores of the layer's heads.
  int64_t decode_equivalent_chunk(int64_t layer) const override;

  const CodecSpec& key_spec() const { return keys_.spec; }
  const CodecSpec& value_spec() const { return values_.spec; }
  CodecBits key_bits() const { return codec_bits(keys_.spec, shape_.head_dim); }
  CodecBits value_bits() const { return codec_bits(values_.spec, shape_.head_dim); }

  // The key (value) at `position` as scores (value sums) see it, in the model's coordinates
  // (rotation undone): for storage-error metrics.
  void stored_key(int64_t layer, int64_t kv_head, int64_t position, std::span<float> out) const;
  void stored_value(int64_t layer, int64_t kv_head, int64_t position, std::span<float> out) const;

  // The value store of one head (e.g. a ValuePolicyStore, kv/value_policy.h), for inspection.
  const ValueStore& value_store(int64_t layer, int64_t kv_head) const;

  // Bytes held by the key and value stores of every head (summaries not counted).
  int64_t stored_bytes() const;

 private:
  // One role (keys or values) of every head: its codec, rotation and stores.
  template <typename Store>
  struct Side {
    CodecSpec spec;
    std::optional<HadamardRotation> rotation;
    std::vector<std::unique_ptr<Store>> stores;  // [layer * kv_heads + kv_head]
  };
  using KeySide = Side<KeyStore>;
  using ValueSide = Side<ValueStore>;
  KeySide make_key_side(const CodecSpec& spec, int64_t reserve_tokens,
                        const HeadqBasisVectors* headq_basis) const;
  ValueSide make_value_side(const CodecSpec& spec, int64_t reserve_tokens) const;
  int64_t head_index(int64_t layer, int64_t kv_head) const;
  void check_positions(int64_t layer, const PositionSet& positions) const;
  template <typename Store>
  void stored_vector(const Side<Store>& side, int64_t layer, int64_t kv_head, int64_t position,
                     std::span<float> out) const;
  void summarize_stored_keys(int64_t layer, int64_t kv_head);

  CacheShape shape_;
  int64_t block_size_;
  KeySide keys_;
  ValueSide values_;
  // Per head: summaries of the stored keys (model coordinates), and how many of its keys they
  // hold and had in quantized form when last updated.
  std::vector<BlockSummaries> summaries_;
  std::vector<int64_t> summarized_, summarized_quantized_;
  std::vector<int64_t> lengths_;
};

}  // namespace visikv

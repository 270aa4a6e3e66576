// One side (keys or values) of one (layer, KV head) of a cache: a growing list of d-dimensional
// vectors held in one codec (dense or integer-quantized), read back only as dot products with
// queries and as weighted sums. A store never expands itself into a dense float copy: it
// decodes one vector at a time into a d-float scratch that lives for the call.
//
// Stores know nothing of rotations: a cache that applies the Hadamard rotation hands the store
// rotated vectors and rotated queries.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "visikv/kv/cache.h"
#include "visikv/kv/codec_spec.h"

namespace visikv {

class VectorStore {
 public:
  virtual ~VectorStore() = default;

  virtual int64_t dim() const = 0;
  virtual int64_t size() const = 0;  // vectors appended
  // Vectors [0, quantized_size()) are held in quantized form; the rest are exact or in an fp16
  // window (dense stores: 0). A HeadQ side code is computed when a key becomes quantized.
  virtual int64_t quantized_size() const { return 0; }
  virtual void append(std::span<const float> vector) = 0;

  // scores[q * n + i] = queries[q] · x̂[positions[i]], n = positions.size(). Positions must be
  // < size() (the cache checks them).
  virtual void dot(std::span<const float> queries, const PositionSet& positions,
                   std::span<float> scores) const = 0;
  // out[q * d + c] += Σ_i weights[q * n + i] · x̂[positions[i]][c], for out.size() / d queries.
  virtual void accumulate(std::span<const float> weights, const PositionSet& positions,
                          std::span<float> out) const = 0;
  // out = x̂[position], the vector as stored (for metrics and tests).
  virtual void reconstruct(int64_t position, std::span<float> out) const = 0;

  virtual int64_t stored_bytes() const = 0;  // codes, scales and zeros, fp16 window
  virtual void clear() = 0;

  // Stores whose form depends on the attention they serve (kv/value_policy.h) take the softmax
  // weights of each query head here (KVCache::record_attention); others ignore them.
  virtual bool records_attention() const { return false; }
  virtual void record_attention(std::span<const float> /*weights*/,
                                const PositionSet& /*positions*/) {}

  // How many vectors may be appended next such that appends after the first change the stored
  // form of no vector already held or appended before them (the rule behind
  // KVCache::decode_equivalent_chunk): at least 1; kUnlimitedChunk when stored forms never
  // change after their append. Conservative default: 1.
  static constexpr int64_t kUnlimitedChunk = INT64_MAX;
  virtual int64_t decode_equivalent_appends() const { return 1; }
};

// Throws visikv::Error when the spec does not fit `head_dim` (see check_codec_fits). A value
// policy spec gives a ValuePolicyStore (kv/value_policy.h). The
// spec's `hadamard` flag and HeadQ side code are ignored here (kv/headq.h adds the side code).
std::unique_ptr<VectorStore> make_vector_store(const CodecSpec& spec, int64_t head_dim,
                                               int64_t reserve_tokens = 0);

}  // namespace visikv

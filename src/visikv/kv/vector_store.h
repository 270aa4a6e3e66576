// One side (keys or values) of one (layer, KV head) of a cache: a growing list of d-dimensional
// vectors held in one codec (dense or integer-quantized). A store never expands itself into a
// dense float copy: it decodes one vector at a time into a d-float scratch that lives for the
// call.
//
// Keys and values are read differently, so they are two roles: a KeyStore is read as dot
// products with queries (scores, and through reconstruct the block summaries), a ValueStore as
// weighted sums. A dense or plain integer store serves both (RowStore); a HeadQ store is a key
// store only (kv/headq.h) and a value bit policy a value store only (kv/value_policy.h).
//
// Stores know nothing of rotations: a cache that applies the Hadamard rotation hands the store
// rotated vectors and rotated queries.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "visikv/kv/cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/dense_format.h"

namespace visikv {

// What every store does, whichever role it plays.
class VectorStore {
 public:
  virtual ~VectorStore() = default;

  virtual int64_t dim() const = 0;
  virtual int64_t size() const = 0;  // vectors appended
  // Vectors [0, quantized_size()) are held in quantized form; the rest are exact or in an fp16
  // window (dense stores: 0). A HeadQ side code is computed when a key becomes quantized.
  virtual int64_t quantized_size() const { return 0; }
  virtual void append(std::span<const float> vector) = 0;

  // out = x̂[position], the vector as stored (for summaries, metrics and tests).
  virtual void reconstruct(int64_t position, std::span<float> out) const = 0;

  virtual int64_t stored_bytes() const = 0;  // codes, scales and zeros, fp16 window
  virtual void clear() = 0;

  // How many vectors may be appended next such that appends after the first change the stored
  // form of no vector already held or appended before them (the rule behind
  // KVCache::decode_equivalent_chunk): at least 1; kUnlimitedChunk when stored forms never
  // change after their append. Conservative default: 1.
  static constexpr int64_t kUnlimitedChunk = INT64_MAX;
  virtual int64_t decode_equivalent_appends() const { return 1; }
};

class KeyStore : public virtual VectorStore {
 public:
  // scores[q * n + i] = queries[q] · x̂[positions[i]], n = positions.size(). Positions must be
  // < size() (the cache checks them).
  virtual void dot(std::span<const float> queries, const PositionSet& positions,
                   std::span<float> scores) const = 0;
};

class ValueStore : public virtual VectorStore {
 public:
  // out[q * d + c] += Σ_i weights[q * n + i] · x̂[positions[i]][c], for out.size() / d queries.
  virtual void accumulate(std::span<const float> weights, const PositionSet& positions,
                          std::span<float> out) const = 0;

  // Stores whose form depends on the attention they serve (kv/value_policy.h) take the softmax
  // weights of each query head here (KVCache::record_attention); others ignore them.
  virtual bool records_attention() const { return false; }
  virtual void record_attention(std::span<const float> /*weights*/,
                                const PositionSet& /*positions*/) {}
};

// A store of plain rows (dense, or integer codes without side data): either role.
class RowStore : public KeyStore, public ValueStore {};

// Rows of `format` floats; `reserve_tokens` pre-sizes the storage.
std::unique_ptr<RowStore> make_dense_store(DenseFormat format, int64_t head_dim,
                                           int64_t reserve_tokens = 0);

// Rows of integer codes for a plain integer spec (no value policy; the spec's `hadamard` flag
// and HeadQ side code are not this store's business). Throws visikv::Error when the spec does
// not fit `head_dim` (check_codec_fits).
std::unique_ptr<RowStore> make_int_store(const CodecSpec& spec, int64_t head_dim,
                                         int64_t reserve_tokens = 0);

}  // namespace visikv

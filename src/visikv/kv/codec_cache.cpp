#include "visikv/kv/codec_cache.h"

#include <algorithm>

#include "visikv/core/error.h"
#include "visikv/kv/headq.h"
#include "visikv/kv/qbasis.h"
#include "visikv/kv/store_factory.h"

namespace visikv {

CodecCache::CodecCache(const CacheShape& shape, const CodecSpec& key_spec,
                       const CodecSpec& value_spec, int64_t reserve_tokens, int64_t block_size,
                       const HeadqBasisVectors* headq_basis)
    : shape_(shape), block_size_(block_size) {
  require(shape.layers > 0 && shape.kv_heads > 0 && shape.head_dim > 0,
          "cache shape must be positive");
  require(block_size > 0, "block size must be positive, got ", block_size);
  require(!value_spec.headq, "value codec '", value_spec.text(),
          "': the HeadQ side code is for keys only");
  require(!value_spec.is_qbasis(), "value codec '", value_spec.text(),
          "': query-basis quantization is for keys only");
  require(!key_spec.policy, "key codec '", key_spec.text(),
          "': value bit policies are for values only");
  require(!value_spec.policy || !value_spec.hadamard, "value codec '", value_spec.text(),
          "': a value policy takes no rotation");
  keys_ = make_key_side(key_spec, reserve_tokens, headq_basis);
  values_ = make_value_side(value_spec, reserve_tokens);
  summaries_.reserve(shape.layers * shape.kv_heads);
  for (int64_t i = 0; i < shape.layers * shape.kv_heads; ++i)
    summaries_.emplace_back(shape.head_dim, block_size);
  lengths_.assign(shape.layers, 0);
  summarized_.assign(static_cast<size_t>(shape.layers * shape.kv_heads), 0);
  summarized_quantized_.assign(static_cast<size_t>(shape.layers * shape.kv_heads), 0);
}

CodecCache::KeySide CodecCache::make_key_side(const CodecSpec& spec, int64_t reserve_tokens,
                                              const HeadqBasisVectors* headq_basis) const {
  KeySide side;
  side.spec = spec;
  const int64_t d = shape_.head_dim;
  if (spec.hadamard) side.rotation.emplace(d);
  for (int64_t i = 0; i < shape_.layers * shape_.kv_heads; ++i) {
    if (spec.is_qbasis()) {
      const int64_t layer = i / shape_.kv_heads, kv_head = i % shape_.kv_heads;
      side.stores.push_back(make_qbasis_key_store(
          spec, qbasis_head(spec, headq_basis, shape_.layers, shape_.kv_heads, d, layer, kv_head),
          reserve_tokens));
      continue;
    }
    std::vector<float> rows;
    if (spec.headq) {
      const int64_t layer = i / shape_.kv_heads, kv_head = i % shape_.kv_heads;
      rows = headq_basis_rows(spec, headq_basis, shape_.layers, shape_.kv_heads, d, layer, kv_head);
      // The store sees rotated keys, so it needs the rotated basis: (H U)ᵀ (H q) = Uᵀ q.
      if (side.rotation)
        for (int64_t j = 0; j < spec.headq->rank; ++j)
          side.rotation->rotate(std::span(rows).subspan(j * d, d));
    }
    side.stores.push_back(make_key_store(spec, d, reserve_tokens, std::move(rows)));
  }
  return side;
}

CodecCache::ValueSide CodecCache::make_value_side(const CodecSpec& spec,
                                                  int64_t reserve_tokens) const {
  ValueSide side;
  side.spec = spec;
  if (spec.hadamard) side.rotation.emplace(shape_.head_dim);
  for (int64_t i = 0; i < shape_.layers * shape_.kv_heads; ++i)
    side.stores.push_back(make_value_store(spec, shape_.head_dim, reserve_tokens));
  return side;
}

std::string CodecCache::describe() const {
  // The same dense rows on both sides without a rotation is what make_dense_cache builds.
  if (keys_.spec.is_dense() && values_.spec.is_dense() && keys_.spec.dense == values_.spec.dense &&
      !keys_.rotation && !values_.rotation)
    return str_cat("dense ", dense_format_name(keys_.spec.dense));
  return str_cat("keys ", describe_codec(keys_.spec, shape_.head_dim), ", values ",
                 describe_codec(values_.spec, shape_.head_dim));
}

int64_t CodecCache::length(int64_t layer) const {
  require(layer >= 0 && layer < shape_.layers, "cache layer ", layer, " out of range");
  return lengths_[layer];
}

void CodecCache::append(int64_t layer, std::span<const float> keys, std::span<const float> values,
                        int64_t tokens) {
  const int64_t d = shape_.head_dim, row = shape_.kv_heads * d;
  require(layer >= 0 && layer < shape_.layers, "cache layer ", layer, " out of range");
  require(tokens >= 0 && static_cast<int64_t>(keys.size()) == tokens * row &&
              static_cast<int64_t>(values.size()) == tokens * row,
          "cache append: expected ", tokens, " x ", row, " keys and values");
  require(tokens <= 1 || !records_attention(), "value codec '", values_.spec.text(),
          "' ranks tokens by the attention they receive, so the cache must be filled in decode "
          "order, one token per append (got ",
          tokens, "; use decode mode)");
  std::vector<float> rotated(static_cast<size_t>(d));
  const auto store = [&](const std::optional<HadamardRotation>& rotation, VectorStore& target,
                         const float* x) {
    if (!rotation) {
      target.append({x, static_cast<size_t>(d)});
      return;
    }
    std::copy(x, x + d, rotated.begin());
    rotation->rotate(rotated);
    target.append(rotated);
  };
  for (int64_t h = 0; h < shape_.kv_heads; ++h) {
    const int64_t index = head_index(layer, h);
    for (int64_t t = 0; t < tokens; ++t) {
      store(keys_.rotation, *keys_.stores[index], keys.data() + t * row + h * d);
      store(values_.rotation, *values_.stores[index], values.data() + t * row + h * d);
    }
  }
  lengths_[layer] += tokens;
  for (int64_t h = 0; h < shape_.kv_heads; ++h) summarize_stored_keys(layer, h);
}

// The certified bound must hold for the scores the attention computes, which read the stored
// keys: so the summaries are of the stored keys (reconstructed, rotation undone). A key in a
// codec's fp16 window is stored one way and later quantized; when keys change form, the blocks
// holding them are rebuilt from their new stored form (a chan codec quantizes a group of tokens
// at a time, so this touches a few blocks per group).
void CodecCache::summarize_stored_keys(int64_t layer, int64_t kv_head) {
  const int64_t index = head_index(layer, kv_head), d = shape_.head_dim;
  const KeyStore& keys = *keys_.stores[index];
  BlockSummaries& summaries = summaries_[index];
  std::vector<float> key(static_cast<size_t>(d));
  for (; summarized_[index] < keys.size(); ++summarized_[index]) {
    stored_vector(keys_, layer, kv_head, summarized_[index], key);
    summaries.add(key);
  }
  const int64_t quantized = keys.quantized_size();
  if (quantized > summarized_quantized_[index]) {
    const int64_t block = block_size_, length = keys.size();
    std::vector<float> rows;
    for (int64_t b = summarized_quantized_[index] / block; b * block < quantized; ++b) {
      const int64_t end = std::min(length, (b + 1) * block);
      rows.resize(static_cast<size_t>((end - b * block) * d));
      for (int64_t j = b * block; j < end; ++j)
        stored_vector(keys_, layer, kv_head, j,
                      std::span(rows).subspan(static_cast<size_t>((j - b * block) * d), d));
      summaries.rebuild(b, rows);
    }
  }
  summarized_quantized_[index] = quantized;
}

void CodecCache::score(int64_t layer, int64_t kv_head, std::span<const float> queries,
                       const PositionSet& positions, std::span<float> scores) const {
  const int64_t index = head_index(layer, kv_head);
  check_positions(layer, positions);
  const int64_t d = shape_.head_dim, count = static_cast<int64_t>(queries.size()) / d;
  require(static_cast<int64_t>(scores.size()) >= count * positions.size(),
          "cache score: ", scores.size(), " scores for ", count, " queries x ", positions.size(),
          " positions");
  if (!keys_.rotation) {
    keys_.stores[index]->dot(queries, positions, scores);
    return;
  }
  // q·k = (Hq)·(Hk): rotate the queries once per call.
  std::vector<float> rotated(queries.begin(), queries.begin() + count * d);
  for (int64_t q = 0; q < count; ++q) keys_.rotation->rotate(std::span(rotated).subspan(q * d, d));
  keys_.stores[index]->dot(rotated, positions, scores);
}

void CodecCache::accumulate(int64_t layer, int64_t kv_head, std::span<const float> weights,
                            const PositionSet& positions, std::span<float> out) const {
  const int64_t index = head_index(layer, kv_head);
  check_positions(layer, positions);
  const int64_t d = shape_.head_dim, count = static_cast<int64_t>(out.size()) / d;
  require(static_cast<int64_t>(weights.size()) >= count * positions.size(),
          "cache accumulate: ", weights.size(), " weights for ", count, " queries x ",
          positions.size(), " positions");
  if (!values_.rotation) {
    values_.stores[index]->accumulate(weights, positions, out);
    return;
  }
  // Σ w v = Hᵀ Σ w (Hv): sum in the rotated coordinates, rotate the sum back once.
  std::vector<float> rotated(static_cast<size_t>(count * d), 0.0f);
  values_.stores[index]->accumulate(weights, positions, rotated);
  for (int64_t q = 0; q < count; ++q) {
    const std::span<float> sum = std::span(rotated).subspan(q * d, d);
    values_.rotation->unrotate(sum);
    for (int64_t c = 0; c < d; ++c) out[q * d + c] += sum[c];
  }
}

BlockSummaryTable CodecCache::summaries(int64_t layer, int64_t kv_head) const {
  return summaries_[head_index(layer, kv_head)].table();
}

void CodecCache::set_summary_frames(std::span<const double> rows, int64_t rank) {
  const int64_t heads = shape_.layers * shape_.kv_heads, d = shape_.head_dim;
  require(rank >= 1 && rank <= d, "summary frames: rank ", rank, " must be in [1, ", d, "]");
  require(static_cast<int64_t>(rows.size()) == heads * rank * d, "summary frames: ", rows.size(),
          " numbers for ", heads, " heads x rank ", rank, " x head_dim ", d);
  for (int64_t layer = 0; layer < shape_.layers; ++layer)
    require(lengths_[layer] == 0, "summary frames: set them before the first token (layer ", layer,
            " holds ", lengths_[layer], ")");
  for (int64_t i = 0; i < heads; ++i)
    summaries_[i].set_frame(
        rows.subspan(static_cast<size_t>(i * rank * d), static_cast<size_t>(rank * d)), rank);
}

void CodecCache::set_position_sketches(int bits) {
  for (int64_t layer = 0; layer < shape_.layers; ++layer)
    require(lengths_[layer] == 0, "position sketches: set them before the first token (layer ",
            layer, " holds ", lengths_[layer], ")");
  for (BlockSummaries& s : summaries_) s.set_sketch(bits);
}

void CodecCache::clear() {
  for (auto& store : keys_.stores) store->clear();
  for (auto& store : values_.stores) store->clear();
  for (BlockSummaries& s : summaries_) s.clear();
  std::fill(summarized_.begin(), summarized_.end(), 0);
  std::fill(summarized_quantized_.begin(), summarized_quantized_.end(), 0);
  std::fill(lengths_.begin(), lengths_.end(), 0);
}

bool CodecCache::records_attention() const { return values_.spec.policy.has_value(); }

void CodecCache::record_attention(int64_t layer, int64_t kv_head, std::span<const float> weights,
                                  const PositionSet& positions) {
  const int64_t index = head_index(layer, kv_head);
  if (!records_attention()) return;
  check_positions(layer, positions);
  require(static_cast<int64_t>(weights.size()) == positions.size(),
          "record_attention: ", weights.size(), " weights for ", positions.size(), " positions");
  values_.stores[index]->record_attention(weights, positions);
}

const ValueStore& CodecCache::value_store(int64_t layer, int64_t kv_head) const {
  return *values_.stores[head_index(layer, kv_head)];
}

int64_t CodecCache::decode_equivalent_chunk(int64_t layer) const {
  int64_t chunk = VectorStore::kUnlimitedChunk;
  for (int64_t h = 0; h < shape_.kv_heads; ++h) {
    const int64_t index = head_index(layer, h);
    chunk = std::min({chunk, keys_.stores[index]->decode_equivalent_appends(),
                      values_.stores[index]->decode_equivalent_appends()});
  }
  return std::max<int64_t>(chunk, 1);
}

void CodecCache::stored_key(int64_t layer, int64_t kv_head, int64_t position,
                            std::span<float> out) const {
  stored_vector(keys_, layer, kv_head, position, out);
}

void CodecCache::stored_value(int64_t layer, int64_t kv_head, int64_t position,
                              std::span<float> out) const {
  stored_vector(values_, layer, kv_head, position, out);
}

int64_t CodecCache::stored_bytes() const {
  int64_t bytes = 0;
  for (const auto& store : keys_.stores) bytes += store->stored_bytes();
  for (const auto& store : values_.stores) bytes += store->stored_bytes();
  return bytes;
}

int64_t CodecCache::head_index(int64_t layer, int64_t kv_head) const {
  require(layer >= 0 && layer < shape_.layers && kv_head >= 0 && kv_head < shape_.kv_heads,
          "cache head (", layer, ", ", kv_head, ") out of range");
  return layer * shape_.kv_heads + kv_head;
}

void CodecCache::check_positions(int64_t layer, const PositionSet& positions) const {
  if (positions.size() == 0) return;
  const int64_t first = positions.is_range() ? positions.begin() : positions[0];
  const int64_t last = positions.is_range() ? positions.end() - 1 : positions[positions.size() - 1];
  require(first >= 0 && last < lengths_[layer], "positions [", first, ", ", last, "] outside the ",
          lengths_[layer], " cached tokens of layer ", layer);
}

template <typename Store>
void CodecCache::stored_vector(const Side<Store>& side, int64_t layer, int64_t kv_head,
                               int64_t position, std::span<float> out) const {
  const int64_t index = head_index(layer, kv_head), d = shape_.head_dim;
  require(position >= 0 && position < lengths_[layer], "position ", position, " outside the ",
          lengths_[layer], " cached tokens of layer ", layer);
  require(static_cast<int64_t>(out.size()) == d, "stored vector needs ", d, " floats, got ",
          out.size());
  side.stores[index]->reconstruct(position, out);
  if (side.rotation) side.rotation->unrotate(out);
}

}  // namespace visikv

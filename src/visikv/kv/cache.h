// The interface every attention path reads keys and values through.
//
// Per layer and per KV head a cache stores keys and values in some form (dense floats now;
// quantized codes, side codes and sparse selectors later). Attention never asks for "the keys":
// it asks the cache to score queries against a set of positions, to accumulate values with given
// weights over a set of positions, and for per-block summaries that sparse selectors use. A set
// of positions is a small description (a range or a sorted index list), never a mask.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace visikv {

// A half-open range [begin, end) or an explicit list of positions.
class PositionSet {
 public:
  static PositionSet range(int64_t begin, int64_t end) { return PositionSet(begin, end, {}); }
  static PositionSet list(std::span<const int32_t> positions) {
    return PositionSet(0, 0, positions);
  }

  bool is_range() const { return indices_.empty(); }
  int64_t size() const {
    return is_range() ? end_ - begin_ : static_cast<int64_t>(indices_.size());
  }
  int64_t operator[](int64_t i) const { return is_range() ? begin_ + i : indices_[i]; }
  int64_t begin() const { return begin_; }
  int64_t end() const { return end_; }
  std::span<const int32_t> indices() const { return indices_; }
  // Entries [first, first + count) as a set of their own.
  PositionSet slice(int64_t first, int64_t count) const {
    return is_range()
               ? range(begin_ + first, begin_ + first + count)
               : list(indices_.subspan(static_cast<size_t>(first), static_cast<size_t>(count)));
  }

 private:
  PositionSet(int64_t begin, int64_t end, std::span<const int32_t> indices)
      : begin_(begin), end_(end < begin ? begin : end), indices_(indices) {}
  int64_t begin_, end_;
  std::span<const int32_t> indices_;
};

// What a block of `block_size` consecutive positions looks like, for selectors: the mean key, the
// per-channel minimum and maximum, and the largest Euclidean norm over the keys stored so far in
// the block. Summaries describe the keys in the form scores read them (the stored form: rounded
// to f16/bf16, quantized, HeadQ-corrected), in the model's coordinates.
struct BlockSummary {
  std::span<const float> centroid;
  std::span<const float> min;
  std::span<const float> max;
  float norm = 0;
  int64_t count = 0;
};

// Every block summary of one (layer, KV head) as contiguous arrays, so a selector scans all
// blocks in one pass: centroids, mins and maxs are {blocks, head_dim}; norms and counts {blocks}.
//
// With a summary frame (KVCache::set_summary_frames: `frame_rank` orthonormal rows u_i, e.g. the
// head's top query directions) each block also holds the box of its keys' coordinates in the
// frame, p_i = u_i·k: frame_mins / frame_maxs ({blocks, frame_rank}, rounded outward), and the
// largest norm of the part of a key outside the frame, ||k - sum_i p_i u_i|| (residual_norms,
// {blocks}, rounded up). Bounds on q·k then spend their slack only where queries look.
// Position sketch codes are kept in tiles of kSketchTile positions, each channel pair's codes of
// the tile's positions side by side: code c of position j at
//   (j / kSketchTile) · kSketchTile · head_dim + (c / 2) · 2 · kSketchTile + (j % kSketchTile) · 2
//   + c % 2
// (head_dim even). One load then holds a channel pair of 16 positions, and a 16-bit pair product
// (vpmaddwd) adds both channels into each position's own 32-bit lane: scores of 16 positions at
// once with no sums across lanes.
constexpr int64_t kSketchTile = 16;
inline int64_t sketch_code_index(int64_t position, int64_t channel, int64_t head_dim) {
  return position / kSketchTile * kSketchTile * head_dim + channel / 2 * 2 * kSketchTile +
         position % kSketchTile * 2 + channel % 2;
}

struct BlockSummaryTable {
  int64_t blocks = 0, head_dim = 0;
  std::span<const float> centroids, mins, maxs, norms;
  std::span<const int64_t> counts;
  int64_t frame_rank = 0;         // 0: no frame
  std::span<const double> frame;  // {frame_rank, head_dim}
  std::span<const float> frame_mins, frame_maxs, residual_norms;
  // With position sketches (KVCache::set_position_sketches), every stored key k_j also as a few
  // bits per number, taken of its rotation y_j = H k_j (sketch_rotation in block_summaries.h):
  // ỹ_j = offset_j + step_j * code_j (codes in [-L, L], L = 2^(bits-1) - 1, in sketch_codes
  // at sketch_code_index(j, c, head_dim)), and sketch_errors[j] >= ||y_j - ỹ_j||_2 (rounded up),
  // so q·k_j = (Hq)·y_j lies within ||q|| sketch_errors[j] of (Hq)·ỹ_j: bounds per position at a
  // few bits' reading cost. Empty without sketches.
  int64_t sketch_levels = 0;             // L; 0: no sketches
  std::span<const int8_t> sketch_codes;  // whole tiles of kSketchTile positions
  std::span<const float> sketch_offsets, sketch_steps, sketch_errors;

  BlockSummary block(int64_t b) const;  // throws visikv::Error when b is out of range
};

struct CacheShape {
  int64_t layers = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
};

class KVCache {
 public:
  virtual ~KVCache() = default;

  virtual const CacheShape& shape() const = 0;
  virtual std::string describe() const = 0;  // e.g. "dense f16"
  // Tokens stored in `layer`.
  virtual int64_t length(int64_t layer) const = 0;

  // Appends `tokens` tokens to `layer`; keys and values are {tokens, kv_heads, head_dim}.
  virtual void append(int64_t layer, std::span<const float> keys, std::span<const float> values,
                      int64_t tokens) = 0;

  // scores[q * positions.size() + i] = queries[q] · key[positions[i]] (unscaled), for the
  // `queries.size() / head_dim` queries of one KV head. Scores come from the stored form.
  virtual void score(int64_t layer, int64_t kv_head, std::span<const float> queries,
                     const PositionSet& positions, std::span<float> scores) const = 0;

  // out[q * head_dim + c] += sum_i weights[q * positions.size() + i] * value[positions[i]][c].
  virtual void accumulate(int64_t layer, int64_t kv_head, std::span<const float> weights,
                          const PositionSet& positions, std::span<float> out) const = 0;

  // Positions per summary block, and the summaries of every block of a head (block b holds
  // positions [b * block_size, ...)); updated as tokens are appended.
  virtual int64_t block_size() const = 0;
  virtual BlockSummaryTable summaries(int64_t layer, int64_t kv_head) const = 0;
  // Makes the summaries also describe keys in a frame per head (BlockSummaryTable): `rows` is
  // {layers * kv_heads, rank, head_dim}, head index layer * kv_heads + kv_head, each head's rows
  // orthonormal. Only while the cache is empty; throws visikv::Error for a cache that keeps no
  // frames, a non-empty cache or rows of the wrong size.
  virtual void set_summary_frames(std::span<const double> rows, int64_t rank);
  // Makes the summaries also keep a `bits`-bit sketch of every stored key (BlockSummaryTable),
  // 2 <= bits <= 8. Only while the cache is empty; throws visikv::Error otherwise or for a cache
  // that keeps no sketches.
  virtual void set_position_sketches(int bits);
  BlockSummary summary(int64_t layer, int64_t kv_head, int64_t block) const {
    return summaries(layer, kv_head).block(block);
  }

  // Forgets every token (keeps allocations).
  virtual void clear() = 0;

  // Caches whose stored form depends on the attention they serve (value bit policies,
  // kv/value_policy.h) return true. The decoder then hands them, after each softmax, the weights
  // every query head gave its positions, through record_attention; such a cache must be filled in
  // decode order, one token per append, and its append throws otherwise. Decoder::forward does
  // so for a chunk of tokens too: within each layer it appends and attends one token at a time.
  virtual bool records_attention() const { return false; }
  // weights[i]: the softmax weight one query head of `kv_head`'s group gave positions[i]. Calls
  // for different KV heads may run concurrently; calls for one head must not.
  virtual void record_attention(int64_t /*layer*/, int64_t /*kv_head*/,
                                std::span<const float> /*weights*/,
                                const PositionSet& /*positions*/) {}

  // How many tokens may next be appended to `layer` in one call and attended as one causal
  // chunk with the same stored forms every query would see if the tokens were appended and
  // attended one at a time (decode order): at least 1. A chunk qualifies when no append after
  // its first changes the stored form of a position an earlier query of the chunk reads. A
  // cache whose stored form depends on anything but the appended keys and values (e.g. on the
  // attention weights) must return 1, the default.
  virtual int64_t decode_equivalent_chunk(int64_t layer) const {
    (void)layer;
    return 1;
  }
};

}  // namespace visikv

// Running per-block centroid / min / max / max-norm of the keys of one (layer, KV head), updated
// as keys arrive, held as contiguous {blocks, head_dim} arrays (BlockSummaryTable). The cache
// that owns one feeds it the keys in their stored form (what scores read), and rebuilds a block
// when the stored form of its keys changes (a key leaving an fp16 window for its quantized form).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/kv/cache.h"

namespace visikv {

// The rotation position sketches are taken in: x <- H x with H = W S / sqrt(d) (S seeded random
// signs, W the Walsh-Hadamard matrix), in float64, when d is a power of two; otherwise x is left
// as it is. H is orthonormal, so q·k = (Hq)·(Hk); rotating spreads a key's outlier channels
// over all channels, which narrows its per-key sketch range (and the bounds) several times.
bool sketch_rotates(int64_t dim);
void sketch_rotation(std::span<double> x);

class BlockSummaries {
 public:
  BlockSummaries(int64_t head_dim, int64_t block_size);
  // Also keep the box of the keys' coordinates in `rank` orthonormal rows ({rank, head_dim},
  // copied) and the largest residual norm outside them (BlockSummaryTable). Only while empty.
  void set_frame(std::span<const double> rows, int64_t rank);
  // Also keep a `bits`-bit sketch of every key (BlockSummaryTable), 2 <= bits <= 8. Only while
  // empty.
  void set_sketch(int bits);
  void add(std::span<const float> key);  // the key of the next position
  // Recomputes block `block` from `keys` ({count, head_dim}): the stored form of every key the
  // block holds so far (count = the block's current count).
  void rebuild(int64_t block, std::span<const float> keys);
  BlockSummary get(int64_t block) const { return table().block(block); }
  BlockSummaryTable table() const;
  int64_t blocks() const { return static_cast<int64_t>(counts_.size()); }
  int64_t block_size() const { return block_size_; }
  void clear();

 private:
  void fold(int64_t block, std::span<const float> key);

  int64_t head_dim_, block_size_, positions_ = 0;
  std::vector<double> sums_;
  std::vector<float> centroids_, mins_, maxs_, norms_;
  int64_t frame_rank_ = 0;
  std::vector<double> frame_, coordinates_;  // the rows; one key's coordinates (scratch)
  std::vector<float> frame_mins_, frame_maxs_, residual_norms_;
  int64_t sketch_levels_ = 0;
  std::vector<int8_t> sketch_codes_;
  std::vector<float> sketch_offsets_, sketch_steps_, sketch_errors_;
  std::vector<double> sketch_key_;  // one rotated key (scratch)
  void sketch(int64_t position, std::span<const float> key);
  std::vector<int64_t> counts_;
};

}  // namespace visikv

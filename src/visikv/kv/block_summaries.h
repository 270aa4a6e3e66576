// Running per-block centroid / min / max of the keys of one (layer, KV head), updated as keys
// arrive. Any cache codec can own one; it is fed the exact (pre-quantization) keys.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/kv/cache.h"

namespace visikv {

class BlockSummaries {
 public:
  BlockSummaries(int64_t head_dim, int64_t block_size);
  void add(std::span<const float> key);  // the key of the next position
  BlockSummary get(int64_t block) const;
  int64_t blocks() const { return static_cast<int64_t>(counts_.size()); }
  void clear();

 private:
  int64_t head_dim_, block_size_, positions_ = 0;
  std::vector<double> sums_;
  std::vector<float> centroids_, mins_, maxs_;
  std::vector<int64_t> counts_;
};

}  // namespace visikv

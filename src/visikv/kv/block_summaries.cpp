#include "visikv/kv/block_summaries.h"

#include <algorithm>

#include "visikv/core/error.h"

namespace visikv {

BlockSummaries::BlockSummaries(int64_t head_dim, int64_t block_size)
    : head_dim_(head_dim), block_size_(block_size) {
  require(block_size > 0, "block size must be positive, got ", block_size);
}

void BlockSummaries::add(std::span<const float> key) {
  const int64_t block = positions_ / block_size_;
  if (block == blocks()) {
    counts_.push_back(0);
    sums_.resize(sums_.size() + head_dim_, 0.0);
    centroids_.resize(centroids_.size() + head_dim_, 0.0f);
    mins_.resize(mins_.size() + head_dim_, key[0]);
    maxs_.resize(maxs_.size() + head_dim_, key[0]);
    std::copy(key.begin(), key.end(), mins_.end() - head_dim_);
    std::copy(key.begin(), key.end(), maxs_.end() - head_dim_);
  }
  const int64_t count = ++counts_[block];
  const int64_t base = block * head_dim_;
  for (int64_t c = 0; c < head_dim_; ++c) {
    sums_[base + c] += key[c];
    centroids_[base + c] = static_cast<float>(sums_[base + c] / static_cast<double>(count));
    mins_[base + c] = std::min(mins_[base + c], key[c]);
    maxs_[base + c] = std::max(maxs_[base + c], key[c]);
  }
  ++positions_;
}

BlockSummary BlockSummaries::get(int64_t block) const {
  require(block >= 0 && block < blocks(), "summary block ", block, " out of range (", blocks(),
          " blocks)");
  const size_t base = static_cast<size_t>(block * head_dim_), d = static_cast<size_t>(head_dim_);
  return {std::span(centroids_).subspan(base, d), std::span(mins_).subspan(base, d),
          std::span(maxs_).subspan(base, d), counts_[block]};
}

void BlockSummaries::clear() {
  positions_ = 0;
  sums_.clear();
  centroids_.clear();
  mins_.clear();
  maxs_.clear();
  counts_.clear();
}

}  // namespace visikv

#include "visikv/kv/block_summaries.h"

#include <algorithm>
#include <cmath>

#include "visikv/core/error.h"
#include "visikv/core/random.h"

namespace visikv {

BlockSummary BlockSummaryTable::block(int64_t b) const {
  require(b >= 0 && b < blocks, "summary block ", b, " out of range (", blocks, " blocks)");
  const size_t base = static_cast<size_t>(b * head_dim), d = static_cast<size_t>(head_dim);
  return {centroids.subspan(base, d), mins.subspan(base, d), maxs.subspan(base, d),
          norms[static_cast<size_t>(b)], counts[static_cast<size_t>(b)]};
}

void KVCache::set_summary_frames(std::span<const double> /*rows*/, int64_t /*rank*/) {
  fail("this cache (", describe(), ") keeps no summary frames");
}

void KVCache::set_position_sketches(int /*bits*/) {
  fail("this cache (", describe(), ") keeps no position sketches");
}

namespace {

// The float nearest x on the side that keeps a bound valid.
float round_down(double x) {
  const float f = static_cast<float>(x);
  return static_cast<double>(f) > x ? std::nextafter(f, -INFINITY) : f;
}
float round_up(double x) {
  const float f = static_cast<float>(x);
  return static_cast<double>(f) < x ? std::nextafter(f, INFINITY) : f;
}

}  // namespace

BlockSummaries::BlockSummaries(int64_t head_dim, int64_t block_size)
    : head_dim_(head_dim), block_size_(block_size) {
  require(block_size > 0, "block size must be positive, got ", block_size);
}

void BlockSummaries::set_frame(std::span<const double> rows, int64_t rank) {
  require(positions_ == 0, "summary frame: set it before the first key");
  require(rank >= 1 && rank <= head_dim_ && static_cast<int64_t>(rows.size()) == rank * head_dim_,
          "summary frame: ", rows.size(), " numbers for rank ", rank, " x head_dim ", head_dim_);
  frame_.assign(rows.begin(), rows.end());
  frame_rank_ = rank;
  coordinates_.assign(static_cast<size_t>(rank), 0.0);
}

void BlockSummaries::set_sketch(int bits) {
  require(positions_ == 0, "position sketches: set them before the first key");
  require(bits >= 2 && bits <= 8, "position sketches: bits must be in [2, 8], got ", bits);
  require(head_dim_ % 2 == 0, "position sketches need an even head dimension, got ", head_dim_);
  sketch_levels_ = (int64_t{1} << (bits - 1)) - 1;
  sketch_key_.assign(static_cast<size_t>(head_dim_), 0.0);
}

bool sketch_rotates(int64_t dim) { return dim >= 2 && (dim & (dim - 1)) == 0; }

void sketch_rotation(std::span<double> x) {
  const int64_t d = static_cast<int64_t>(x.size());
  if (!sketch_rotates(d)) return;
  uint64_t state = 0x5ce7'c400'0b0dULL;
  for (int64_t c = 0; c < d; ++c)
    if (splitmix64(state) & 1) x[c] = -x[c];
  for (int64_t half = 1; half < d; half *= 2)
    for (int64_t i = 0; i < d; i += 2 * half)
      for (int64_t j = i; j < i + half; ++j) {
        const double a = x[j], b = x[j + half];
        x[j] = a + b;
        x[j + half] = a - b;
      }
  const double norm = 1 / std::sqrt(static_cast<double>(d));
  for (double& v : x) v *= norm;
}

// The key is rotated (sketch_rotation), then codes round (y_c - offset) / step to [-L, L] with
// offset the midpoint of y's range and step = range / 2L; the error norm is of the
// reconstruction the bounds use, in float64, rounded up. A constant y gets step 0 and error 0.
void BlockSummaries::sketch(int64_t position, std::span<const float> key) {
  const int64_t d = head_dim_, levels = sketch_levels_;
  double* y = sketch_key_.data();
  std::copy(key.begin(), key.end(), y);
  sketch_rotation(sketch_key_);
  const auto [lo, hi] = std::minmax_element(y, y + d);
  const float offset = static_cast<float>((*lo + *hi) / 2);
  const float step = static_cast<float>((*hi - *lo) / (2.0 * levels));
  double error = 0;
  for (int64_t c = 0; c < d; ++c) {
    const double code =
        step > 0 ? std::clamp(std::nearbyint((y[c] - static_cast<double>(offset)) / step),
                              -static_cast<double>(levels), static_cast<double>(levels))
                 : 0.0;
    sketch_codes_[static_cast<size_t>(sketch_code_index(position, c, d))] =
        static_cast<int8_t>(code);
    const double diff = y[c] - (static_cast<double>(offset) + static_cast<double>(step) * code);
    error += diff * diff;
  }
  sketch_offsets_[position] = offset;
  sketch_steps_[position] = step;
  sketch_errors_[position] = round_up(std::sqrt(error));
}

// Adds one key to block `block`, whose first key starts the min / max.
void BlockSummaries::fold(int64_t block, std::span<const float> key) {
  const int64_t base = block * head_dim_;
  const int64_t count = ++counts_[block];
  double norm = 0;
  for (int64_t c = 0; c < head_dim_; ++c) {
    sums_[base + c] += key[c];
    centroids_[base + c] = static_cast<float>(sums_[base + c] / static_cast<double>(count));
    mins_[base + c] = count == 1 ? key[c] : std::min(mins_[base + c], key[c]);
    maxs_[base + c] = count == 1 ? key[c] : std::max(maxs_[base + c], key[c]);
    norm += static_cast<double>(key[c]) * key[c];
  }
  // Rounded up so that the float norm is never below the true one.
  const float rounded = static_cast<float>(std::sqrt(norm));
  const float up = rounded < std::sqrt(norm) ? std::nextafter(rounded, INFINITY) : rounded;
  norms_[block] = count == 1 ? up : std::max(norms_[block], up);
  if (frame_rank_ == 0) return;
  // Coordinates p_i = u_i·k and the residual r = k - sum_i p_i u_i in float64: their rounding
  // (~d 2^-53 ||k||) is far below the float32 slack the bounds carry (block_bounds.cpp); the
  // stored box is then rounded outward and the residual norm up.
  const int64_t r = frame_rank_, d = head_dim_, fbase = block * r;
  for (int64_t i = 0; i < r; ++i) {
    const double* u = frame_.data() + i * d;
    double p = 0;
    for (int64_t c = 0; c < d; ++c) p += u[c] * key[c];
    coordinates_[i] = p;
    frame_mins_[fbase + i] =
        count == 1 ? round_down(p) : std::min(frame_mins_[fbase + i], round_down(p));
    frame_maxs_[fbase + i] =
        count == 1 ? round_up(p) : std::max(frame_maxs_[fbase + i], round_up(p));
  }
  double residual = 0;
  for (int64_t c = 0; c < d; ++c) {
    double x = key[c];
    for (int64_t i = 0; i < r; ++i) x -= coordinates_[i] * frame_[i * d + c];
    residual += x * x;
  }
  const float residual_up = round_up(std::sqrt(residual));
  residual_norms_[block] = count == 1 ? residual_up : std::max(residual_norms_[block], residual_up);
}

void BlockSummaries::add(std::span<const float> key) {
  const int64_t block = positions_ / block_size_;
  if (block == blocks()) {
    counts_.push_back(0);
    norms_.push_back(0.0f);
    sums_.resize(sums_.size() + head_dim_, 0.0);
    centroids_.resize(centroids_.size() + head_dim_, 0.0f);
    mins_.resize(mins_.size() + head_dim_, 0.0f);
    maxs_.resize(maxs_.size() + head_dim_, 0.0f);
    frame_mins_.resize(frame_mins_.size() + frame_rank_, 0.0f);
    frame_maxs_.resize(frame_maxs_.size() + frame_rank_, 0.0f);
    if (frame_rank_ > 0) residual_norms_.push_back(0.0f);
  }
  fold(block, key);
  if (sketch_levels_ > 0) {
    if (positions_ % kSketchTile == 0)  // a new tile
      sketch_codes_.resize(sketch_codes_.size() + kSketchTile * head_dim_);
    sketch_offsets_.push_back(0.0f);
    sketch_steps_.push_back(0.0f);
    sketch_errors_.push_back(0.0f);
    sketch(positions_, key);
  }
  ++positions_;
}

void BlockSummaries::rebuild(int64_t block, std::span<const float> keys) {
  require(block >= 0 && block < blocks() &&
              static_cast<int64_t>(keys.size()) == counts_[block] * head_dim_,
          "summary rebuild: block ", block, " needs its ", block < blocks() ? counts_[block] : 0,
          " keys");
  const int64_t count = counts_[block], base = block * head_dim_;
  counts_[block] = 0;
  std::fill(sums_.begin() + base, sums_.begin() + base + head_dim_, 0.0);
  for (int64_t i = 0; i < count; ++i) {
    const std::span<const float> key =
        keys.subspan(static_cast<size_t>(i * head_dim_), static_cast<size_t>(head_dim_));
    fold(block, key);
    if (sketch_levels_ > 0) sketch(block * block_size_ + i, key);
  }
}

BlockSummaryTable BlockSummaries::table() const {
  return {blocks(),      head_dim_,       centroids_,     mins_,         maxs_,
          norms_,        counts_,         frame_rank_,    frame_,        frame_mins_,
          frame_maxs_,   residual_norms_, sketch_levels_, sketch_codes_, sketch_offsets_,
          sketch_steps_, sketch_errors_};
}

void BlockSummaries::clear() {
  positions_ = 0;
  sums_.clear();
  centroids_.clear();
  mins_.clear();
  maxs_.clear();
  norms_.clear();
  counts_.clear();
  frame_mins_.clear();
  frame_maxs_.clear();
  residual_norms_.clear();
  sketch_codes_.clear();
  sketch_offsets_.clear();
  sketch_steps_.clear();
  sketch_errors_.clear();
}

}  // namespace visikv

// A fixed orthonormal rotation H = W·S / sqrt(d): S a diagonal of seeded random signs, W the
// Walsh-Hadamard matrix (Sylvester order), d a power of two. Applying it before quantization
// spreads outlier channels over all channels; since H is orthonormal, q·k = (Hq)·(Hk) and
// Σ w_i v_i = Hᵀ Σ w_i (H v_i), so scores and value sums need only the query rotated and the
// accumulated output rotated back. O(d log d) per vector.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace visikv {

class HadamardRotation {
 public:
  static constexpr uint64_t kDefaultSeed = 0x5eed'4ada'3a2dULL;

  // Throws visikv::Error unless `dim` is a power of two.
  explicit HadamardRotation(int64_t dim, uint64_t seed = kDefaultSeed);

  int64_t dim() const { return dim_; }
  // x <- H x, in place; x.size() == dim().
  void rotate(std::span<float> x) const;
  // x <- Hᵀ x, in place (the inverse).
  void unrotate(std::span<float> x) const;

 private:
  int64_t dim_;
  float norm_;                // 1 / sqrt(dim)
  std::vector<float> signs_;  // ±1
};

}  // namespace visikv

#include "visikv/kv/hadamard.h"

#include <algorithm>
#include <cmath>

#include "visikv/core/error.h"
#include "visikv/core/random.h"

namespace visikv {

namespace {

// x <- W x (unnormalised fast Walsh-Hadamard transform).
void walsh_hadamard(float* x, int64_t n) {
  for (int64_t half = 1; half < n; half *= 2) {
    for (int64_t start = 0; start < n; start += 2 * half) {
      for (int64_t i = start; i < start + half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a + b;
        x[i + half] = a - b;
      }
    }
  }
}

}  // namespace

HadamardRotation::HadamardRotation(int64_t dim, uint64_t seed)
    : dim_(dim), norm_(static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)))) {
  require(dim > 0 && (dim & (dim - 1)) == 0,
          "the Hadamard rotation needs a power-of-two dimension, got ", dim);
  signs_.resize(static_cast<size_t>(dim));
  uint64_t state = seed;
  for (int64_t i = 0; i < dim; i += 64) {
    const uint64_t bits = splitmix64(state);
    for (int64_t j = i; j < std::min<int64_t>(dim, i + 64); ++j)
      signs_[j] = ((bits >> (j - i)) & 1) ? -1.0f : 1.0f;
  }
}

void HadamardRotation::rotate(std::span<float> x) const {
  require(static_cast<int64_t>(x.size()) == dim_, "Hadamard rotation of ", x.size(),
          " elements, expected ", dim_);
  for (int64_t i = 0; i < dim_; ++i) x[i] *= signs_[i] * norm_;
  walsh_hadamard(x.data(), dim_);
}

void HadamardRotation::unrotate(std::span<float> x) const {
  require(static_cast<int64_t>(x.size()) == dim_, "Hadamard rotation of ", x.size(),
          " elements, expected ", dim_);
  walsh_hadamard(x.data(), dim_);  // W is symmetric, so Hᵀ = S·W / sqrt(d)
  for (int64_t i = 0; i < dim_; ++i) x[i] *= signs_[i] * norm_;
}

}  // namespace visikv

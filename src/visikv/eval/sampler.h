// Next-token choice: greedy at temperature 0, otherwise temperature / top-k / top-p sampling
// from a seeded generator (the same seed gives the same tokens).
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace visikv {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy
  int64_t top_k = 0;         // 0: no limit
  double top_p = 1.0;        // nucleus mass
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options);
  int32_t next(std::span<const float> logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 generator_;
};

// The highest logit; the lowest index wins ties.
int32_t argmax(std::span<const float> logits);

}  // namespace visikv

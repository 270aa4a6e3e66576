#include "visikv/eval/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "visikv/core/error.h"

namespace visikv {

Sampler::Sampler(const SamplingOptions& options) : options_(options), generator_(options.seed) {
  require(options.temperature >= 0 && std::isfinite(options.temperature),
          "temperature must be a finite number >= 0, got ", options.temperature);
  require(options.top_k >= 0, "top-k must be >= 0, got ", options.top_k);
  require(options.top_p > 0 && options.top_p <= 1, "top-p must be in (0, 1], got ", options.top_p);
}

int32_t argmax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

int32_t Sampler::next(std::span<const float> logits) {
  if (options_.temperature == 0.0) return argmax(logits);
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  int64_t keep = static_cast<int64_t>(order.size());
  if (options_.top_k > 0 && options_.top_k < keep) {
    keep = options_.top_k;
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
  } else {
    std::sort(order.begin(), order.end(), by_logit);
  }
  std::vector<double> probabilities(static_cast<size_t>(keep));
  const double max = logits[order[0]];
  double sum = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    probabilities[i] = std::exp((logits[order[i]] - max) / options_.temperature);
    sum += probabilities[i];
  }
  // Smallest prefix whose mass reaches top_p (always at least one token).
  double mass = 0.0;
  int64_t nucleus = 0;
  while (nucleus < keep) {
    mass += probabilities[nucleus++] / sum;
    if (mass >= options_.top_p) break;
  }
  std::discrete_distribution<int64_t> pick(probabilities.begin(), probabilities.begin() + nucleus);
  return order[pick(generator_)];
}

}  // namespace visikv

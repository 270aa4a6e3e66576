#include "visikv/eval/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>
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
  // Tokens by logit, highest first, ties to the lower id: a strict total order, so any sort gives
  // the same sequence. Sorting (logit, id) pairs side by side is several times faster than
  // sorting ids that look their logits up.
  std::vector<std::pair<float, int32_t>> ranked(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) ranked[i] = {logits[i], static_cast<int32_t>(i)};
  const auto by_logit = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int64_t keep = static_cast<int64_t>(ranked.size());
  if (options_.top_k > 0 && options_.top_k < keep) {
    keep = options_.top_k;
    std::partial_sort(ranked.begin(), ranked.begin() + keep, ranked.end(), by_logit);
  } else {
    std::sort(ranked.begin(), ranked.end(), by_logit);
  }
  const auto order = [&](int64_t i) { return ranked[static_cast<size_t>(i)].second; };
  std::vector<double> probabilities(static_cast<size_t>(keep));
  const double max = logits[order(0)];
  double sum = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    probabilities[i] = std::exp((logits[order(i)] - max) / options_.temperature);
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
  return order(pick(generator_));
}

}  // namespace visikv

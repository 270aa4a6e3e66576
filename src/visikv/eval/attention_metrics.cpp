#include "visikv/eval/attention_metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "visikv/core/error.h"

namespace visikv {

namespace {

template <typename T>
size_t argmax(std::span<const T> values) {
  return static_cast<size_t>(std::max_element(values.begin(), values.end()) - values.begin());
}

// KL(a || â) from a = softmax(s) (given with log a_j = s_j - lse) and δ = s - ŝ.
template <typename T>
double kl_from(std::span<const T> logits, std::span<const double> weights, double lse,
               std::span<const T> perturbed, double delta_mean) {
  double spread = 0;
  for (size_t j = 0; j < logits.size(); ++j)
    if (weights[j] > 0)
      spread = std::max(spread, std::abs(double(logits[j]) - double(perturbed[j]) - delta_mean));
  double kl;
  if (spread < 1) {
    // Small deviations: Σ a_j expm1(-d_j) is the tiny quantity itself, not a difference of two
    // numbers near one.
    double sum = 0;
    for (size_t j = 0; j < logits.size(); ++j)
      sum += weights[j] * std::expm1(-(double(logits[j]) - double(perturbed[j]) - delta_mean));
    kl = std::log1p(sum);
  } else {
    // Large deviations: log-sum-exp of log a_j - d_j.
    double top = -std::numeric_limits<double>::infinity();
    std::vector<double> terms(logits.size());
    for (size_t j = 0; j < logits.size(); ++j) {
      terms[j] =
          (double(logits[j]) - lse) - (double(logits[j]) - double(perturbed[j]) - delta_mean);
      top = std::max(top, terms[j]);
    }
    double sum = 0;
    for (double x : terms) sum += std::exp(x - top);
    kl = top + std::log(sum);
  }
  return std::max(0.0, kl);
}

void require_same_length(size_t a, size_t b, const char* what) {
  require(a == b, what, ": lengths differ (", a, " and ", b, ")");
}

// softmax(s) into `weights` (sized as s, not empty) with one exponential per entry; returns
// log Σ_j exp(s_j).
template <typename T>
double softmax_into(std::span<const T> logits, std::span<double> weights) {
  const double top = double(logits[argmax(logits)]);
  double sum = 0;
  for (size_t j = 0; j < logits.size(); ++j) sum += weights[j] = std::exp(double(logits[j]) - top);
  for (double& w : weights) w /= sum;
  return top + std::log(sum);
}

}  // namespace

double squared_error(std::span<const float> x, std::span<const float> y) {
  require_same_length(x.size(), y.size(), "squared_error");
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = double(x[i]) - double(y[i]);
    sum += e * e;
  }
  return sum;
}

std::vector<double> score_errors(std::span<const float> query, std::span<const float> key_errors,
                                 double scale) {
  const size_t d = query.size();
  require(d > 0 && key_errors.size() % d == 0, "score_errors: ", key_errors.size(),
          " key-error numbers are not a whole number of vectors of ", d);
  std::vector<double> deltas(key_errors.size() / d);
  for (size_t j = 0; j < deltas.size(); ++j) {
    double dot = 0;
    for (size_t c = 0; c < d; ++c) dot += double(query[c]) * double(key_errors[j * d + c]);
    deltas[j] = scale * dot;
  }
  return deltas;
}

template <typename T>
double log_sum_exp(std::span<const T> logits) {
  if (logits.empty()) return -std::numeric_limits<double>::infinity();
  const double top = double(logits[argmax(logits)]);
  double sum = 0;
  for (T s : logits) sum += std::exp(double(s) - top);
  return top + std::log(sum);
}

template <typename T>
std::vector<double> softmax_weights(std::span<const T> logits) {
  const double lse = log_sum_exp(logits);
  std::vector<double> weights(logits.size());
  for (size_t j = 0; j < logits.size(); ++j) weights[j] = std::exp(double(logits[j]) - lse);
  return weights;
}

template <typename T>
double attention_entropy(std::span<const T> logits) {
  return compare_attention(logits, logits).entropy;
}

double fisher_score_error(std::span<const double> weights, std::span<const double> deltas) {
  require_same_length(weights.size(), deltas.size(), "fisher_score_error");
  double mean = 0;
  for (size_t j = 0; j < deltas.size(); ++j) mean += weights[j] * deltas[j];
  double variance = 0;
  for (size_t j = 0; j < deltas.size(); ++j)
    variance += weights[j] * (deltas[j] - mean) * (deltas[j] - mean);
  return variance;
}

template <typename T>
double softmax_kl(std::span<const T> logits, std::span<const T> perturbed) {
  require_same_length(logits.size(), perturbed.size(), "softmax_kl");
  if (logits.empty()) return 0;
  // compare_attention's KL without its Fisher and entropy passes: next-token distributions are
  // vocabulary-sized, and this runs once per scored position.
  std::vector<double> weights(logits.size());
  const double lse = softmax_into(logits, weights);
  double delta_mean = 0;
  for (size_t j = 0; j < logits.size(); ++j)
    delta_mean += weights[j] * (double(logits[j]) - double(perturbed[j]));
  return kl_from(logits, weights, lse, perturbed, delta_mean);
}

template <typename T>
bool argmax_differs(std::span<const T> logits, std::span<const T> perturbed) {
  require_same_length(logits.size(), perturbed.size(), "argmax_differs");
  return !logits.empty() && argmax(logits) != argmax(perturbed);
}

template <typename T>
AttentionComparison compare_attention(std::span<const T> logits, std::span<const T> perturbed) {
  require_same_length(logits.size(), perturbed.size(), "compare_attention");
  AttentionComparison out;
  if (logits.empty()) return out;
  std::vector<double> weights(logits.size());
  const double lse = softmax_into(logits, weights);
  double mean_logit = 0, delta_mean = 0;
  for (size_t j = 0; j < logits.size(); ++j) {
    mean_logit += weights[j] * double(logits[j]);
    delta_mean += weights[j] * (double(logits[j]) - double(perturbed[j]));
  }
  double variance = 0;
  for (size_t j = 0; j < logits.size(); ++j) {
    const double d = double(logits[j]) - double(perturbed[j]) - delta_mean;
    variance += weights[j] * d * d;
  }
  out.fisher = variance;
  out.entropy = std::max(0.0, lse - mean_logit);
  out.kl = kl_from(logits, weights, lse, perturbed, delta_mean);
  out.route_flip = argmax(logits) != argmax(perturbed);
  return out;
}

std::vector<double> weighted_sum(std::span<const double> weights, std::span<const float> vectors) {
  require(!weights.empty() && vectors.size() % weights.size() == 0,
          "weighted_sum: ", vectors.size(), " numbers are not ", weights.size(), " vectors");
  const size_t d = vectors.size() / weights.size();
  std::vector<double> out(d, 0.0);
  for (size_t j = 0; j < weights.size(); ++j)
    for (size_t c = 0; c < d; ++c) out[c] += weights[j] * double(vectors[j * d + c]);
  return out;
}

double a2_surrogate(std::span<const double> weights, std::span<const double> value_error_squares) {
  require_same_length(weights.size(), value_error_squares.size(), "a2_surrogate");
  double sum = 0;
  for (size_t j = 0; j < weights.size(); ++j)
    sum += weights[j] * weights[j] * value_error_squares[j];
  return sum;
}

double sorted_percentile(std::span<const double> sorted, double p) {
  require(!sorted.empty(), "sorted_percentile: no values");
  return sorted[static_cast<size_t>(std::floor(p * static_cast<double>(sorted.size() - 1)))];
}

std::vector<double> average_ranks(std::span<const double> values) {
  std::vector<size_t> order(values.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return values[a] < values[b]; });
  std::vector<double> ranks(values.size());
  for (size_t i = 0; i < order.size();) {
    size_t end = i + 1;
    while (end < order.size() && values[order[end]] == values[order[i]]) ++end;
    // Positions i..end-1 (ranks i+1..end) share their mean.
    const double rank = 0.5 * double(i + 1 + end);
    for (size_t k = i; k < end; ++k) ranks[order[k]] = rank;
    i = end;
  }
  return ranks;
}

double pearson_correlation(std::span<const double> x, std::span<const double> y) {
  require_same_length(x.size(), y.size(), "pearson_correlation");
  const size_t n = x.size();
  if (n < 2) return std::numeric_limits<double>::quiet_NaN();
  const double mx = std::accumulate(x.begin(), x.end(), 0.0) / double(n);
  const double my = std::accumulate(y.begin(), y.end(), 0.0) / double(n);
  double sxy = 0, sxx = 0, syy = 0;
  for (size_t i = 0; i < n; ++i) {
    sxy += (x[i] - mx) * (y[i] - my);
    sxx += (x[i] - mx) * (x[i] - mx);
    syy += (y[i] - my) * (y[i] - my);
  }
  if (sxx <= 0 || syy <= 0) return std::numeric_limits<double>::quiet_NaN();
  return std::clamp(sxy / std::sqrt(sxx * syy), -1.0, 1.0);
}

double spearman_correlation(std::span<const double> x, std::span<const double> y) {
  require_same_length(x.size(), y.size(), "spearman_correlation");
  const std::vector<double> rx = average_ranks(x), ry = average_ranks(y);
  return pearson_correlation(rx, ry);
}

#define VISIKV_INSTANTIATE(T)                                              \
  template double log_sum_exp<T>(std::span<const T>);                      \
  template std::vector<double> softmax_weights<T>(std::span<const T>);     \
  template double attention_entropy<T>(std::span<const T>);                \
  template double softmax_kl<T>(std::span<const T>, std::span<const T>);   \
  template bool argmax_differs<T>(std::span<const T>, std::span<const T>); \
  template AttentionComparison compare_attention<T>(std::span<const T>, std::span<const T>);
VISIKV_INSTANTIATE(float)
VISIKV_INSTANTIATE(double)
#undef VISIKV_INSTANTIATE

}  // namespace visikv

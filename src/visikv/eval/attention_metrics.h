// The metrics of METHODS.md "Keys" and "Values" for one query over one set of positions, as
// small pure functions computed in double precision, and the statistics that summarise them
// (percentiles, the correlations that rank a distortion measure against measured KL).
//
// Logits are the scaled scores s_j (exact) and ŝ_j (from a perturbed or quantized cache) of one
// query over the same positions; a = softmax(s), â = softmax(ŝ), δ_j = s_j - ŝ_j. softmax_kl and
// argmax_differs are not specific to attention: the perplexity evaluations compare next-token
// distributions with them (eval/divergence.h), logits over the vocabulary in place of scores.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace visikv {

// ||x - y||², accumulated in double.
double squared_error(std::span<const float> x, std::span<const float> y);

// δ_j = scale · q·e_j for key errors e_j = k_j - k̂_j ({n, d} row-major, d = q.size()): the
// score error a key error causes, in double.
std::vector<double> score_errors(std::span<const float> query, std::span<const float> key_errors,
                                 double scale);

// log Σ_j exp(s_j), in double with the maximum subtracted.
template <typename T>
double log_sum_exp(std::span<const T> logits);

// a = softmax(s), in double.
template <typename T>
std::vector<double> softmax_weights(std::span<const T> logits);

// H(a) = -Σ_j a_j log a_j (nats), from the logits: log-sum-exp(s) - Σ_j a_j s_j.
template <typename T>
double attention_entropy(std::span<const T> logits);

// F = Var_a(δ) = Σ_j a_j δ_j² - (Σ_j a_j δ_j)², computed about the a-weighted mean (so a
// constant added to every δ_j leaves it unchanged). Throws visikv::Error for unequal lengths.
double fisher_score_error(std::span<const double> weights, std::span<const double> deltas);

// KL(a || â) = Σ_j a_j (log a_j - log â_j) from the two sets of logits, in double. With d_j the
// deviations of δ_j from their a-weighted mean, KL = log Σ_j a_j exp(-d_j) exactly (the
// log-sum-exp difference of the two normalisers, written so that the constant part of δ
// cancels before any rounding); for |d_j| < 1 it is evaluated as log1p(Σ a_j expm1(-d_j)) so
// that small KLs keep their relative precision. Never negative (rounding is clamped at 0); exactly
// 0 for equal logits. Throws visikv::Error for unequal lengths.
template <typename T>
double softmax_kl(std::span<const T> logits, std::span<const T> perturbed);

// argmax_j s_j != argmax_j ŝ_j (first index on ties): a route flip of attention, a top-1
// disagreement of next-token distributions. Empty spans: false.
template <typename T>
bool argmax_differs(std::span<const T> logits, std::span<const T> perturbed);

// Everything above for one query at once (one softmax, one pass over δ).
struct AttentionComparison {
  double kl = 0;       // KL(a || â)
  double fisher = 0;   // Var_a(δ)
  double entropy = 0;  // H(a)
  bool route_flip = false;
};
template <typename T>
AttentionComparison compare_attention(std::span<const T> logits, std::span<const T> perturbed);

// Σ_j w_j v_j for vectors {n, d} row-major, in double.
std::vector<double> weighted_sum(std::span<const double> weights, std::span<const float> vectors);

// The A² surrogate of the value readout error: Σ_j a_j² ||ε_j||², given ||ε_j||² per position.
// Under independent zero-mean value errors ε_j it equals E||Σ_j a_j ε_j||².
double a2_surrogate(std::span<const double> weights, std::span<const double> value_error_squares);

// The p-th percentile (0 <= p <= 1) of ascending `sorted` values as the lower order statistic:
// sorted[floor(p (n - 1))], a value that occurs. Throws visikv::Error when empty.
double sorted_percentile(std::span<const double> sorted, double p);

// Ranks 1..n of `values` in ascending order, ties sharing the average of their ranks.
std::vector<double> average_ranks(std::span<const double> values);

// Pearson's correlation coefficient; NaN when either side is constant or has fewer than two
// values. Throws visikv::Error for unequal lengths.
double pearson_correlation(std::span<const double> x, std::span<const double> y);

// Spearman's rank correlation: Pearson's coefficient of the average ranks (ties handled).
double spearman_correlation(std::span<const double> x, std::span<const double> y);

}  // namespace visikv

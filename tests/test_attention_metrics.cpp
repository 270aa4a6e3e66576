// The attention metrics of METHODS.md "Keys" and "Values" (eval/attention_metrics.h) and the
// analysis controls (eval/key_perturbation.h), against closed forms: KL ≈ F/2 for small
// perturbations, shift invariance, the A² surrogate against Monte Carlo, the null-space
// perturbation, and correlations on hand-computable data.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "test_support.h"
#include "visikv/calibration/headq_basis.h"
#include "visikv/eval/attention_metrics.h"
#include "visikv/eval/key_perturbation.h"
#include "visikv/kv/headq.h"

namespace visikv {
namespace {

using test_support::error_of;

std::vector<double> random_doubles(std::mt19937& rng, size_t n, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = normal(rng);
  return v;
}

// KL(a || â) straight from the definition, in long double.
double brute_force_kl(const std::vector<double>& s, const std::vector<double>& s_hat) {
  long double z = 0, z_hat = 0;
  for (size_t j = 0; j < s.size(); ++j) {
    z += std::exp(static_cast<long double>(s[j]));
    z_hat += std::exp(static_cast<long double>(s_hat[j]));
  }
  long double kl = 0;
  for (size_t j = 0; j < s.size(); ++j) {
    const long double a = std::exp(static_cast<long double>(s[j])) / z;
    const long double log_a = s[j] - std::log(z), log_a_hat = s_hat[j] - std::log(z_hat);
    kl += a * (log_a - log_a_hat);
  }
  return static_cast<double>(kl);
}

TEST(AttentionMetrics, KlAgreesWithTheDefinition) {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 20; ++trial) {
    const std::vector<double> s = random_doubles(rng, 40, 2.0);
    const std::vector<double> noise = random_doubles(rng, 40, 1.5);
    std::vector<double> s_hat(s.size());
    for (size_t j = 0; j < s.size(); ++j) s_hat[j] = s[j] + noise[j];
    const double expected = brute_force_kl(s, s_hat);
    EXPECT_NEAR(softmax_kl<double>(s, s_hat), expected, 1e-12 * std::max(1.0, expected));
    // Entropy from the definition.
    const std::vector<double> a = softmax_weights<double>(s);
    double h = 0;
    for (double x : a) h -= x * std::log(x);
    EXPECT_NEAR(attention_entropy<double>(s), h, 1e-12);
  }
}

TEST(AttentionMetrics, KlTendsToHalfTheFisherErrorForSmallPerturbations) {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 10; ++trial) {
    const std::vector<double> s = random_doubles(rng, 64, 2.0);
    const std::vector<double> u = random_doubles(rng, 64, 1.0);
    const std::vector<double> a = softmax_weights<double>(s);
    double previous_deviation = INFINITY;
    for (double scale : {1e-1, 1e-2, 1e-3, 1e-4}) {
      std::vector<double> s_hat(s.size()), delta(s.size());
      for (size_t j = 0; j < s.size(); ++j) {
        delta[j] = scale * u[j];
        s_hat[j] = s[j] - delta[j];
      }
      const double fisher = fisher_score_error(a, delta);
      const double kl = softmax_kl<double>(s, s_hat);
      const double deviation = std::abs(kl / (fisher / 2) - 1);
      // The next term of the expansion is third order in δ: the ratio is 1 + O(scale).
      EXPECT_LT(deviation, 2 * scale) << "scale " << scale;
      EXPECT_LT(deviation, previous_deviation / 5) << "the ratio approaches 1, scale " << scale;
      previous_deviation = deviation;
      // compare_attention computes the same F from the logits.
      EXPECT_NEAR(compare_attention<double>(s, s_hat).fisher, fisher, 1e-9 * fisher);
    }
  }
}

TEST(AttentionMetrics, FisherAndKlIgnoreAConstantAddedToEveryScore) {
  std::mt19937 rng(3);
  const std::vector<double> s = random_doubles(rng, 30, 2.0);
  const std::vector<double> noise = random_doubles(rng, 30, 0.3);
  std::vector<double> s_hat(s.size()), shifted(s.size()), delta(s.size()), delta_shifted(s.size());
  for (size_t j = 0; j < s.size(); ++j) {
    s_hat[j] = s[j] + noise[j];
    shifted[j] = s_hat[j] + 7.25;
    delta[j] = s[j] - s_hat[j];
    delta_shifted[j] = s[j] - shifted[j];
  }
  const std::vector<double> a = softmax_weights<double>(s);
  const double f = fisher_score_error(a, delta);
  EXPECT_GT(f, 0);
  EXPECT_NEAR(fisher_score_error(a, delta_shifted), f, 1e-12 * f);
  const double kl = softmax_kl<double>(s, s_hat);
  EXPECT_GT(kl, 0);
  EXPECT_NEAR(softmax_kl<double>(s, shifted), kl, 1e-12 * kl);
  // A pure shift is invisible: zero F, zero KL, no flip.
  std::vector<double> only_shift(s.size());
  for (size_t j = 0; j < s.size(); ++j) only_shift[j] = s[j] - 3.5;
  const AttentionComparison c = compare_attention<double>(s, only_shift);
  EXPECT_NEAR(c.fisher, 0, 1e-24);
  EXPECT_NEAR(c.kl, 0, 1e-15);
  EXPECT_FALSE(c.route_flip);
}

TEST(AttentionMetrics, FisherIsTheWeightedVariance) {
  // a = (1/2, 1/4, 1/4), δ = (0, 2, -2): mean 0, variance 1/4·4 + 1/4·4 = 2.
  const std::vector<double> a = {0.5, 0.25, 0.25}, delta = {0, 2, -2};
  EXPECT_DOUBLE_EQ(fisher_score_error(a, delta), 2.0);
  // δ = (1, 1, 3): mean 1.5, Σ a δ² = 0.5 + 0.25 + 2.25 = 3, F = 3 - 2.25 = 0.75.
  EXPECT_DOUBLE_EQ(fisher_score_error(a, std::vector<double>{1, 1, 3}), 0.75);
  // score_errors: δ_j = scale · q·e_j.
  const std::vector<float> q = {1, 2}, errors = {1, 0, 0.5f, -1};
  const std::vector<double> d = score_errors(q, errors, 0.5);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_DOUBLE_EQ(d[0], 0.5);
  EXPECT_DOUBLE_EQ(d[1], -0.75);
  EXPECT_NE(error_of([&] {
              fisher_score_error(a, std::vector<double>{1, 2});
            }).find("lengths"),
            std::string::npos);
}

TEST(AttentionMetrics, RouteFlipAndLargePerturbations) {
  const std::vector<double> s = {1, 3, 2};
  EXPECT_FALSE(argmax_differs<double>(s, std::vector<double>{0, 5, 4}));
  EXPECT_TRUE(argmax_differs<double>(s, std::vector<double>{0, 3, 4}));
  // Very different logits: KL stays finite and equals the definition.
  const std::vector<double> far = {40, -30, 5};
  EXPECT_NEAR(softmax_kl<double>(s, far), brute_force_kl(s, far), 1e-9);
  // Float logits give the same KL as their double values.
  const std::vector<float> sf = {1, 3, 2}, ff = {0.5f, 3.25f, 2};
  EXPECT_NEAR(softmax_kl<float>(sf, ff),
              brute_force_kl(std::vector<double>(sf.begin(), sf.end()),
                             std::vector<double>(ff.begin(), ff.end())),
              1e-14);
}

TEST(AttentionMetrics, A2SurrogateIsTheExpectedReadoutErrorUnderIndependentNoise) {
  std::mt19937 rng(4);
  const size_t n = 24, d = 8;
  const std::vector<double> a = softmax_weights<double>(random_doubles(rng, n, 1.5));
  std::vector<double> variance(n);  // E||ε_j||², each channel N(0, variance_j / d)
  std::uniform_real_distribution<double> uniform(0.1, 2.0);
  for (double& v : variance) v = uniform(rng);
  const double predicted = a2_surrogate(a, variance);
  EXPECT_GT(predicted, 0);
  const int trials = 20000;
  double sum = 0, sum_squares = 0;
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> errors(n * d);
  for (int trial = 0; trial < trials; ++trial) {
    for (size_t j = 0; j < n; ++j)
      for (size_t c = 0; c < d; ++c)
        errors[j * d + c] = static_cast<float>(normal(rng) * std::sqrt(variance[j] / d));
    const std::vector<double> readout = weighted_sum(a, errors);
    double e = 0;
    for (double x : readout) e += x * x;
    sum += e;
    sum_squares += e * e;
  }
  const double mean = sum / trials;
  const double standard_error = std::sqrt((sum_squares / trials - mean * mean) / trials);
  EXPECT_NEAR(mean, predicted, 4 * standard_error);
  // Σ_j a_j² σ_j² by hand for two positions.
  EXPECT_DOUBLE_EQ(a2_surrogate(std::vector<double>{0.75, 0.25}, std::vector<double>{2, 4}),
                   0.5625 * 2 + 0.0625 * 4);
}

TEST(AttentionMetrics, CorrelationsOnHandComputedCases) {
  const std::vector<double> x = {1, 2, 3, 4, 5};
  EXPECT_NEAR(pearson_correlation(x, std::vector<double>{2, 4, 6, 8, 10}), 1, 1e-15);
  EXPECT_NEAR(pearson_correlation(x, std::vector<double>{5, 4, 3, 2, 1}), -1, 1e-15);
  // dx = (-1, 0, 1), dy = (-1, 1, 0): 1 / sqrt(2 · 2).
  EXPECT_NEAR(pearson_correlation(std::vector<double>{1, 2, 3}, std::vector<double>{1, 3, 2}), 0.5,
              1e-15);
  // Spearman only sees the order: any increasing map gives 1.
  EXPECT_NEAR(spearman_correlation(x, std::vector<double>{1, 10, 100, 1000, 1e6}), 1, 1e-15);
  // Ties share the average rank: (1, 2, 2, 3) -> (1, 2.5, 2.5, 4).
  const std::vector<double> tied = {1, 2, 2, 3};
  const std::vector<double> ranks = average_ranks(tied);
  EXPECT_EQ(ranks, (std::vector<double>{1, 2.5, 2.5, 4}));
  EXPECT_EQ(average_ranks(std::vector<double>{3, 1, 3, 3}), (std::vector<double>{3, 1, 3, 3}));
  // Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 · 5).
  EXPECT_NEAR(spearman_correlation(tied, std::vector<double>{10, 20, 30, 40}),
              4.5 / std::sqrt(4.5 * 5), 1e-15);
  // Undefined for a constant side or fewer than two values.
  EXPECT_TRUE(std::isnan(pearson_correlation(x, std::vector<double>{1, 1, 1, 1, 1})));
  EXPECT_TRUE(std::isnan(spearman_correlation(std::vector<double>{2}, std::vector<double>{3})));
}

// One head's basis: the first `span` of `dim` orthonormal rows carry the query energy.
HeadqBasis span_basis(int64_t dim, int64_t span) {
  HeadqBasis b;
  b.fingerprint = "test";
  b.layers = 1;
  b.kv_heads = 1;
  b.head_dim = dim;
  b.rank = dim;
  b.query_vectors = random_orthonormal_rows(dim, dim, 99);
  b.key_vectors = b.query_vectors;
  b.query_eigenvalues.assign(dim, 0.0);
  for (int64_t i = 0; i < span; ++i) b.query_eigenvalues[i] = 10.0 - i;
  b.key_eigenvalues = b.query_eigenvalues;
  return b;
}

TEST(KeyPerturbation, QuerySpanRankIsTheFewestEigenvaluesHoldingTheEnergy) {
  const std::vector<double> eig = {5, 3, 1, 1};
  EXPECT_EQ(query_span_rank(eig, 0.5), 1);
  EXPECT_EQ(query_span_rank(eig, 0.8), 2);
  EXPECT_EQ(query_span_rank(eig, 0.81), 3);
  EXPECT_EQ(query_span_rank(eig, 1.0), 4);
  EXPECT_NE(error_of([&] { query_span_rank(eig, 0); }).find("energy"), std::string::npos);
}

TEST(KeyPerturbation, NullSpacePerturbationLeavesScoresOfSpanQueriesUnchanged) {
  const int64_t d = 16, span = 6, tokens = 40;
  const HeadqBasis basis = span_basis(d, span);
  std::mt19937 rng(5);
  const std::vector<float> keys = test_support::random_vector(rng, tokens * d, 2.0f);
  const AnalyzeKeySpec spec = parse_analyze_key_spec("null:a1.5");
  EXPECT_EQ(spec.text(), "null:a1.5");
  std::vector<int64_t> ranks;
  const std::vector<float> perturbed =
      perturbed_keys(spec, keys, {}, 1, d, 0, basis, 0.999, &ranks);
  EXPECT_EQ(ranks, std::vector<int64_t>{span});
  // Key error: ||p_j|| = 1.5 ||k_j||, so the key MSE is 2.25 times the mean key energy.
  double error = 0, energy = 0;
  for (int64_t i = 0; i < tokens * d; ++i) {
    error += (double(perturbed[i]) - keys[i]) * (double(perturbed[i]) - keys[i]);
    energy += double(keys[i]) * keys[i];
  }
  EXPECT_NEAR(error / energy, 2.25, 1e-4);
  // A query in the span sees the same scores (to float rounding of the stored key).
  for (int trial = 0; trial < 10; ++trial) {
    const std::vector<double> c = random_doubles(rng, span, 1.0);
    std::vector<double> q(d, 0.0);
    for (int64_t r = 0; r < span; ++r)
      for (int64_t i = 0; i < d; ++i) q[i] += c[r] * basis.query_vectors[r * d + i];
    for (int64_t t = 0; t < tokens; ++t) {
      double exact = 0, seen = 0, norm = 0;
      for (int64_t i = 0; i < d; ++i) {
        exact += q[i] * keys[t * d + i];
        seen += q[i] * perturbed[t * d + i];
        norm += std::abs(q[i]) * std::abs(keys[t * d + i]) * 4;
      }
      EXPECT_NEAR(seen, exact, 1e-6 * norm) << "token " << t;
    }
  }
  // A query with a part outside the span does see it.
  std::vector<double> outside(d, 0.0);
  for (int64_t i = 0; i < d; ++i) outside[i] = basis.query_vectors[(d - 1) * d + i];
  double moved = 0;
  for (int64_t i = 0; i < d; ++i) moved += outside[i] * (double(perturbed[i]) - keys[i]);
  EXPECT_GT(std::abs(moved), 1e-3);
}

TEST(KeyPerturbation, MovedErrorsKeepTheirLengthAndChooseTheirVisibility) {
  const int64_t d = 16, span = 4, tokens = 30;
  const HeadqBasis basis = span_basis(d, span);
  std::mt19937 rng(6);
  const std::vector<float> keys = test_support::random_vector(rng, tokens * d, 1.0f);
  const std::vector<float> errors = test_support::random_vector(rng, tokens * d, 0.2f);
  const std::vector<float> visible = perturbed_keys(
      parse_analyze_key_spec("span:query:int2:g16:tok"), keys, errors, 1, d, 0, basis, 0.999);
  const std::vector<float> hidden = perturbed_keys(parse_analyze_key_spec("span:null:int2:g16:tok"),
                                                   keys, errors, 1, d, 0, basis, 0.999);
  for (int64_t t = 0; t < tokens; ++t) {
    double original = 0, a = 0, b = 0, in_span_a = 0, in_span_b = 0;
    for (int64_t i = 0; i < d; ++i) {
      original += double(errors[t * d + i]) * errors[t * d + i];
      const double ea = double(keys[t * d + i]) - visible[t * d + i];
      const double eb = double(keys[t * d + i]) - hidden[t * d + i];
      a += ea * ea;
      b += eb * eb;
    }
    for (int64_t r = 0; r < span; ++r) {
      double pa = 0, pb = 0;
      for (int64_t i = 0; i < d; ++i) {
        pa += basis.query_vectors[r * d + i] * (double(keys[t * d + i]) - visible[t * d + i]);
        pb += basis.query_vectors[r * d + i] * (double(keys[t * d + i]) - hidden[t * d + i]);
      }
      in_span_a += pa * pa;
      in_span_b += pb * pb;
    }
    EXPECT_NEAR(a, original, 1e-5 * original) << "same key error length, token " << t;
    EXPECT_NEAR(b, original, 1e-5 * original) << "same key error length, token " << t;
    EXPECT_NEAR(in_span_a, original, 1e-5 * original) << "query: the whole error in the span";
    EXPECT_NEAR(in_span_b, 0, 1e-9 * original) << "null: none of it in the span";
  }
}

TEST(KeyPerturbation, SpecsParseAndBadSpecsAreClearErrors) {
  EXPECT_EQ(parse_analyze_key_spec("null").text(), "null:a1");
  EXPECT_EQ(parse_analyze_key_spec("span:null:int2:g64:tok:had").text(),
            "span:null:int2:g64:tok:had");
  EXPECT_EQ(parse_analyze_key_spec("int2:g64:tok+headq:r8:s4").text(), "int2:g64:tok+headq:r8:s4");
  EXPECT_TRUE(parse_analyze_key_spec("null:a2").needs_basis());
  EXPECT_FALSE(parse_analyze_key_spec("int2:g64:tok").needs_basis());
  EXPECT_FALSE(parse_analyze_key_spec("int2:g64:tok+headq:r8:s4:random").needs_basis());
  for (const char* bad :
       {"null:a0", "null:a-1", "null:x1", "null:a1:a2", "null:anan", "span:", "span:query",
        "span:sideways:int2:g64:tok", "span:query:int5:g64:tok", "int2", "bogus"}) {
    const std::string message = error_of([&] { parse_analyze_key_spec(bad); });
    EXPECT_NE(message, "<no error>") << bad;
    EXPECT_NE(message.find("'"), std::string::npos) << bad << ": " << message;
  }
  // A basis holding fewer vectors than the query span needs.
  HeadqBasis small = span_basis(16, 6);
  small.rank = 4;
  small.query_vectors.resize(4 * 16);
  std::vector<float> keys(16, 1.0f);
  EXPECT_NE(error_of([&] {
              perturbed_keys(parse_analyze_key_spec("null"), keys, {}, 1, 16, 0, small, 0.999);
            }).find("calibrate with --rank 16"),
            std::string::npos);
}

}  // namespace
}  // namespace visikv

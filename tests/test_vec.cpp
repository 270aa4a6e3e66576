// The vectorized row functions (core/vec.h) on every instruction set this CPU can run:
// against float64 references on fresh random rows of every tail length, the special values
// (NaN, infinities, the subnormal range), and each element independent of the row it is in.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/vec.h"

namespace visikv {
namespace {

using test_support::available_targets;
using test_support::TargetGuard;

std::vector<float> random_row(std::mt19937& rng, size_t n, float low, float high) {
  std::uniform_real_distribution<float> value(low, high);
  std::vector<float> row(n);
  for (float& v : row) v = value(rng);
  return row;
}

// |got - want| within `ulps` float spacings of want (absolute near the subnormal range).
void expect_close(float got, double want, double ulps) {
  const double spacing = std::max(std::abs(want) * std::numeric_limits<float>::epsilon(),
                                  double{std::numeric_limits<float>::denorm_min()});
  EXPECT_LE(std::abs(got - want), ulps * spacing) << "got " << got << ", want " << want;
}

TEST(VecMath, ExpShiftedMatchesFloat64OnEveryTarget) {
  std::mt19937 rng(std::random_device{}());
  for (const std::string& target : available_targets()) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    for (size_t n = 0; n <= 70; ++n) {
      // Scores down to the subnormal range and below it (exp < 2^-149 gives 0).
      std::vector<float> row = random_row(rng, n, -110.0f, 3.0f);
      const float shift = 3.0f;
      const std::vector<float> original = row;
      const float sum = vec::exp_shifted(row, shift);
      double want_sum = 0;
      for (size_t i = 0; i < n; ++i) {
        // The difference is rounded to float first, as in the function (and in any float softmax).
        const double want = std::exp(double{original[i] - shift});
        expect_close(row[i], want, 4);
        want_sum += row[i];
      }
      EXPECT_NEAR(sum, want_sum, 1e-6 * std::max(want_sum, 1.0));
    }
  }
}

TEST(VecMath, EachElementIndependentOfItsRow) {
  // Decode and prefill call exp on different spans of the same scores: an element's result may
  // depend only on its value and the shift.
  std::mt19937 rng(std::random_device{}());
  const std::vector<float> scores = random_row(rng, 301, -30.0f, 0.0f);
  for (const std::string& target : available_targets()) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    std::vector<float> whole = scores;
    vec::exp_shifted(whole, 0.5f);
    for (size_t first : {1u, 7u, 13u, 100u}) {
      std::vector<float> part(scores.begin() + first, scores.end() - first / 2);
      vec::exp_shifted(part, 0.5f);
      for (size_t i = 0; i < part.size(); ++i)
        ASSERT_EQ(std::memcmp(&part[i], &whole[first + i], sizeof(float)), 0) << first << " " << i;
    }
  }
}

TEST(VecMath, SpecialValues) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const std::string& target : available_targets()) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    // Every position of a full vector and of a tail.
    for (size_t n : {1u, 5u, 16u, 19u, 37u})
      for (size_t at = 0; at < n; ++at) {
        std::vector<float> row(n, -1.0f);
        row[at] = nan;
        EXPECT_TRUE(std::isnan(vec::max_value(row))) << n << " " << at;
        EXPECT_TRUE(std::isnan(vec::log_sum_exp(row))) << n << " " << at;
        vec::exp_shifted(row, 0.0f);
        EXPECT_TRUE(std::isnan(row[at]));
        row.assign(n, -1.0f);
        row[at] = 2.0f;
        EXPECT_EQ(vec::max_value(row), 2.0f);
      }
    std::vector<float> row = {-kInf, 0.0f, 100.0f, -200.0f, 1e30f, -1e30f, 88.0f, 89.0f};
    vec::exp_shifted(row, 0.0f);
    EXPECT_EQ(row[0], 0.0f);
    EXPECT_EQ(row[1], 1.0f);  // exp(0) exactly, so a softmax's largest score weighs exp(0)
    EXPECT_EQ(row[2], kInf);
    EXPECT_EQ(row[3], 0.0f);
    EXPECT_EQ(row[4], kInf);
    EXPECT_EQ(row[5], 0.0f);
    expect_close(row[6], std::exp(88.0), 4);
    EXPECT_EQ(row[7], kInf);
    EXPECT_EQ(vec::max_value({}), -kInf);
    EXPECT_EQ(vec::log_sum_exp(std::vector<float>{-kInf, -kInf}), -kInf);
    EXPECT_EQ(vec::log_sum_exp(std::vector<float>{1.0f, kInf}), kInf);
  }
}

TEST(VecMath, LogSumExpOfAVocabulary) {
  std::mt19937 rng(std::random_device{}());
  for (const std::string& target : available_targets()) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    for (size_t n : {1u, 2u, 31u, 49152u, 151936u + 3u}) {
      const std::vector<float> logits = random_row(rng, n, -20.0f, 25.0f);
      const double max = *std::max_element(logits.begin(), logits.end());
      long double sum = 0;
      for (float v : logits) sum += std::exp(static_cast<long double>(v) - max);
      const double want = max + static_cast<double>(std::log(sum));
      EXPECT_NEAR(vec::log_sum_exp(logits), want, 1e-6 * std::abs(want) + 1e-6) << n;
      EXPECT_EQ(vec::max_value(logits), max);
    }
  }
}

// An elementwise activation on every instruction set the CPU runs: rows of every length 0-40 drawn
// from [lo, hi], each value checked by check(x, got); then values far out, which must give exactly
// far_want.
template <typename Apply, typename Check>
void expect_activation(float lo, float hi, Apply apply, Check check, std::vector<float> far,
                       const std::vector<float>& far_want) {
  std::mt19937 rng(std::random_device{}());
  for (const std::string& target : available_targets()) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    for (size_t n = 0; n <= 40; ++n) {
      std::vector<float> row = random_row(rng, n, lo, hi);
      const std::vector<float> original = row;
      apply(row);
      for (size_t i = 0; i < n; ++i) check(double{original[i]}, row[i]);
    }
    std::vector<float> got = far;
    apply(got);
    for (size_t i = 0; i < far.size(); ++i) EXPECT_EQ(got[i], far_want[i]) << "x " << far[i];
  }
}

TEST(VecMath, SiluMatchesFloat64) {
  expect_activation(
      -30.0f, 30.0f, [](std::vector<float>& row) { vec::silu(row); },
      [](double x, float got) { expect_close(got, x / (1 + std::exp(-x)), 6); },
      {-1000.0f, -200.0f, 200.0f, 0.0f}, {0.0f, 0.0f, 200.0f, 0.0f});
}

// Within a few float32 ulps of float64, plus what rounding u = sqrt(2/pi) (v + 0.044715 v^3) to
// float32 moves (the float32 formula of transformers moves as much: far left of zero both are
// within 1e-6 |v| of 0).
TEST(VecMath, GeluTanhMatchesFloat64) {
  expect_activation(
      -12.0f, 12.0f, [](std::vector<float>& row) { vec::gelu_tanh(row); },
      [](double x, float got) {
        const double u = std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x);
        const double want = 0.5 * x * (1.0 + std::tanh(u));
        const double eps = std::numeric_limits<float>::epsilon();
        EXPECT_LE(std::abs(got - want), 8 * eps * std::abs(want) + 4 * eps * std::abs(x))
            << "x " << x << " got " << got << " want " << want;
      },
      {-1000.0f, -200.0f, 200.0f, 0.0f, 1000.0f}, {0.0f, 0.0f, 200.0f, 0.0f, 1000.0f});
}

}  // namespace
}  // namespace visikv

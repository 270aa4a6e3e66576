#include <gtest/gtest.h>

#include <map>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/eval/perplexity.h"
#include "visikv/eval/sampler.h"

namespace visikv {
namespace {

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  Sampler greedy({});
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(greedy.next(logits), 1);
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  const std::vector<float> logits = {0.3f, 0.1f, 0.9f, 0.8f};
  Sampler top_k({.temperature = 1.0, .top_k = 1, .top_p = 1.0, .seed = 5});
  Sampler top_p({.temperature = 1.0, .top_k = 0, .top_p = 1e-6, .seed = 5});
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(top_k.next(logits), 2);
    EXPECT_EQ(top_p.next(logits), 2);
  }
}

TEST(Sampler, SameSeedSameTokensAndFrequenciesFollowSoftmax) {
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler a({.temperature = 1.0, .top_k = 0, .top_p = 1.0, .seed = 42});
  Sampler b({.temperature = 1.0, .top_k = 0, .top_p = 1.0, .seed = 42});
  std::map<int32_t, int> counts;
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    const int32_t t = a.next(logits);
    EXPECT_EQ(t, b.next(logits));
    ++counts[t];
  }
  EXPECT_NEAR(counts[0] / double(draws), 0.5, 0.02);
  EXPECT_NEAR(counts[1] / double(draws), 0.3, 0.02);
  EXPECT_NEAR(counts[2] / double(draws), 0.2, 0.02);
}

TEST(Sampler, RejectsBadOptions) {
  EXPECT_THROW(Sampler({.temperature = -1.0}), Error);
  EXPECT_THROW(Sampler({.temperature = 1.0, .top_k = -2}), Error);
  EXPECT_THROW(Sampler({.temperature = 1.0, .top_k = 0, .top_p = 0.0}), Error);
}

TEST(Perplexity, NegativeLogLikelihoodIsLogSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 3.0f};
  const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0));
  // The exponentials are float32 (summed in double): a few units in the seventh digit.
  EXPECT_NEAR(negative_log_likelihood(logits, 0), lse - 1.0, 1e-6);
  EXPECT_NEAR(negative_log_likelihood(logits, 2), lse - 3.0, 1e-6);
  EXPECT_NE(negative_log_likelihood(logits, 0), negative_log_likelihood(logits, 1));
  EXPECT_THROW(negative_log_likelihood(logits, 3), Error);
}

}  // namespace
}  // namespace visikv

// Dense caches and causal attention against a float64 reference on random inputs.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <vector>

#include "test_support.h"
#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/dense_cache.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

// out[t][h] = softmax(scale * q·k_j over visible j) · v, in double.
std::vector<double> reference_attention(const std::vector<float>& q, const std::vector<float>& k,
                                        const std::vector<float>& v, int64_t tokens, int64_t heads,
                                        int64_t kv_heads, int64_t d, double scale, int64_t window) {
  std::vector<double> out(tokens * heads * d, 0.0);
  const int64_t group = heads / kv_heads;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kv = h / group;
      const int64_t first = window > 0 ? std::max<int64_t>(0, t - window + 1) : 0;
      std::vector<double> s;
      for (int64_t j = first; j <= t; ++j) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += double(q[(t * heads + h) * d + c]) * k[(j * kv_heads + kv) * d + c];
        s.push_back(dot * scale);
      }
      const double max = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - max));
      for (int64_t j = first; j <= t; ++j)
        for (int64_t c = 0; c < d; ++c)
          out[(t * heads + h) * d + c] += s[j - first] / sum * v[(j * kv_heads + kv) * d + c];
    }
  }
  return out;
}

struct AttentionCase {
  DenseFormat format;
  int64_t window;
  bool prefill;  // all tokens at once, or one at a time
  double tolerance;
};

class AttentionTest : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionTest, MatchesFloat64Reference) {
  const AttentionCase p = GetParam();
  const int64_t tokens = 37, heads = 6, kv_heads = 2, d = 24;
  std::mt19937 rng(1234);
  const auto q = random_vector(rng, tokens * heads * d);
  const auto k = random_vector(rng, tokens * kv_heads * d);
  const auto v = random_vector(rng, tokens * kv_heads * d);
  const double scale = 1.0 / std::sqrt(double(d));
  auto cache = make_dense_cache({1, kv_heads, d}, p.format, 0, 8);
  std::vector<float> out(tokens * heads * d, NAN);  // poisoned
  const AttentionSpec spec{heads, d, scale, p.window};
  if (p.prefill) {
    cache->append(0, k, v, tokens);
    attend_causal(*cache, 0, q, tokens, 0, spec, out);
  } else {
    for (int64_t t = 0; t < tokens; ++t) {
      cache->append(0, std::span(k).subspan(t * kv_heads * d, kv_heads * d),
                    std::span(v).subspan(t * kv_heads * d, kv_heads * d), 1);
      attend_causal(*cache, 0, std::span(q).subspan(t * heads * d, heads * d), 1, t, spec,
                    std::span(out).subspan(t * heads * d, heads * d));
    }
  }
  const auto expected = reference_attention(q, k, v, tokens, heads, kv_heads, d, scale, p.window);
  double worst = 0;
  for (size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::abs(out[i] - expected[i]));
  EXPECT_LT(worst, p.tolerance);
  EXPECT_EQ(cache->length(0), tokens);
}

INSTANTIATE_TEST_SUITE_P(Formats, AttentionTest,
                         ::testing::Values(AttentionCase{DenseFormat::F32, 0, true, 1e-5},
                                           AttentionCase{DenseFormat::F32, 0, false, 1e-5},
                                           AttentionCase{DenseFormat::F32, 5, true, 1e-5},
                                           AttentionCase{DenseFormat::F32, 5, false, 1e-5},
                                           AttentionCase{DenseFormat::F16, 0, true, 5e-3},
                                           AttentionCase{DenseFormat::BF16, 0, false, 3e-2}));

// Queries over more than 2048 positions read them in parts merged by log-sum-exp, shared among
// the threads in decode: the result must match float64, and decode must equal prefill and one
// thread two, bit for bit, for dense and quantized caches, for a selector that hands over its
// scores (exact top-k) and one that does not, and for the certified choice that decode makes in
// steps shared among the threads (Support::choice_steps).
struct LongCase {
  const char* keys;
  const char* values;
  const char* selector;
  double tolerance;  // against float64 with the cache's stored keys and values (dense only)
};

class LongAttentionTest : public ::testing::TestWithParam<LongCase> {};

TEST_P(LongAttentionTest, PartsMergeExactlyAndDecodeEqualsPrefill) {
  const LongCase p = GetParam();
  const int64_t n = 5000, heads = 6, kv_heads = 2, d = 16, queries = 3;
  std::mt19937 rng(99);
  // Keys scaled up so that the softmax is peaked and the parts' maxima differ.
  auto k = random_vector(rng, n * kv_heads * d);
  for (float& x : k) x *= 3.0f;
  const auto v = random_vector(rng, n * kv_heads * d);
  const auto q = random_vector(rng, queries * heads * d);
  const double scale = 1.0 / std::sqrt(double(d));
  const AttentionSpec spec{heads, d, scale, 0};
  auto cache = make_cache({1, kv_heads, d}, p.keys, p.values);
  prepare_summaries(*cache, parse_selector_spec(p.selector), nullptr);  // sketches, if read
  cache->append(0, k, v, n);

  int64_t most_keys = 0;  // the most keys one query head of the last query read
  auto run = [&](int64_t tokens, int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    auto support = make_support(p.selector);
    std::vector<float> out(tokens * heads * d, NAN);  // poisoned
    std::vector<SparseQueryStats> stats(tokens * heads);
    attend(*cache, 0, std::span(q).subspan((queries - tokens) * heads * d, tokens * heads * d),
           tokens, n - tokens, spec, *support, out, stats);
    omp_set_num_threads(saved);
    for (int64_t h = 0; h < heads; ++h)
      most_keys = std::max(most_keys, keys_read(support->spec(), stats[(tokens - 1) * heads + h]));
    return std::vector<float>(out.end() - heads * d, out.end());  // the last query's row
  };
  const auto prefill = run(queries, 2), decode_two = run(1, 2), decode_one = run(1, 1);
  for (int64_t i = 0; i < heads * d; ++i) {
    ASSERT_TRUE(std::isfinite(prefill[i])) << i;
    EXPECT_EQ(decode_two[i], prefill[i]) << i;
    EXPECT_EQ(decode_one[i], prefill[i]) << i;
  }
  // The certified choice read its keys in several parts (of 1024), its bounds in three (of 2048).
  if (parse_selector_spec(p.selector).sketch_bits > 0) EXPECT_GT(most_keys, 2048) << p.selector;
  RecordProperty("most_keys_read", str_cat(most_keys));
  if (p.tolerance > 0) {
    // The last query over every position (the support of dense and of top-k with k >= n).
    std::vector<float> q_last(q.end() - heads * d, q.end());
    double worst = 0;
    const int64_t group = heads / kv_heads;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kv = h / group;
      std::vector<double> s(n);
      for (int64_t j = 0; j < n; ++j) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += double(q_last[h * d + c]) * k[(j * kv_heads + kv) * d + c];
        s[j] = dot * scale;
      }
      const double max = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - max));
      for (int64_t c = 0; c < d; ++c) {
        double o = 0;
        for (int64_t j = 0; j < n; ++j) o += s[j] / sum * v[(j * kv_heads + kv) * d + c];
        worst = std::max(worst, std::abs(o - prefill[h * d + c]));
      }
    }
    EXPECT_LT(worst, p.tolerance);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Caches, LongAttentionTest,
    ::testing::Values(LongCase{"f32", "f32", "dense", 1e-5},
                      LongCase{"f32", "f32", "sparse:k4500:exact", 0},
                      LongCase{"f32", "f32", "sparse:a4:w1000:k2000:exact", 0},
                      LongCase{"int4:g16:tok", "int4:g16:tok", "dense", 0},
                      LongCase{"int2:g16:chan:r128", "f16", "sparse:a1:w2500:k64:centroid", 0},
                      // The choice made in steps, the bound pass and the
                      // read keys' scores in parts shared by the threads.
                      LongCase{"f16", "f16", "certified:a1:w64:eps0.01:p8", 0},
                      LongCase{"f32", "f32", "certified:a1:w64:eps0.01:p6:gqa=head", 0}));

// Dense prefill reads the cache in tiles of tokens (attention.cpp, attend_tile): every token's
// output must still be the bits of decoding that token alone, for every codec family (float
// rows, half rows read into floats, paired and plain 4-bit codes, per-channel codes), across the
// 2048-position part boundary inside a tile, with and without a sliding window (one that the
// tile's tokens share most of, one too short to share anything, one longer than a part), on one
// thread and two.
struct TileCase {
  const char* keys;
  const char* values;
  int64_t window;
};
class PrefillTileTest : public ::testing::TestWithParam<TileCase> {};

TEST_P(PrefillTileTest, EveryTokenEqualsItsDecode) {
  const TileCase p = GetParam();
  const int64_t n = 2100, tokens = 70, heads = 6, kv_heads = 2, d = 64;
  std::mt19937 rng(std::random_device{}());
  auto k = random_vector(rng, n * kv_heads * d);
  for (float& x : k) x *= 2.0f;
  const auto v = random_vector(rng, n * kv_heads * d);
  const auto q = random_vector(rng, tokens * heads * d);
  const AttentionSpec spec{heads, d, 1.0 / std::sqrt(double(d)), p.window};
  auto cache = make_cache({1, kv_heads, d}, p.keys, p.values);
  cache->append(0, k, v, n);
  const int64_t first = n - tokens;  // positions 2030 .. 2099: supports of 2031 .. 2100
  const auto attend_with = [&](int threads, int64_t count, int64_t from) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> out(count * heads * d, NAN);  // poisoned
    attend_causal(*cache, 0, std::span(q).subspan(from * heads * d, count * heads * d), count,
                  first + from, spec, out);
    omp_set_num_threads(saved);
    return out;
  };
  for (int threads : {1, 2}) {
    SCOPED_TRACE(std::to_string(threads) + " threads");
    const std::vector<float> prefill = attend_with(threads, tokens, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      const std::vector<float> decode = attend_with(1, 1, t);
      for (int64_t i = 0; i < heads * d; ++i) {
        ASSERT_TRUE(std::isfinite(decode[i]));
        ASSERT_EQ(prefill[t * heads * d + i], decode[i]) << "token " << t << ", value " << i;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Codecs, PrefillTileTest,
                         ::testing::Values(TileCase{"f32", "f32", 0}, TileCase{"f16", "bf16", 0},
                                           TileCase{"int4:g32:tok", "int4:g32:tok", 0},
                                           TileCase{"int4:g16:tok", "int8:g64:tok", 0},
                                           TileCase{"int2:g16:chan:r128", "int3:g64:tok", 0},
                                           TileCase{"f16", "int4:g32:tok", 1000},
                                           TileCase{"int4:g32:tok", "f16", 8},
                                           TileCase{"f16", "f16", 2060}));

TEST(DenseCache, ScoreAndAccumulateOverIndexListsMatchRanges) {
  const int64_t d = 16, n = 40;
  std::mt19937 rng(7);
  auto cache = make_dense_cache({2, 1, d}, DenseFormat::F32);
  const auto k = random_vector(rng, n * d), v = random_vector(rng, n * d);
  cache->append(1, k, v, n);
  const auto q = random_vector(rng, 2 * d);
  const std::vector<int32_t> picks = {0, 3, 17, 39};
  std::vector<float> scores(2 * picks.size());
  cache->score(1, 0, q, PositionSet::list(picks), scores);
  for (size_t qi = 0; qi < 2; ++qi) {
    for (size_t i = 0; i < picks.size(); ++i) {
      double dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += q[qi * d + c] * k[picks[i] * d + c];
      EXPECT_NEAR(scores[qi * picks.size() + i], dot, 1e-4);
    }
  }
  std::vector<float> weights = {0.5f, 0.25f, 0.125f, 0.125f, 1, 0, 0, 0};
  std::vector<float> out(2 * d, 0.0f);
  cache->accumulate(1, 0, weights, PositionSet::list(picks), out);
  for (int64_t c = 0; c < d; ++c) {
    const double expected =
        0.5 * v[0 * d + c] + 0.25 * v[3 * d + c] + 0.125 * v[17 * d + c] + 0.125 * v[39 * d + c];
    EXPECT_NEAR(out[c], expected, 1e-5);
    EXPECT_NEAR(out[d + c], v[c], 1e-6);
  }
  EXPECT_EQ(cache->length(0), 0);
  EXPECT_THROW(cache->score(0, 0, q, PositionSet::range(0, 1), scores), Error);
  EXPECT_THROW(cache->score(1, 0, q, PositionSet::range(0, n + 1), scores), Error);
}

TEST(DenseCache, BlockSummariesTrackCentroidMinMax) {
  const int64_t d = 8, n = 21, block = 8;
  std::mt19937 rng(3);
  auto cache = make_dense_cache({1, 2, d}, DenseFormat::F16, 0, block);
  const auto k = random_vector(rng, n * 2 * d), v = random_vector(rng, n * 2 * d);
  for (int64_t t = 0; t < n; ++t)  // appended one token at a time, as in decode
    cache->append(0, std::span(k).subspan(t * 2 * d, 2 * d), std::span(v).subspan(t * 2 * d, 2 * d),
                  1);
  // The summaries describe the keys as stored: rounded to f16.
  std::vector<float> stored(k.size());
  for (size_t i = 0; i < k.size(); ++i) stored[i] = fp16_to_float(float_to_fp16(k[i]));
  expect_summaries_match(*cache, stored, n, 2, d, block, 1e-6);
  EXPECT_THROW(cache->summary(0, 0, 3), Error);
}

TEST(DenseCache, RejectsBadShapesAndNames) {
  EXPECT_THROW(make_dense_cache({0, 1, 8}, DenseFormat::F32), Error);
  EXPECT_THROW(make_dense_cache({1, 1, 8}, DenseFormat::F32, 0, 0), Error);
  EXPECT_THROW(dense_format_from_name("int3"), Error);
  auto cache = make_dense_cache({1, 1, 8}, DenseFormat::F32);
  std::vector<float> too_short(7);
  EXPECT_THROW(cache->append(0, too_short, too_short, 1), Error);
  EXPECT_THROW(cache->append(1, too_short, too_short, 0), Error);
}

TEST(Attention, VisiblePositionsFollowCausalAndWindowRules) {
  EXPECT_EQ(visible_positions(0, 0).size(), 1);
  EXPECT_EQ(visible_positions(9, 0).begin(), 0);
  EXPECT_EQ(visible_positions(9, 4).begin(), 6);
  EXPECT_EQ(visible_positions(9, 4).size(), 4);
  EXPECT_EQ(visible_positions(2, 4).begin(), 0);
}

}  // namespace
}  // namespace visikv

// Each Support on its own against a brute-force reference, and the one attention body: dense is
// the full causal range, exact top-k keeps the k highest scores, block rules keep the best
// blocks, certified's bound holds against dense attention, and no rule scores a key twice.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <vector>

#include "test_support.h"
#include "visikv/attention/attention.h"
#include "visikv/attention/block_bounds.h"
#include "visikv/attention/support.h"
#include "visikv/attention/support_dense.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/dense_cache.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

// Forwards to a cache and counts, per (KV head, position), how often a key was scored.
class CountingCache final : public KVCache {
 public:
  explicit CountingCache(KVCache& inner) : inner_(inner) {}
  const CacheShape& shape() const override { return inner_.shape(); }
  std::string describe() const override { return inner_.describe(); }
  int64_t length(int64_t layer) const override { return inner_.length(layer); }
  void append(int64_t layer, std::span<const float> keys, std::span<const float> values,
              int64_t tokens) override {
    inner_.append(layer, keys, values, tokens);
  }
  void score(int64_t layer, int64_t kv_head, std::span<const float> queries,
             const PositionSet& positions, std::span<float> scores) const override {
    {
      std::lock_guard lock(mutex_);
      for (int64_t i = 0; i < positions.size(); ++i) ++scored_[{kv_head, positions[i]}];
    }
    inner_.score(layer, kv_head, queries, positions, scores);
  }
  void accumulate(int64_t layer, int64_t kv_head, std::span<const float> weights,
                  const PositionSet& positions, std::span<float> out) const override {
    inner_.accumulate(layer, kv_head, weights, positions, out);
  }
  int64_t block_size() const override { return inner_.block_size(); }
  BlockSummaryTable summaries(int64_t layer, int64_t kv_head) const override {
    return inner_.summaries(layer, kv_head);
  }
  void clear() override { inner_.clear(); }

  const std::map<std::pair<int64_t, int64_t>, int>& scored() const { return scored_; }
  void forget() { scored_.clear(); }

 private:
  KVCache& inner_;
  mutable std::mutex mutex_;
  mutable std::map<std::pair<int64_t, int64_t>, int> scored_;
};

// One layer of random keys and values, {n, kv_heads, d}, and queries {n, heads, d}.
struct Layer {
  int64_t n, heads, kv_heads, d, block;
  std::vector<float> q, k, v;
  std::unique_ptr<KVCache> cache;
  AttentionSpec spec;

  // concentrated: keys are small noise and one in 16 also carries 6 e_0, which every query
  // (6 e_0 + noise) seeks, so attention sits on few positions and certified can stop early.
  Layer(int64_t n_, int64_t heads_, int64_t kv_heads_, int64_t d_, int64_t block_, uint32_t seed,
        int64_t model_window = 0, bool concentrated = false)
      : n(n_), heads(heads_), kv_heads(kv_heads_), d(d_), block(block_) {
    std::mt19937 rng(seed);
    q = random_vector(rng, n * heads * d);
    k = random_vector(rng, n * kv_heads * d);
    v = random_vector(rng, n * kv_heads * d);
    if (concentrated) {
      for (float& x : k) x *= 0.3f;
      for (int64_t j = 0; j < n; j += 16)
        for (int64_t h = 0; h < kv_heads; ++h) k[(j * kv_heads + h) * d] += 6.0f;
      for (float& x : q) x *= 0.3f;
      for (int64_t i = 0; i < n * heads; ++i) q[i * d] += 6.0f;
    }
    cache = make_dense_cache({1, kv_heads, d}, DenseFormat::F32, n, block);
    cache->append(0, k, v, n);
    spec = {heads, d, 1.0 / std::sqrt(double(d)), model_window};
  }
  int64_t group() const { return heads / kv_heads; }
  std::span<const float> group_queries(int64_t t, int64_t kv) const {
    return std::span(q).subspan((t * heads + kv * group()) * d, group() * d);
  }
  // What attend() asks a support for the query at t and KV head kv (gqa=shared).
  SupportQuery query(int64_t t, int64_t kv) const {
    return {*cache,     0,    kv,  kv, t, group_queries(t, kv), group(), spec.sliding_window,
            spec.scale, true, true};
  }
  std::vector<float> raw_scores(int64_t t, int64_t kv, const PositionSet& positions) const {
    std::vector<float> scores(group() * positions.size());
    cache->score(0, kv, group_queries(t, kv), positions, scores);
    return scores;
  }
};

std::vector<int64_t> positions_of(const PositionSet& set) {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < set.size(); ++i) out.push_back(set[i]);
  return out;
}

// Chooses the support of (t, kv) with a fresh scratch, as attend() would.
ChosenSupport choose(Support& support, const Layer& layer, int64_t t, int64_t kv,
                     SupportScratch& scratch, SparseQueryStats& stats) {
  support.prepare(*layer.cache, layer.spec);
  scratch.deltas.assign(static_cast<size_t>(layer.group()), NAN);
  return support.choose(layer.query(t, kv), scratch, stats);
}

TEST(AttentionSupport, DenseIsTheFullCausalRange) {
  for (int64_t model_window : {0, 5}) {
    const Layer layer(24, 4, 2, 8, 4, 1, model_window);
    DenseSupport dense;
    SupportScratch scratch;
    for (int64_t t = 0; t < layer.n; ++t) {
      SparseQueryStats stats;
      const ChosenSupport chosen = choose(dense, layer, t, 1, scratch, stats);
      EXPECT_FALSE(chosen.scored);
      ASSERT_TRUE(chosen.positions.is_range());
      const int64_t lo = model_window > 0 ? std::max<int64_t>(0, t - model_window + 1) : 0;
      EXPECT_EQ(chosen.positions.begin(), lo) << t;
      EXPECT_EQ(chosen.positions.end(), t + 1) << t;
    }
    // The body over the dense support is attend_causal, and a "dense" spec names it.
    const std::unique_ptr<Support> named = make_support("dense");
    std::vector<float> a(layer.n * layer.heads * layer.d), b(a.size());
    attend_causal(*layer.cache, 0, layer.q, layer.n, 0, layer.spec, a);
    attend(*layer.cache, 0, layer.q, layer.n, 0, layer.spec, *named, b);
    EXPECT_EQ(a, b);
  }
}

TEST(AttentionSupport, ExactTopKKeepsTheKHighestScores) {
  const Layer layer(70, 6, 2, 16, 8, 2);
  const int64_t anchors = 2, window = 5, k = 9;
  const std::unique_ptr<Support> support =
      make_support("sparse:a2:w5:k9:exact");  // anchors, window and k as above
  SupportScratch scratch;
  for (int64_t t = anchors + window + k + 1; t < layer.n; t += 7) {
    for (int64_t kv = 0; kv < layer.kv_heads; ++kv) {
      SparseQueryStats stats;
      const ChosenSupport chosen = choose(*support, layer, t, kv, scratch, stats);
      // Brute force: every candidate's score pooled by the max over the group, the k best
      // (ties to the lower position).
      const int64_t begin = anchors, end = t + 1 - window;
      const std::vector<float> raw = layer.raw_scores(t, kv, PositionSet::range(begin, end));
      const int64_t m = end - begin;
      std::vector<std::pair<float, int64_t>> ranked;
      for (int64_t i = 0; i < m; ++i) {
        float best = -INFINITY;
        for (int64_t g = 0; g < layer.group(); ++g) best = std::max(best, raw[g * m + i]);
        ranked.push_back({best, begin + i});
      }
      std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      std::vector<int64_t> expected;
      for (int64_t j = 0; j < anchors; ++j) expected.push_back(j);
      for (int64_t i = 0; i < k; ++i) expected.push_back(ranked[i].second);
      for (int64_t j = end; j <= t; ++j) expected.push_back(j);
      std::sort(expected.begin(), expected.end());
      EXPECT_EQ(positions_of(chosen.positions), expected) << t << " " << kv;
      EXPECT_EQ(stats.dynamic, k);
      EXPECT_EQ(stats.selection_scores, m);
      // The scores it hands back are the cache's, bit for bit.
      ASSERT_TRUE(chosen.scored);
      const std::vector<float> fresh = layer.raw_scores(t, kv, chosen.positions);
      EXPECT_TRUE(std::equal(fresh.begin(), fresh.end(), scratch.scores.begin()));
    }
  }
}

TEST(AttentionSupport, BlockRulesKeepTheBestBlocks) {
  const Layer layer(96, 4, 2, 16, 8, 3);
  for (const char* rule : {"centroid", "bound"}) {
    const std::unique_ptr<Support> support =
        make_support(std::string("sparse:a1:w8:k16:b8:") + rule);  // two blocks of 8
    SupportScratch scratch;
    for (int64_t t = 40; t < layer.n; t += 9) {
      for (int64_t kv = 0; kv < layer.kv_heads; ++kv) {
        SparseQueryStats stats;
        const ChosenSupport chosen = choose(*support, layer, t, kv, scratch, stats);
        EXPECT_FALSE(chosen.scored);  // it read summaries only
        // Candidates: [1, tail_begin) with the tail = the window and the query's own block.
        const int64_t tail_begin = std::min(t + 1 - 8, (t / 8) * 8);
        const int64_t blocks = (tail_begin - 1) / 8 + 1;
        std::vector<std::pair<float, int64_t>> ranked;
        for (int64_t b = 0; b < blocks; ++b) {
          float best = -INFINITY;
          for (int64_t g = 0; g < layer.group(); ++g) {
            const auto q = layer.group_queries(t, kv).subspan(g * layer.d, layer.d);
            const BlockSummary s = layer.cache->summary(0, kv, b);
            const double value = std::string(rule) == "centroid"
                                     ? block_centroid_score(s, q, layer.spec.scale)
                                     : block_upper_bound(s, q, layer.spec.scale);
            best = std::max(best, static_cast<float>(value));
          }
          ranked.push_back({best, b});
        }
        std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        std::vector<int64_t> expected = {0};
        for (int64_t i = 0; i < 2; ++i)
          for (int64_t j = std::max<int64_t>(1, ranked[i].second * 8);
               j < std::min(tail_begin, (ranked[i].second + 1) * 8); ++j)
            expected.push_back(j);
        for (int64_t j = tail_begin; j <= t; ++j) expected.push_back(j);
        std::sort(expected.begin(), expected.end());
        EXPECT_EQ(positions_of(chosen.positions), expected) << rule << " " << t << " " << kv;
        EXPECT_EQ(stats.summaries_read, blocks);
        EXPECT_EQ(stats.blocks_read, 2);
      }
    }
  }
}

TEST(AttentionSupport, CertifiedBoundHoldsAgainstDenseAttention) {
  const Layer layer(120, 4, 2, 16, 8, 4, 0, true);
  int64_t cuts = 0;
  for (const char* text : {"certified:a1:w8:b8:eps0.05", "certified:a0:w1:b8:eps0.3:gqa=head"}) {
    const std::unique_ptr<Support> support = make_support(text);
    const double epsilon = support->spec().epsilon;
    std::vector<SparseQueryStats> stats(layer.n * layer.heads);
    std::vector<float> sparse(layer.n * layer.heads * layer.d), dense(sparse.size());
    attend(*layer.cache, 0, layer.q, layer.n, 0, layer.spec, *support, sparse, stats);
    attend_causal(*layer.cache, 0, layer.q, layer.n, 0, layer.spec, dense);
    double max_value = 0;
    for (int64_t j = 0; j < layer.n * layer.kv_heads; ++j) {
      double norm = 0;
      for (int64_t c = 0; c < layer.d; ++c)
        norm += double(layer.v[j * layer.d + c]) * layer.v[j * layer.d + c];
      max_value = std::max(max_value, std::sqrt(norm));
    }
    int64_t cut = 0;
    for (int64_t t = 0; t < layer.n; ++t) {
      for (int64_t h = 0; h < layer.heads; ++h) {
        const SparseQueryStats& s = stats[t * layer.heads + h];
        ASSERT_FALSE(std::isnan(s.delta));
        double error = 0;
        for (int64_t c = 0; c < layer.d; ++c) {
          const int64_t i = (t * layer.heads + h) * layer.d + c;
          error += (double(sparse[i]) - dense[i]) * (double(sparse[i]) - dense[i]);
        }
        // ||o_S - o|| <= 2 delta max ||v||, with float32 arithmetic's slack.
        EXPECT_LE(std::sqrt(error), 2 * s.delta * max_value + 1e-5) << text << " " << t << " " << h;
        if (s.support < t + 1) {
          ++cut;
          EXPECT_LE(s.delta, epsilon) << text << " " << t << " " << h;
        }
      }
    }
    cuts += cut;
  }
  EXPECT_GT(cuts, 0);  // the rule did drop positions somewhere
}

// The rules that score keys to choose hand those scores to the body: per query, every key is
// scored once.
TEST(AttentionSupport, NoKeyIsScoredTwice) {
  const Layer layer(80, 4, 2, 16, 8, 5, 0, true);
  CountingCache counting(*layer.cache);
  int64_t certified_cuts = 0;  // certified queries that read fewer than every position
  for (const char* text :
       {"sparse:a1:w8:k12:exact", "sparse:a1:w8:k12:exact:gqa=head", "certified:a1:w8:b8:eps0.05",
        "certified:a1:w8:b8:eps0.3:gqa=head", "sparse:a1:w8:k16:b8:bound", "dense"}) {
    const std::unique_ptr<Support> support = make_support(text);
    const int64_t choices_per_kv = support->heads_per_choice(layer.group()) == 1 ? 2 : 1;
    for (int64_t t : {30, 55, 79}) {
      counting.forget();
      std::vector<float> out(layer.heads * layer.d);
      std::vector<SparseQueryStats> stats(layer.heads);
      attend(counting, 0,
             std::span(layer.q).subspan(t * layer.heads * layer.d, layer.heads * layer.d), 1, t,
             layer.spec, *support, out, stats);
      // Each choice (a KV head's group, or each query head) scores each key at most once.
      for (const auto& [key, times] : counting.scored())
        EXPECT_LE(times, choices_per_kv) << text << " t=" << t << " position " << key.second;
      // What was scored: the support, and for exact top-k every candidate (the rule's
      // definition), but nothing more.
      if (std::string(text).starts_with("certified") && stats[0].support < t + 1) ++certified_cuts;
      const bool exact = std::string(text).find("exact") != std::string::npos;
      for (int64_t kv = 0; kv < layer.kv_heads; ++kv) {
        int64_t scored = 0;
        for (const auto& [key, times] : counting.scored())
          if (key.first == kv) scored += times;
        int64_t expected = 0;
        for (int64_t choice = 0; choice < choices_per_kv; ++choice) {
          const SparseQueryStats& s = stats[kv * layer.group() + choice];
          expected += exact ? t + 1 : s.support;
        }
        EXPECT_EQ(scored, expected) << text << " t=" << t << " kv=" << kv;
      }
    }
  }
  EXPECT_GT(certified_cuts, 0);
}

}  // namespace
}  // namespace visikv

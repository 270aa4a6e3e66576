// Sparse attention selectors and the certified mode, against brute-force recomputations from the
// raw keys and against dense attend_causal.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <vector>

#include "test_support.h"
#include "visikv/attention/attention.h"
#include "visikv/attention/block_bounds.h"
#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/kv/headq.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

// Every observer event, keyed by (position, query head).
class Recorder : public AttentionObserver {
 public:
  struct Event {
    std::vector<int32_t> positions;
    std::vector<float> logits, query;
  };
  void observe(const AttentionEvent& e) override {
    Event copy;
    for (int64_t i = 0; i < e.positions.size(); ++i)
      copy.positions.push_back(static_cast<int32_t>(e.positions[i]));
    copy.logits.assign(e.scores.begin(), e.scores.end());
    copy.query.assign(e.query.begin(), e.query.end());
    std::lock_guard lock(mutex_);
    events_[{e.position, e.head}] = std::move(copy);
  }
  const Event& at(int64_t position, int64_t head) const { return events_.at({position, head}); }
  size_t size() const { return events_.size(); }

 private:
  std::mutex mutex_;
  std::map<std::pair<int64_t, int64_t>, Event> events_;
};

// A synthetic attention problem: keys/values {n, kv_heads, d}, queries {n, heads, d}.
struct Problem {
  int64_t n, heads, kv_heads, d, block;
  std::vector<float> q, k, v;
  std::unique_ptr<KVCache> cache;
  AttentionSpec spec;

  Problem(int64_t n_, int64_t heads_, int64_t kv_heads_, int64_t d_, int64_t block_, uint32_t seed,
          int64_t model_window = 0, DenseFormat format = DenseFormat::F32)
      : n(n_), heads(heads_), kv_heads(kv_heads_), d(d_), block(block_) {
    std::mt19937 rng(seed);
    q = random_vector(rng, n * heads * d);
    k = random_vector(rng, n * kv_heads * d);
    v = random_vector(rng, n * kv_heads * d);
    cache = make_dense_cache({1, kv_heads, d}, format, n, block);
    spec = {heads, d, 1.0 / std::sqrt(double(d)), model_window};
  }
  // Replaces the cache by one in the given codecs (docs/CACHE_SPECS.md), empty.
  void use_codecs(const std::string& key_codec, const std::string& value_codec) {
    cache = make_cache({1, kv_heads, d}, key_codec, value_codec, n, block);
  }
  void fill() { cache->append(0, k, v, n); }
  int64_t group() const { return heads / kv_heads; }
  const float* key(int64_t j, int64_t kv) const { return &k[(j * kv_heads + kv) * d]; }
  const float* value(int64_t j, int64_t kv) const { return &v[(j * kv_heads + kv) * d]; }
  const float* query(int64_t t, int64_t h) const { return &q[(t * heads + h) * d]; }
  double score(int64_t t, int64_t h, int64_t j) const {  // scaled, in double
    double dot = 0;
    for (int64_t c = 0; c < d; ++c) dot += double(query(t, h)[c]) * key(j, h / group())[c];
    return dot * spec.scale;
  }
  std::vector<float> dense() const {
    std::vector<float> out(n * heads * d);
    attend_causal(*cache, 0, q, n, 0, spec, out);
    return out;
  }
  std::vector<float> sparse(Support& selector, std::vector<SparseQueryStats>* stats = nullptr,
                            AttentionObserver* observer = nullptr) const {
    std::vector<float> out(n * heads * d, NAN);
    if (stats != nullptr) stats->assign(n * heads, {});
    attend(*cache, 0, q, n, 0, spec, selector, out,
           stats != nullptr ? std::span(*stats) : std::span<SparseQueryStats>(), observer);
    return out;
  }
};

TEST(SelectorSpec, ParsesAndDescribes) {
  const SelectorSpec s = parse_selector_spec("sparse:a1:w64:k32:b16:centroid:gqa=head:r8");
  EXPECT_EQ(s.kind, SelectorKind::Sparse);
  EXPECT_EQ(s.rule, SelectorRule::Centroid);
  EXPECT_EQ(s.gqa, GqaChoice::PerHead);
  EXPECT_EQ(s.anchors, 1);
  EXPECT_EQ(s.window, 64);
  EXPECT_EQ(s.top_k, 32);
  EXPECT_EQ(s.block_size, 16);
  EXPECT_EQ(s.refresh, 8);
  const SelectorSpec c = parse_selector_spec("certified:w64:eps0.01:a1:b16");
  EXPECT_EQ(c.kind, SelectorKind::Certified);
  EXPECT_DOUBLE_EQ(c.epsilon, 0.01);
  for (const char* text :
       {"dense", "sparse:a1:w64:k32:exact", "sparse:a4:w8", "sparse:a0:w64:k32:bound:r3",
        "certified:a1:w64:b16:eps0.001:gqa=head", "certified:a1:w64:eps1e-05",
        "certified:a1:w64:b16:q16:eps0.01", "sparse:a1:w64:k32:b16:bound:q8",
        "certified:a1:w64:eps0.01:p8", "certified:a1:w64:exact:eps0.01:gqa=head"}) {
    const std::string canonical = describe(parse_selector_spec(text));
    EXPECT_EQ(describe(parse_selector_spec(canonical)), canonical) << text;
  }
  EXPECT_EQ(describe(parse_selector_spec("sparse:k32:exact:w64:a1")),
            "sparse:a1:w64:k32:exact:gqa=shared:r1");
  EXPECT_EQ(parse_selector_spec("certified:a1:w64:eps0.01:q32").frame_rank, 32);
  EXPECT_EQ(parse_selector_spec("certified:a1:w64:eps0.01").frame_rank, 0);
}

TEST(SelectorSpec, BadSpecsAreErrors) {
  for (const char* text : {"",
                           "sparsely",
                           "Dense",
                           "dense:a1",
                           "sparse:x3",
                           "sparse:a1:w64:k0:exact",
                           "sparse:k32",
                           "sparse:exact",
                           "sparse:a-1:w4",
                           "sparse:a1:a2",
                           "sparse:a1:w4:k8:exact:bound",
                           "sparse:a1:w4:k8:b8:exact",
                           "sparse:a1:w64:k32:b0:bound",
                           "sparse:a1:w4:b8",
                           "sparse:a1:w4:k8:exact:r0",
                           "sparse:a1:w4:k8:exact:gqa=group",
                           "sparse:a1::w4",
                           "sparse:a1:w4:eps0.1",
                           "sparse:a99999999999:w4",
                           "sparse:a1x:w4",
                           "certified:a1:w64:b16",
                           "certified:eps0",
                           "certified:eps1",
                           "certified:eps-0.1",
                           "certified:epsnan",
                           "certified:eps0.01:k5",
                           "certified:eps0.01:bound",
                           "certified:eps0.01:r2",
                           "certified:eps0.01:eps0.02",
                           "certified:eps0.01:q0",
                           "certified:eps0.01:q8:q8",
                           "sparse:a1:w4:k8:exact:q8",
                           "sparse:a1:w4:k8:b8:centroid:q8",
                           "sparse:a1:w4:q8",
                           "certified:eps0.1:p1",
                           "certified:eps0.1:p9",
                           "certified:eps0.1:p8:q8",
                           "certified:eps0.01:centroid",
                           "certified:eps0.01:exact:b8",
                           "certified:eps0.01:exact:p8",
                           "certified:eps0.01:exact:q8",
                           "sparse:a1:w4:k8:b8:bound:p8"}) {
    EXPECT_THROW(parse_selector_spec(text), Error) << text;
  }
  try {
    parse_selector_spec("sparse:a1:w64:k32:z9:exact");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown field 'z9'"), std::string::npos) << e.what();
  }
}

TEST(SparseAttention, BadUseIsAnError) {
  Problem p(40, 4, 2, 16, 8, 1);
  p.fill();
  std::vector<float> out(p.heads * p.d);
  const std::span<const float> q(p.q.data(), p.heads * p.d);
  const std::unique_ptr<Support> wrong_block_owner = make_support("sparse:a1:w4:k8:b16:bound");
  Support& wrong_block = *wrong_block_owner;  // the cache summarises blocks of 8
  EXPECT_THROW(attend(*p.cache, 0, q, 1, 39, p.spec, wrong_block, out), Error);
  const std::unique_ptr<Support> certified_wrong_block_owner =
      make_support("certified:a1:w4:b4:eps0.1");
  Support& certified_wrong_block = *certified_wrong_block_owner;
  EXPECT_THROW(attend(*p.cache, 0, q, 1, 39, p.spec, certified_wrong_block, out), Error);
  const std::unique_ptr<Support> ok_owner = make_support("sparse:a1:w4:k8:b8:bound");
  Support& ok = *ok_owner;
  EXPECT_NO_THROW(attend(*p.cache, 0, q, 1, 39, p.spec, ok, out));
  EXPECT_THROW(attend(*p.cache, 0, q, 1, 40, p.spec, ok, out), Error);  // beyond the cache
  AttentionSpec negative = p.spec;
  negative.scale = -1;
  EXPECT_THROW(attend(*p.cache, 0, q, 1, 39, negative, ok, out), Error);
  AttentionSpec odd = p.spec;
  odd.heads = 3;
  EXPECT_THROW(attend(*p.cache, 0, q, 1, 39, odd, ok, out), Error);
  std::vector<SparseQueryStats> short_stats(1);
  EXPECT_THROW(attend(*p.cache, 0, q, 1, 39, p.spec, ok, out, short_stats), Error);
}

// k >= n (or every size beyond the context): the support is every visible position and the
// output is dense attention, bit for bit.
TEST(SparseAttention, FullSupportEqualsDense) {
  for (int64_t model_window : {0, 5}) {
    Problem p(45, 6, 2, 24, 8, 11, model_window);
    p.fill();
    const std::vector<float> dense = p.dense();
    for (const char* text :
         {"dense", "sparse:a1:w4:k1000:exact", "sparse:a0:w0:k45:exact:gqa=head",
          "sparse:a1:w4:k1000:centroid", "sparse:a1:w4:k1000:b8:bound:gqa=head",
          "sparse:a100000:w100000:k100000:exact", "sparse:a2:w100000", "sparse:a100000:w1"}) {
      const std::unique_ptr<Support> selector_owner = make_support(text);
      Support& selector = *selector_owner;
      std::vector<SparseQueryStats> stats;
      const std::vector<float> out = p.sparse(selector, &stats);
      for (size_t i = 0; i < out.size(); ++i)
        ASSERT_EQ(out[i], dense[i]) << text << " window " << model_window << " at " << i;
      for (int64_t t = 0; t < p.n; ++t)
        EXPECT_EQ(stats[t * p.heads].support, visible_positions(t, model_window).size()) << text;
    }
  }
}

// Anchors and window are always read, the support is sorted and duplicate-free, causal, inside a
// sliding-window model's window, and never larger than anchors + window + own block + dynamic.
TEST(SparseAttention, SupportHoldsAnchorsWindowAndIsSorted) {
  for (int64_t model_window : {0, 20}) {
    Problem p(150, 4, 2, 16, 8, 5, model_window);
    p.fill();
    for (const char* text :
         {"sparse:a3:w5:k4:exact", "sparse:a3:w5:k12:b8:centroid:gqa=head", "sparse:a3:w5:k9:bound",
          "sparse:a3:w5", "certified:a3:w5:eps0.2", "certified:a3:w5:eps0.01:gqa=head"}) {
      const std::unique_ptr<Support> selector_owner = make_support(text);
      Support& selector = *selector_owner;
      const SelectorSpec& s = selector.spec();
      Recorder recorder;
      std::vector<SparseQueryStats> stats;
      p.sparse(selector, &stats, &recorder);
      ASSERT_EQ(recorder.size(), static_cast<size_t>(p.n * p.heads));
      for (int64_t t = 0; t < p.n; ++t) {
        const int64_t lo = visible_positions(t, model_window).begin();
        for (int64_t h = 0; h < p.heads; ++h) {
          const std::vector<int32_t>& pos = recorder.at(t, h).positions;
          ASSERT_FALSE(pos.empty());
          EXPECT_TRUE(std::adjacent_find(pos.begin(), pos.end(), std::greater_equal<>()) ==
                      pos.end())
              << text << ": support not strictly increasing at t=" << t;
          EXPECT_GE(pos.front(), lo);
          EXPECT_EQ(pos.back(), t);
          const std::set<int32_t> set(pos.begin(), pos.end());
          for (int64_t j = lo; j < std::min<int64_t>(s.anchors, t + 1); ++j)
            EXPECT_TRUE(set.count(j)) << text << ": anchor " << j << " missing at t=" << t;
          for (int64_t j = std::max(lo, t - s.window + 1); j <= t; ++j)
            EXPECT_TRUE(set.count(j)) << text << ": window " << j << " missing at t=" << t;
          const SparseQueryStats& st = stats[t * p.heads + h];
          EXPECT_EQ(st.support, static_cast<int64_t>(pos.size()));
          if (s.kind == SelectorKind::Sparse) {
            const int64_t dynamic_cap = s.rule == SelectorRule::Exact
                                            ? s.top_k
                                            : (s.top_k + p.block - 1) / p.block * p.block;
            EXPECT_LE(st.dynamic, dynamic_cap) << text;
            EXPECT_LE(st.support, s.anchors + s.window + p.block - 1 + dynamic_cap) << text;
          }
        }
      }
    }
  }
}

// Exact top-k: the dynamic positions are the k best candidates by score (double, from the raw
// keys), pooled by the max over the group with gqa=shared, per head with gqa=head.
TEST(SparseAttention, ExactTopKPicksTheLargestScores) {
  Problem p(120, 6, 2, 16, 8, 21);
  p.fill();
  const int64_t anchors = 2, window = 4, k = 7;
  for (bool shared : {true, false}) {
    const std::unique_ptr<Support> selector_owner =
        make_support(shared ? "sparse:a2:w4:k7:exact" : "sparse:a2:w4:k7:exact:gqa=head");
    Support& selector = *selector_owner;
    Recorder recorder;
    p.sparse(selector, nullptr, &recorder);
    for (int64_t t = 0; t < p.n; ++t) {
      const int64_t c0 = std::min<int64_t>(anchors, t + 1), c1 = std::max(c0, t - window + 1);
      for (int64_t h = 0; h < p.heads; ++h) {
        const auto ranking = [&](int64_t j) {
          if (!shared) return p.score(t, h, j);
          double best = -INFINITY;
          const int64_t first = h / p.group() * p.group();
          for (int64_t g = first; g < first + p.group(); ++g)
            best = std::max(best, p.score(t, g, j));
          return best;
        };
        std::set<int64_t> chosen;
        for (int32_t j : recorder.at(t, h).positions)
          if (j >= c0 && j < c1) chosen.insert(j);
        ASSERT_EQ(static_cast<int64_t>(chosen.size()), std::min(k, c1 - c0)) << "t=" << t;
        double worst_chosen = INFINITY, best_dropped = -INFINITY;
        for (int64_t j = c0; j < c1; ++j) {
          if (chosen.count(j))
            worst_chosen = std::min(worst_chosen, ranking(j));
          else
            best_dropped = std::max(best_dropped, ranking(j));
        }
        EXPECT_GE(worst_chosen, best_dropped - 1e-5) << "t=" << t << " h=" << h;
      }
    }
  }
}

TEST(SparseAttention, GqaSharedChoiceIsCommonPerHeadChoiceIsNot) {
  Problem p(200, 6, 2, 16, 8, 8);
  p.fill();
  for (const char* rule : {"exact", "centroid", "bound"}) {
    const std::unique_ptr<Support> shared_owner =
        make_support(std::string("sparse:a1:w4:k16:") + rule);
    Support& shared = *shared_owner;
    const std::unique_ptr<Support> per_head_owner =
        make_support(std::string("sparse:a1:w4:k16:") + rule + ":gqa=head");
    Support& per_head = *per_head_owner;
    Recorder shared_events, head_events;
    p.sparse(shared, nullptr, &shared_events);
    p.sparse(per_head, nullptr, &head_events);
    int64_t differing = 0;
    for (int64_t t = 0; t < p.n; ++t) {
      for (int64_t kv = 0; kv < p.kv_heads; ++kv) {
        const int64_t h0 = kv * p.group();
        for (int64_t g = 1; g < p.group(); ++g) {
          EXPECT_EQ(shared_events.at(t, h0 + g).positions, shared_events.at(t, h0).positions);
          differing += head_events.at(t, h0 + g).positions != head_events.at(t, h0).positions;
        }
      }
    }
    EXPECT_GT(differing, p.n / 2) << rule << ": per-head choices should differ on random data";
  }
}

// u_b >= max_{j in b} s_j for every block, on random keys (offset so the box is not centred),
// also for the partial last block; and the cache's float scores stay below it.
TEST(SparseAttention, UpperBoundDominatesBlockScores) {
  const int64_t d = 32, block = 8, n = 203;
  std::mt19937 rng(99);
  std::vector<float> k = random_vector(rng, n * d), v = random_vector(rng, n * d);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) k[j * d + c] += 0.1f * c - 1.0f;
  auto cache = make_dense_cache({1, 1, d}, DenseFormat::F32, 0, block);
  cache->append(0, k, v, n);
  const double scale = 1.0 / std::sqrt(double(d));
  for (int trial = 0; trial < 50; ++trial) {
    const std::vector<float> q = random_vector(rng, d, trial % 2 ? 1.0f : 5.0f);
    std::vector<float> scores(n);
    cache->score(0, 0, q, PositionSet::range(0, n), scores);
    for (int64_t b = 0; b * block < n; ++b) {
      const double u = block_upper_bound(cache->summary(0, 0, b), q, scale);
      double best = -INFINITY, best_centroid = 0;
      for (int64_t j = b * block; j < std::min(n, (b + 1) * block); ++j) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += double(q[c]) * k[j * d + c];
        best = std::max(best, dot * scale);
        best_centroid += dot * scale;
        EXPECT_GE(u, double(scores[j]) * scale);
      }
      EXPECT_GE(u, best);
      const int64_t count = std::min(n, (b + 1) * block) - b * block;
      EXPECT_NEAR(block_centroid_score(cache->summary(0, 0, b), q, scale), best_centroid / count,
                  1e-4);
    }
  }
}

// One block of keys planted along the query direction: both block rules pick exactly it.
TEST(SparseAttention, BlockRulesFindThePlantedBlock) {
  const int64_t d = 32, block = 16, n = 256, planted = 7;
  std::mt19937 rng(4);
  std::vector<float> k = random_vector(rng, n * d, 0.1f), v = random_vector(rng, n * d);
  const std::vector<float> q = random_vector(rng, d);
  for (int64_t j = planted * block; j < (planted + 1) * block; ++j)
    for (int64_t c = 0; c < d; ++c) k[j * d + c] += q[c];
  auto cache = make_dense_cache({1, 1, d}, DenseFormat::F16, n, block);
  cache->append(0, k, v, n);
  const AttentionSpec spec{1, d, 1.0 / std::sqrt(double(d)), 0};
  for (const char* text :
       {"sparse:a1:w16:k16:centroid", "sparse:a1:w16:k10:b16:bound", "certified:a1:w16:eps0.5"}) {
    const std::unique_ptr<Support> selector_owner = make_support(text);
    Support& selector = *selector_owner;
    Recorder recorder;
    std::vector<float> out(d);
    std::vector<SparseQueryStats> stats(1);
    attend(*cache, 0, q, 1, n - 1, spec, selector, out, stats, &recorder);
    std::vector<int32_t> expected = {0};
    for (int64_t j = planted * block; j < (planted + 1) * block; ++j) expected.push_back(j);
    for (int64_t j = n - block; j < n; ++j) expected.push_back(j);
    EXPECT_EQ(recorder.at(n - 1, 0).positions, expected) << text;
    EXPECT_EQ(stats[0].blocks_read, 1) << text;
    EXPECT_EQ(stats[0].dynamic, block) << text;
    EXPECT_EQ(stats[0].summaries_read, n / block - 1) << text;  // all but the window's block
  }
}

// Brute-force δ for one query: Z_S over the support's logits, Ẑ over every visible position
// outside the support, each counted with its block's bound; δ = Ẑ / (Z_S + Ẑ).
// With `exact_scores` (certified:exact) the unselected positions count with their own scores
// (the mass actually dropped), otherwise with their blocks' upper bounds.
double brute_force_delta(const Problem& p, const Recorder::Event& e, int64_t t, int64_t kv,
                         bool exact_scores) {
  const std::set<int32_t> support(e.positions.begin(), e.positions.end());
  double m = -INFINITY;
  for (float s : e.logits) m = std::max<double>(m, s);
  std::map<int64_t, int64_t> unselected;  // block -> count
  std::vector<double> dropped_scores;
  for (int64_t j = visible_positions(t, p.spec.sliding_window).begin(); j <= t; ++j) {
    if (support.count(static_cast<int32_t>(j))) continue;
    if (!exact_scores) {
      ++unselected[j / p.block];
      continue;
    }
    float raw = 0;
    p.cache->score(0, kv, e.query, PositionSet::range(j, j + 1), std::span(&raw, 1));
    dropped_scores.push_back(static_cast<float>(raw * p.spec.scale));  // as the attention scales
    m = std::max(m, dropped_scores.back());
  }
  std::map<int64_t, double> bound;
  for (const auto& [b, count] : unselected) {
    bound[b] = block_upper_bound(p.cache->summary(0, kv, b), e.query, p.spec.scale);
    m = std::max(m, bound[b]);
  }
  double z_support = 0, z_rest = 0;
  for (float s : e.logits) z_support += std::exp(s - m);
  for (double s : dropped_scores) z_rest += std::exp(s - m);
  for (const auto& [b, count] : unselected) z_rest += count * std::exp(bound[b] - m);
  return z_rest > 0 ? z_rest / (z_support + z_rest) : 0.0;
}

// Queries share a direction u; a few planted keys point along it (heavy positions); the rest are
// small noise, so a few blocks should certify most queries.
void plant_heavy_keys(Problem& p) {
  std::mt19937 rng(5);
  std::vector<float> u = random_vector(rng, p.d);
  double norm = 0;
  for (float x : u) norm += x * x;
  for (float& x : u) x = static_cast<float>(x / std::sqrt(norm));
  for (size_t i = 0; i < p.q.size(); ++i) p.q[i] = 10 * u[i % p.d] + 0.3f * p.q[i];
  for (size_t i = 0; i < p.k.size(); ++i) p.k[i] *= 0.3f;
  for (int64_t j : {3, 40, 41, 97, 150, 220, 221, 222, 280})
    for (int64_t kv = 0; kv < p.kv_heads; ++kv)
      for (int64_t c2 = 0; c2 < p.d; ++c2) p.k[(j * p.kv_heads + kv) * p.d + c2] += 10 * u[c2];
}

struct CertifiedCase {
  bool planted;
  const char* spec;
  int64_t model_window;
};

class CertifiedTest : public ::testing::TestWithParam<CertifiedCase> {};

// For every query: δ <= ε, δ equals the brute-force recomputation, and the output error against
// dense attention is within 2 δ max_j ||v_j||.
TEST_P(CertifiedTest, BoundHoldsAndDeltaIsExact) {
  const CertifiedCase c = GetParam();
  Problem p(300, 6, 2, 32, 8, 77, c.model_window);
  if (c.planted) plant_heavy_keys(p);
  p.fill();
  const std::unique_ptr<Support> selector_owner = make_support(c.spec);
  Support& selector = *selector_owner;
  const double epsilon = selector.spec().epsilon;
  Recorder recorder;
  std::vector<SparseQueryStats> stats;
  const std::vector<float> sparse = p.sparse(selector, &stats, &recorder);
  const std::vector<float> dense = p.dense();
  int64_t total_support = 0, visible_total = 0;
  for (int64_t t = 0; t < p.n; ++t) {
    const PositionSet visible = visible_positions(t, c.model_window);
    visible_total += visible.size() * p.heads;
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t kv = h / p.group();
      const SparseQueryStats& st = stats[t * p.heads + h];
      total_support += st.support;
      ASSERT_TRUE(std::isfinite(st.delta));
      EXPECT_LE(st.delta, epsilon);
      const double expected = brute_force_delta(p, recorder.at(t, h), t, kv,
                                                selector.spec().rule == SelectorRule::Exact);
      EXPECT_NEAR(st.delta, expected, 1e-12 + 1e-9 * expected) << "t=" << t << " h=" << h;
      double max_value = 0, error = 0;
      for (int64_t j = visible.begin(); j < visible.end(); ++j) {
        double norm = 0;
        for (int64_t c2 = 0; c2 < p.d; ++c2)
          norm += double(p.value(j, kv)[c2]) * p.value(j, kv)[c2];
        max_value = std::max(max_value, std::sqrt(norm));
      }
      for (int64_t c2 = 0; c2 < p.d; ++c2) {
        const double diff =
            double(sparse[(t * p.heads + h) * p.d + c2]) - dense[(t * p.heads + h) * p.d + c2];
        error += diff * diff;
      }
      EXPECT_LE(std::sqrt(error), 2 * st.delta * max_value + 1e-5) << "t=" << t << " h=" << h;
    }
  }
  if (c.planted) {  // the certificate must actually save reads where the mass is concentrated
    EXPECT_LT(total_support, visible_total / 2)
        << "mean support " << double(total_support) / (p.n * p.heads);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Inputs, CertifiedTest,
    ::testing::Values(CertifiedCase{false, "certified:a1:w8:b8:eps0.01", 0},
                      CertifiedCase{false, "certified:a0:w3:eps0.2:gqa=head", 0},
                      CertifiedCase{false, "certified:a1:w8:eps0.05", 50},
                      CertifiedCase{true, "certified:a1:w8:b8:eps0.01", 0},
                      CertifiedCase{true, "certified:a1:w8:eps0.05:gqa=head", 0},
                      CertifiedCase{true, "certified:a2:w4:eps0.1", 64},
                      CertifiedCase{false, "certified:a1:w8:exact:eps0.01", 0},
                      CertifiedCase{true, "certified:a1:w8:exact:eps0.01", 0},
                      CertifiedCase{true, "certified:a1:w8:exact:eps0.05:gqa=head", 0},
                      CertifiedCase{true, "certified:a2:w4:exact:eps0.1", 64}));

struct LossyCase {
  const char* key_codec;
  bool planted;
  const char* selector = "certified:a1:w8:b8:eps0.02";
};

class CertifiedLossyTest : public ::testing::TestWithParam<LossyCase> {};

// Certified mode over quantized and HeadQ key caches: the bound is over the stored keys, so for
// every query the true dropped mass, computed from the scores the cache itself returns (the ones
// the attention uses), is at most δ, and the output error against dense attention over the same
// cache is within 2 δ max_j ||v_j||. (With summaries of the exact keys a stored key could score
// above its block's bound.)
TEST_P(CertifiedLossyTest, BoundHoldsForTheStoredKeys) {
  const LossyCase c = GetParam();
  Problem p(300, 6, 2, 32, 8, 78);
  if (c.planted) plant_heavy_keys(p);
  p.use_codecs(c.key_codec, "f32");
  p.fill();
  const std::unique_ptr<Support> selector_owner = make_support(c.selector);
  Support& selector = *selector_owner;
  Recorder recorder;
  std::vector<SparseQueryStats> stats;
  const std::vector<float> sparse = p.sparse(selector, &stats, &recorder);
  const std::vector<float> dense = p.dense();
  int64_t total_support = 0;
  double worst_ratio = 0;  // dropped mass / δ where δ > 0
  for (int64_t t = 0; t < p.n; ++t) {
    const PositionSet visible = visible_positions(t, 0);
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t kv = h / p.group();
      const SparseQueryStats& st = stats[t * p.heads + h];
      total_support += st.support;
      ASSERT_LE(st.delta, 0.02);
      const Recorder::Event& e = recorder.at(t, h);
      std::vector<float> scores(visible.size());
      p.cache->score(0, kv, std::span(p.query(t, h), p.d), visible, scores);
      double m = -INFINITY;
      for (float& x : scores) {
        x = static_cast<float>(x * p.spec.scale);  // as the attention scales
        m = std::max<double>(m, x);
      }
      const std::set<int32_t> support(e.positions.begin(), e.positions.end());
      double total = 0, dropped = 0;
      for (int64_t j = visible.begin(); j < visible.end(); ++j) {
        const double w = std::exp(scores[j] - m);
        total += w;
        if (!support.count(static_cast<int32_t>(j))) dropped += w;
      }
      dropped /= total;
      EXPECT_LE(dropped, st.delta * (1 + 1e-9) + 1e-12) << "t=" << t << " h=" << h;
      if (st.delta > 0) worst_ratio = std::max(worst_ratio, dropped / st.delta);
      double max_value = 0, error = 0;
      for (int64_t j = visible.begin(); j < visible.end(); ++j) {
        double norm = 0;
        for (int64_t c2 = 0; c2 < p.d; ++c2) norm += std::pow(double(p.value(j, kv)[c2]), 2.0);
        max_value = std::max(max_value, std::sqrt(norm));
      }
      for (int64_t c2 = 0; c2 < p.d; ++c2)
        error += std::pow(
            double(sparse[(t * p.heads + h) * p.d + c2]) - dense[(t * p.heads + h) * p.d + c2],
            2.0);
      EXPECT_LE(std::sqrt(error), 2 * st.delta * max_value + 1e-5) << "t=" << t << " h=" << h;
    }
  }
  if (c.planted) EXPECT_LT(total_support, p.n * p.heads * p.n / 4);  // it did drop positions
  RecordProperty("worst_dropped_over_delta", std::to_string(worst_ratio));
}

INSTANTIATE_TEST_SUITE_P(
    Codecs, CertifiedLossyTest,
    ::testing::Values(LossyCase{"int2:g16:tok", false}, LossyCase{"int2:g16:tok", true},
                      LossyCase{"int4:g16:tok", true}, LossyCase{"int2:g8:chan:r16", true},
                      LossyCase{"int2:g16:tok:had", true},
                      LossyCase{"int2:g16:tok+headq:r8:s4:random", true},
                      LossyCase{"int2:g16:tok+headq:r8:s4:random", false},
                      LossyCase{"int2:g16:tok", true, "certified:a1:w8:exact:eps0.02"},
                      LossyCase{"int2:g16:tok+headq:r8:s4:random", true,
                                "certified:a1:w8:exact:eps0.02"}));

// Refresh: a decode step re-chooses every R positions and otherwise reuses the last choice (minus
// what has entered the window); a prefill's last query seeds the choice.
TEST(SparseAttention, RefreshReusesTheChoice) {
  for (const char* rule : {"exact", "centroid", "bound"}) {
    for (int64_t refresh : {1, 4}) {
      Problem p(120, 4, 2, 16, 8, 3);
      const std::unique_ptr<Support> selector_owner =
          make_support(std::string("sparse:a1:w8:k16:") + rule + ":r" + std::to_string(refresh));
      Support& selector = *selector_owner;
      const int64_t row = p.heads * p.d, kv_row = p.kv_heads * p.d, prefill = 40;
      std::vector<float> out(p.n * row);
      std::vector<SparseQueryStats> stats(p.n * p.heads);
      Recorder recorder;
      p.cache->append(0, std::span(p.k).first(prefill * kv_row),
                      std::span(p.v).first(prefill * kv_row), prefill);
      attend(*p.cache, 0, std::span(p.q).first(prefill * row), prefill, 0, p.spec, selector,
             std::span(out).first(prefill * row), std::span(stats).first(prefill * p.heads),
             &recorder);
      for (int64_t t = prefill; t < p.n; ++t) {
        p.cache->append(0, std::span(p.k).subspan(t * kv_row, kv_row),
                        std::span(p.v).subspan(t * kv_row, kv_row), 1);
        attend(*p.cache, 0, std::span(p.q).subspan(t * row, row), 1, t, p.spec, selector,
               std::span(out).subspan(t * row, row), std::span(stats).subspan(t * p.heads, p.heads),
               &recorder);
      }
      int64_t changed = 0;
      for (int64_t t = prefill; t < p.n; ++t) {
        const bool expect_refresh = (t - (prefill - 1)) % refresh == 0;
        for (int64_t h = 0; h < p.heads; ++h) {
          EXPECT_EQ(stats[t * p.heads + h].refreshed, expect_refresh) << rule << " t=" << t;
          // The dynamic part: positions in [1, t - 7) and, for the block rules, not in the
          // query's own block.
          const auto candidates_end = [&](int64_t at) {
            return std::string(rule) == "exact" ? at - 7 : std::min(at - 7, at / p.block * p.block);
          };
          const auto dynamic = [&](int64_t at) {
            std::set<int32_t> s;
            for (int32_t j : recorder.at(at, h).positions)
              if (j >= 1 && j < candidates_end(at)) s.insert(j);
            return s;
          };
          const std::set<int32_t> now = dynamic(t), before = dynamic(t - 1);
          if (!expect_refresh) {
            // Reused: what left the candidates (into the window) is gone, and nothing is new
            // except, for a chosen block the window used to cover, its positions that have just
            // left the window.
            for (int32_t j : before) {
              if (!now.count(j)) {
                EXPECT_GE(j, candidates_end(t)) << rule << " t=" << t;
              }
            }
            for (int32_t j : now) {
              if (!before.count(j)) {
                EXPECT_NE(std::string(rule), "exact") << "t=" << t;
                EXPECT_GE(j, candidates_end(t - 1)) << rule << " t=" << t;
              }
            }
          }
          changed += now != before;
        }
      }
      if (refresh == 1) {
        EXPECT_GT(changed, (p.n - prefill) / 2) << rule;
      }
    }
  }
}

// Prefill and token-by-token decode read the same supports and give the same outputs (the own
// block is never ranked by a summary that already holds later keys).
TEST(SparseAttention, PrefillMatchesDecode) {
  for (const char* text :
       {"sparse:a1:w3:k16:centroid", "sparse:a1:w3:k16:bound:gqa=head", "sparse:a2:w5:k9:exact",
        "certified:a1:w3:eps0.05", "certified:a1:w3:eps0.05:p6", "certified:a1:w3:exact:eps0.05"}) {
    Problem p(90, 4, 2, 16, 8, 31);
    prepare_summaries(*p.cache, parse_selector_spec(text), nullptr);
    p.fill();
    const std::unique_ptr<Support> prefill_selector_owner = make_support(text);
    Support& prefill_selector = *prefill_selector_owner;
    const std::vector<float> prefill = p.sparse(prefill_selector);
    Problem decode_problem(90, 4, 2, 16, 8, 31);
    prepare_summaries(*decode_problem.cache, parse_selector_spec(text), nullptr);
    const std::unique_ptr<Support> decode_selector_owner = make_support(text);
    Support& decode_selector = *decode_selector_owner;
    const int64_t row = p.heads * p.d, kv_row = p.kv_heads * p.d;
    std::vector<float> decode(p.n * row);
    for (int64_t t = 0; t < p.n; ++t) {
      decode_problem.cache->append(0, std::span(p.k).subspan(t * kv_row, kv_row),
                                   std::span(p.v).subspan(t * kv_row, kv_row), 1);
      attend(*decode_problem.cache, 0, std::span(p.q).subspan(t * row, row), 1, t, p.spec,
             decode_selector, std::span(decode).subspan(t * row, row));
    }
    for (size_t i = 0; i < decode.size(); ++i) ASSERT_EQ(prefill[i], decode[i]) << text << " " << i;
  }
}

// ---- query frames (SelectorSpec::frame_rank, KVCache::set_summary_frames) ----

// A calibrated-basis stand-in: per head, `rank` query directions whose first one is `first`
// (normalized; the rest random), for prepare_summaries (which orthonormalizes them in order).
HeadqBasisVectors frame_basis(int64_t kv_heads, int64_t d, int64_t rank,
                              std::span<const float> first, uint64_t seed) {
  HeadqBasisVectors basis;
  basis.layers = 1;
  basis.kv_heads = kv_heads;
  basis.head_dim = d;
  basis.rank = rank;
  for (int64_t h = 0; h < kv_heads; ++h) {
    std::vector<double> rows = random_orthonormal_rows(rank, d, seed + h);
    if (!first.empty()) std::copy(first.begin(), first.end(), rows.begin());
    basis.query_vectors.insert(basis.query_vectors.end(), rows.begin(), rows.end());
  }
  return basis;
}

// n random keys offset per channel (so block boxes are not centred) and random values, appended
// one token at a time (a codec's window then quantizes as decode would).
void append_offset_keys(KVCache& cache, std::mt19937& rng, int64_t n, int64_t d) {
  std::vector<float> k = random_vector(rng, n * d), v = random_vector(rng, n * d);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) k[j * d + c] += 0.1f * c - 1.0f;
  for (int64_t j = 0; j < n; ++j)
    cache.append(0, std::span(k).subspan(j * d, d), std::span(v).subspan(j * d, d), 1);
}

// With a frame the bound still dominates every score the cache computes (float32, from the
// stored keys: dense, f16, quantized, rotated, KIVI-style window rebuilt as it quantizes), for
// low-rank and full-rank frames; and where queries lie in the frame it is tighter than the
// per-channel box.
TEST(SparseAttention, FrameBoundDominatesScoresAndIsTighter) {
  const int64_t d = 32, block = 8, n = 203;
  for (const char* codec : {"f32", "f16", "int4:g16:tok", "int2:g8:chan:r16", "int2:g16:tok:had"})
    for (const int64_t rank : {int64_t{4}, int64_t{16}, d}) {
      std::mt19937 rng(static_cast<uint32_t>(7 + rank));
      const HeadqBasisVectors basis = frame_basis(1, d, rank, {}, 1000 + rank);
      auto cache = make_cache({1, 1, d}, codec, "f32", n, block);
      prepare_summaries(*cache, parse_selector_spec(str_cat("certified:eps0.1:q", rank)), &basis);
      append_offset_keys(*cache, rng, n, d);
      const BlockSummaryTable table = cache->summaries(0, 0);
      ASSERT_EQ(table.frame_rank, rank);
      const double scale = 1.0 / std::sqrt(double(d));
      const std::span<const double> rows = basis.query_rows(0, 0);
      int64_t tighter = 0, compared = 0;
      for (int trial = 0; trial < 20; ++trial) {
        // Queries mostly in the frame (decaying weights on its directions), plus a little noise.
        std::vector<float> q = random_vector(rng, d, 0.05f);
        for (int64_t i = 0; i < rank; ++i) {
          const float weight = static_cast<float>(8.0 / (1 + i)) * (trial % 2 ? 1.0f : -1.0f);
          for (int64_t c = 0; c < d; ++c) q[c] += weight * static_cast<float>(rows[i * d + c]);
        }
        std::vector<float> scores(n);
        cache->score(0, 0, q, PositionSet::range(0, n), scores);
        std::vector<double> framed(table.blocks), box(table.blocks);
        block_upper_bounds(table, 0, table.blocks, q, scale, framed, true);
        block_upper_bounds(table, 0, table.blocks, q, scale, box, false);
        for (int64_t b = 0; b < table.blocks; ++b) {
          EXPECT_LE(framed[b], box[b]);  // the smaller of two valid bounds
          for (int64_t j = b * block; j < std::min(n, (b + 1) * block); ++j)
            ASSERT_GE(framed[b], static_cast<double>(static_cast<float>(scores[j] * scale)))
                << codec << " rank " << rank << " block " << b;
          tighter += framed[b] < box[b] - 0.05;
          ++compared;
        }
      }
      if (rank >= 16) EXPECT_GT(tighter, compared / 2) << codec << " rank " << rank;
    }
}

// Certified attention with a query frame on the planted problem (queries along u, a few keys
// along u): the bound holds on every query (δ <= ε, the dropped mass from the cache's own scores
// <= δ, output error <= 2 δ max ||v||), and the frame certifies with fewer positions than the
// per-channel box.
constexpr float kQueryAlong = 8.0f, kKeyAlong = 8.0f;

// Queries along u with a little noise, keys noise plus a few along u: a moderate margin, which
// the per-channel box (slack ~ ||q||_1 times the channel ranges) cannot resolve as well as the
// frame (slack ~ |q·u| times the range along u) or per-position sketches.
struct PlantedMargin {
  Problem p{300, 6, 2, 32, 8, 77};
  std::vector<float> u;
  PlantedMargin() {
    std::mt19937 rng(5);
    u = random_vector(rng, p.d);
    double norm = 0;
    for (float x : u) norm += x * x;
    for (float& x : u) x = static_cast<float>(x / std::sqrt(norm));
    for (size_t i = 0; i < p.q.size(); ++i) p.q[i] = kQueryAlong * u[i % p.d] + 0.3f * p.q[i];
    for (size_t i = 0; i < p.k.size(); ++i) p.k[i] *= 0.5f;
    for (int64_t j : {3, 40, 41, 97, 150, 220, 221, 222, 280})
      for (int64_t kv = 0; kv < p.kv_heads; ++kv)
        for (int64_t c = 0; c < p.d; ++c) p.k[(j * p.kv_heads + kv) * p.d + c] += kKeyAlong * u[c];
  }
};

// Runs certified `spec` over `codec` keys (summaries prepared from `basis`) and checks the
// certificate on every query: δ <= ε, the dropped mass from the cache's own scores <= δ, and the
// output error against dense attention over the same cache <= 2 δ max ||v||. Returns the total
// support.
int64_t checked_certified_support(Problem& p, const std::string& codec, const std::string& spec,
                                  const HeadqBasisVectors* basis) {
  p.use_codecs(codec, "f32");
  prepare_summaries(*p.cache, parse_selector_spec(spec), basis);
  p.fill();
  const std::unique_ptr<Support> selector = make_support(spec);
  const double epsilon = selector->spec().epsilon;
  Recorder recorder;
  std::vector<SparseQueryStats> stats;
  const std::vector<float> sparse = p.sparse(*selector, &stats, &recorder);
  const std::vector<float> dense = p.dense();
  int64_t support = 0;
  for (int64_t t = 0; t < p.n; ++t) {
    const PositionSet visible = visible_positions(t, 0);
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t kv = h / p.group();
      const SparseQueryStats& st = stats[t * p.heads + h];
      support += st.support;
      EXPECT_LE(st.delta, epsilon) << spec;
      std::vector<float> scores(visible.size());
      p.cache->score(0, kv, std::span(p.query(t, h), p.d), visible, scores);
      double m = -INFINITY;
      for (float& x : scores) {
        x = static_cast<float>(x * p.spec.scale);
        m = std::max<double>(m, x);
      }
      const Recorder::Event& e = recorder.at(t, h);
      const std::set<int32_t> chosen(e.positions.begin(), e.positions.end());
      double total = 0, dropped = 0, max_value = 0, error = 0;
      for (int64_t j = visible.begin(); j < visible.end(); ++j) {
        const double w = std::exp(scores[j] - m);
        total += w;
        if (!chosen.count(static_cast<int32_t>(j))) dropped += w;
        double value_norm = 0;
        for (int64_t c = 0; c < p.d; ++c) value_norm += std::pow(double(p.value(j, kv)[c]), 2.0);
        max_value = std::max(max_value, std::sqrt(value_norm));
      }
      EXPECT_LE(dropped / total, st.delta * (1 + 1e-9) + 1e-12) << spec << " t=" << t << " h=" << h;
      for (int64_t c = 0; c < p.d; ++c)
        error += std::pow(
            double(sparse[(t * p.heads + h) * p.d + c]) - dense[(t * p.heads + h) * p.d + c], 2.0);
      EXPECT_LE(std::sqrt(error), 2 * st.delta * max_value + 1e-5) << spec;
    }
  }
  return support;
}

TEST(SparseAttention, CertifiedWithQueryFrameHoldsAndReadsLess) {
  for (const char* codec : {"f32", "int4:g16:tok"})
    for (const int64_t rank : {int64_t{8}, int64_t{32}}) {
      PlantedMargin planted;
      const HeadqBasisVectors basis =
          frame_basis(planted.p.kv_heads, planted.p.d, rank, planted.u, 50);
      const int64_t box =
          checked_certified_support(planted.p, codec, "certified:a1:w8:b8:eps0.01", &basis);
      const int64_t framed = checked_certified_support(
          planted.p, codec, str_cat("certified:a1:w8:b8:eps0.01:q", rank), &basis);
      // Measured: about 188K positions read with the box, 60K with the frame (of 271K visible).
      EXPECT_LT(2 * framed, box) << codec << " rank " << rank;
      RecordProperty(str_cat("support_box_vs_frame_", rank), str_cat(box, " ", framed));
    }
}

// Position sketches: the per-position bounds enclose every score the cache computes (dense,
// quantized, rotated, KIVI-style window rebuilt as it quantizes), are narrow at 8 bits, and the
// certified choice from them holds its certificate and reads less than block bounds.
// On every instruction set the bound kernels run (tiles of 16 positions; 203 positions end in a
// partial tile, and ranges starting inside a tile are checked too).
TEST(SparseAttention, PositionSketchBoundsEncloseScores) {
  const int64_t d = 32, block = 8, n = 203;
  for (const std::string& target : available_targets())
    for (const char* codec : {"f32", "f16", "int4:g16:tok", "int2:g8:chan:r16", "int2:g16:tok:had"})
      for (const int bits : {8, 4, 2}) {
        const TargetGuard guard(target);
        std::mt19937 rng(static_cast<uint32_t>(11 + bits));
        auto cache = make_cache({1, 1, d}, codec, "f32", n, block);
        cache->set_position_sketches(bits);
        append_offset_keys(*cache, rng, n, d);
        const BlockSummaryTable table = cache->summaries(0, 0);
        ASSERT_EQ(table.sketch_levels, (1 << (bits - 1)) - 1);
        const double scale = 1.0 / std::sqrt(double(d));
        double width = 0;
        for (int trial = 0; trial < 10; ++trial) {
          const int64_t group = 1 + trial % 3;
          const std::vector<float> q = random_vector(rng, group * d, trial % 2 ? 1.0f : 5.0f);
          std::vector<float> scores(group * n);
          cache->score(0, 0, q, PositionSet::range(0, n), scores);
          std::vector<double> upper(n * group), lower(n * group);
          std::vector<double> largest(group, -INFINITY);
          position_bounds(table, block, 0, n, q, scale, upper, lower, largest);
          for (int64_t j = 0; j < n; ++j)
            for (int64_t g = 0; g < group; ++g) {
              const double logit = static_cast<float>(scores[g * n + j] * scale);
              ASSERT_LE(lower[g * n + j], logit)
                  << target << " " << codec << " bits " << bits << " j " << j;
              ASSERT_GE(upper[g * n + j], logit)
                  << target << " " << codec << " bits " << bits << " j " << j;
              ASSERT_LE(upper[g * n + j], largest[g]);
              width += (upper[g * n + j] - lower[g * n + j]) / (group * n * 10);
            }
          // The reference the choice buckets against is the largest bound itself, not above it
          // (a larger one would read more keys).
          for (int64_t g = 0; g < group; ++g)
            ASSERT_EQ(largest[g],
                      *std::max_element(upper.begin() + g * n, upper.begin() + (g + 1) * n))
                << target << " " << codec << " bits " << bits;
          // A range that starts and ends inside tiles gives the same bounds as the whole one.
          const int64_t first = 21, count = 150;
          std::vector<double> part_upper(count * group), part_lower(count * group);
          std::vector<double> part_largest(group, -INFINITY);
          position_bounds(table, block, first, count, q, scale, part_upper, part_lower,
                          part_largest);
          for (int64_t g = 0; g < group; ++g)
            ASSERT_EQ(part_largest[g], *std::max_element(part_upper.begin() + g * count,
                                                         part_upper.begin() + (g + 1) * count))
                << target << " " << codec << " bits " << bits;
          for (int64_t g = 0; g < group; ++g)
            for (int64_t i = 0; i < count; ++i) {
              ASSERT_EQ(part_upper[g * count + i], upper[g * n + first + i]) << target;
              ASSERT_EQ(part_lower[g * count + i], lower[g * n + first + i]) << target;
            }
          // Queries split once, the part written into rows of the whole range (as the certified
          // choice's parts write them): the same bits, and nothing outside the part touched.
          SketchQueries split;
          split_sketch_queries(table, q, split);
          std::vector<double> row_upper(n * group, NAN), row_lower(n * group, NAN);
          std::vector<double> row_largest(group, -INFINITY);
          position_bounds(table, block, first, count, split, scale,
                          std::span(row_upper).subspan(first), std::span(row_lower).subspan(first),
                          n, row_largest);
          for (int64_t g = 0; g < group; ++g) {
            ASSERT_EQ(row_largest[g], part_largest[g]) << target;
            for (int64_t j = 0; j < n; ++j) {
              const bool inside = j >= first && j < first + count;
              if (inside) {
                ASSERT_EQ(row_upper[g * n + j], upper[g * n + j]) << target;
                ASSERT_EQ(row_lower[g * n + j], lower[g * n + j]) << target;
              } else {
                ASSERT_TRUE(std::isnan(row_upper[g * n + j]) && std::isnan(row_lower[g * n + j]))
                    << target << " wrote outside its part at " << j;
              }
            }
          }
        }
        try {
          make_cache({1, 1, 15}, "f32", "f32", 8, 8)->set_position_sketches(8);
          ADD_FAILURE() << "an odd head dimension took position sketches";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("even head dimension"), std::string::npos)
              << e.what();
        }
        // Scores here spread over several nats; 8-bit sketches pin each to a small interval.
        if (bits == 8) EXPECT_LT(width, 0.4) << codec;
        RecordProperty(str_cat("mean_width_", bits), str_cat(width));
      }
}

// On every instruction set the certified choice's kernels run.
TEST(SparseAttention, CertifiedWithPositionSketchesHoldsAndReadsLess) {
  for (const std::string& target : available_targets())
    for (const char* codec : {"f32", "int4:g16:tok", "int2:g8:chan:r16"})
      for (const char* extra : {":p8", ":p4:gqa=head"}) {
        const TargetGuard guard(target);
        PlantedMargin planted;
        const int64_t box =
            checked_certified_support(planted.p, codec, "certified:a1:w8:b8:eps0.01", nullptr);
        const int64_t sketched = checked_certified_support(
            planted.p, codec, std::string("certified:a1:w8:b8:eps0.01") + extra, nullptr);
        EXPECT_LT(2 * sketched, box) << target << " " << codec << extra;
        RecordProperty(str_cat("support_box_vs_sketch", extra), str_cat(box, " ", sketched));
      }
  // Random data (no planted margin): the certificate still holds, whatever it reads.
  Problem random(200, 6, 2, 32, 8, 79);
  checked_certified_support(random, "f16", "certified:a1:w8:eps0.05:p8", nullptr);
}

// keys_read counts every key a query head scored once: exact top-k scores every visible position
// (the chosen among them), certified with position sketches the support and the keys it read
// only to choose, dense and block rules their support.
TEST(SparseAttention, KeysReadCountsEveryScoredKeyOnce) {
  for (const char* spec : {"sparse:a1:w8:k16:exact", "certified:a1:w8:b8:eps0.01:p8",
                           "sparse:a1:w8:k16:b8:bound", "dense"}) {
    Problem p(120, 6, 2, 32, 8, 81);
    const SelectorSpec parsed = parse_selector_spec(spec);
    prepare_summaries(*p.cache, parsed, nullptr);
    p.fill();
    const std::unique_ptr<Support> selector = make_support(parsed);
    std::vector<SparseQueryStats> stats;
    p.sparse(*selector, &stats);
    int64_t above_support = 0;
    for (int64_t t = 0; t < p.n; ++t)
      for (int64_t h = 0; h < p.heads; ++h) {
        const SparseQueryStats& st = stats[t * p.heads + h];
        const int64_t keys = keys_read(parsed, st), visible = t + 1;
        if (parsed.rule == SelectorRule::Exact)
          ASSERT_EQ(keys, visible) << spec << " t=" << t;
        else
          ASSERT_TRUE(keys >= st.support && keys <= visible) << spec << " t=" << t;
        if (parsed.sketch_bits == 0 && parsed.rule != SelectorRule::Exact)
          ASSERT_EQ(keys, st.support) << spec << " t=" << t;
        above_support += keys - st.support;
      }
    // Random keys: the sketches cannot rule out many candidates, and some read keys' values are
    // left out.
    if (parsed.sketch_bits > 0) EXPECT_GT(above_support, 0) << spec;
  }
}

// A frame selector needs a cache that keeps that frame; frames go in before the first token and
// match the cache's shape; a missing or too small basis names the fix.
TEST(SparseAttention, QueryFrameBadUseIsAnError) {
  Problem p(40, 4, 2, 16, 8, 1);
  p.fill();
  std::vector<float> out(p.heads * p.d);
  const std::span<const float> q(p.q.data(), p.heads * p.d);
  const std::unique_ptr<Support> framed = make_support("certified:a1:w4:b8:eps0.1:q4");
  try {
    attend(*p.cache, 0, q, 1, 39, p.spec, *framed, out);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--basis"), std::string::npos) << e.what();
  }
  const HeadqBasisVectors basis = frame_basis(p.kv_heads, p.d, 4, {}, 3);
  EXPECT_THROW(prepare_summaries(*p.cache, framed->spec(), &basis), Error);  // not empty
  Problem empty(40, 4, 2, 16, 8, 1);
  EXPECT_THROW(prepare_summaries(*empty.cache, framed->spec(), nullptr), Error);
  EXPECT_THROW(prepare_summaries(*empty.cache, parse_selector_spec("certified:eps0.1:q8"), &basis),
               Error);  // the basis holds 4 directions
  const HeadqBasisVectors wrong_heads = frame_basis(1, p.d, 4, {}, 3);
  EXPECT_THROW(prepare_summaries(*empty.cache, framed->spec(), &wrong_heads), Error);
  EXPECT_THROW(empty.cache->set_summary_frames(std::vector<double>(7), 4), Error);
  prepare_summaries(*empty.cache, framed->spec(), &basis);
  empty.fill();
  EXPECT_NO_THROW(attend(*empty.cache, 0, q, 1, 39, empty.spec, *framed, out));
  // The same cache serves a selector without a frame, which ignores it.
  const std::unique_ptr<Support> plain = make_support("certified:a1:w4:b8:eps0.1");
  EXPECT_NO_THROW(attend(*empty.cache, 0, q, 1, 39, empty.spec, *plain, out));
  const std::unique_ptr<Support> other_rank = make_support("certified:a1:w4:b8:eps0.1:q2");
  EXPECT_THROW(attend(*empty.cache, 0, q, 1, 39, empty.spec, *other_rank, out), Error);
}

}  // namespace
}  // namespace visikv

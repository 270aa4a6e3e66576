// Query-basis key quantization (kv/qbasis.h): the spec grammar and its errors, the exact bit
// accounting, the bit allocation against a brute-force optimum, round-trip error bounds, scores
// against q·k̂ in float64, and the controls' bases. Answers known in closed form or by
// enumeration; no model needed.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/headq.h"
#include "visikv/kv/qbasis.h"

namespace visikv {
namespace {

using test_support::error_of;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(QBasisSpec, ParsesAndPrintsCanonically) {
  for (const char* text :
       {"qbasis:b3:g32:tok", "qbasis:b2.5:g32:chan:r128", "qbasis:b3:g32:chan:r128:random",
        "qbasis:b4:g64:tok:keypca", "qbasis:b2.125:g8:tok:r16", "qbasis:b3:g32:chan:r128:iid",
        "qbasis:b3:g32:chan:keypca:iid", "qbasis:b3:g32:chan:r128:weighted",
        "qbasis:b2.5:g32:chan:r128:fisher", "qbasis:b3:g32:chan:r128:weighted:fisher"}) {
    const CodecSpec spec = parse_codec_spec(text);
    EXPECT_TRUE(spec.is_qbasis()) << text;
    EXPECT_EQ(spec.text(), text);
  }
  const CodecSpec spec = parse_codec_spec("qbasis:b2.50:g32:chan:r128:random");
  EXPECT_EQ(spec.qbasis->budget_milli, 2500);
  EXPECT_EQ(spec.group, 32);
  EXPECT_EQ(spec.window, 128);
  EXPECT_EQ(spec.axis, CodecSpec::Axis::Channels);
  EXPECT_EQ(spec.qbasis->basis, QBasisSpec::Basis::Random);
  EXPECT_EQ(spec.text(), "qbasis:b2.5:g32:chan:r128:random");
  EXPECT_EQ(parse_key_codec_spec("qbasis:b3:g32:tok").text(), "qbasis:b3:g32:tok");
  EXPECT_TRUE(parse_codec_spec("qbasis:b3:g32:chan:iid").qbasis->iid_groups);
  EXPECT_FALSE(parse_codec_spec("qbasis:b3:g32:chan").qbasis->iid_groups);
}

TEST(QBasisSpec, ErrorsNameTheProblem) {
  const auto parse_error = [](const std::string& text) {
    return error_of([&] { parse_codec_spec(text); });
  };
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32"), "needs a budget, a group and an axis"));
  EXPECT_TRUE(contains(parse_error("qbasis:b0:g32:tok"), "above 0"));
  EXPECT_TRUE(contains(parse_error("qbasis:b17:g32:tok"), "at most 16"));
  EXPECT_TRUE(contains(parse_error("qbasis:b2.1234:g32:tok"), "three fraction digits"));
  EXPECT_TRUE(contains(parse_error("qbasis:3:g32:tok"), "'b' followed by"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:32:tok"), "group size g<G>"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:row"), "unknown group axis 'row'"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:tok:had"), "unexpected 'had'"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:tok:random:keypca"), "unexpected 'keypca'"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:tok:iid"), "per-channel groups (chan)"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:chan:iid:random"), "unexpected 'random'"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:tok:fisher"), "per-channel groups (chan)"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:chan:iid:fisher"), "unexpected 'fisher'"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:chan:weighted:keypca"), "unexpected 'keypca'"));
  EXPECT_TRUE(contains(parse_error("qbasis:b3:g32:tok+headq:r8:s4"), "no '+' side code"));
  EXPECT_TRUE(contains(parse_error("qbasisx:b3:g32:tok"), "unknown cache spec"));
  EXPECT_TRUE(contains(error_of([] { parse_value_codec_spec("qbasis:b3:g32:tok"); }), "keys only"));
  // The budget must be a whole number of bits per key.
  const CodecSpec odd = parse_codec_spec("qbasis:b2.51:g32:tok");
  EXPECT_TRUE(contains(error_of([&] { check_codec_fits(odd, 64); }), "whole number of bits"));
  EXPECT_NO_THROW(check_codec_fits(odd, 100));  // 251 bits
}

TEST(QBasisSpec, BitsAreTheBudget) {
  const CodecSpec chan = parse_codec_spec("qbasis:b3:g32:chan:r128");
  const CodecBits bits = codec_bits(chan, 64);
  EXPECT_EQ(bits.bits_per_element, 3.0);
  EXPECT_EQ(bits.bits_per_vector, 192.0);
  EXPECT_EQ(bits.window_min_tokens, 128);
  EXPECT_EQ(bits.window_max_tokens, 159);
  // 1000 tokens: 864 quantized (27 groups of 32 leave at least the newest 128), 136 in fp16.
  EXPECT_EQ(quantized_tokens(chan, 1000), 864);
  EXPECT_EQ(codec_stored_bits(chan, 64, 1000), 864 * 192 + 136 * 64 * 16);
  const CodecSpec tok = parse_codec_spec("qbasis:b2.5:g16:tok");
  EXPECT_EQ(codec_stored_bits(tok, 64, 10), 10 * 160);
}

// Σ_i w_i f_i(b_i) of an allocation: f_i from a {d, kQBasisWidths} table, or (empty) the i.i.d.
// model.
double distortion(const std::vector<double>& w, const std::vector<int>& bits, int64_t group,
                  const std::vector<double>& table = {}) {
  double sum = 0;
  for (size_t i = 0; i < w.size(); ++i)
    sum += w[i] * (table.empty() ? qbasis_relative_distortion(bits[i], group)
                                 : table[i * kQBasisWidths + bits[i]]);
  return sum;
}

// The best allocation by enumerating every width of every direction.
double brute_force_best(const std::vector<double>& w, int64_t budget, CodecSpec::Axis axis,
                        int64_t group, const std::vector<double>& table = {}) {
  const size_t d = w.size();
  std::vector<int> bits(d, 0);
  double best = INFINITY;
  const std::function<void(size_t)> visit = [&](size_t i) {
    if (i == d) {
      if (qbasis_group_cost(bits, axis, group) <= budget)
        best = std::min(best, distortion(w, bits, group, table));
      return;
    }
    for (int b = 0; b <= kQBasisMaxBits; ++b) {
      bits[i] = b;
      visit(i + 1);
    }
  };
  visit(0);
  return best;
}

TEST(QBasisAllocation, CostCountsEveryScaleAndZero) {
  // tok, G = 3: widths {4, 4, 4, 2, 0}: four stored directions, two runs of at most 3.
  EXPECT_EQ(qbasis_group_cost(std::vector<int>{4, 4, 4, 2, 0}, CodecSpec::Axis::Tokens, 3),
            4 * 3 + 2 + 32 * 2);
  // chan, G = 32 tokens: codes of 32 tokens plus one pair per stored direction.
  EXPECT_EQ(qbasis_group_cost(std::vector<int>{4, 4, 4, 2, 0}, CodecSpec::Axis::Channels, 32),
            32 * 14 + 32 * 4);
  EXPECT_NE(error_of([] { qbasis_group_cost(std::vector<int>{9}, CodecSpec::Axis::Tokens, 4); }),
            "");
}

TEST(QBasisAllocation, MatchesBruteForceOptimum) {
  std::mt19937 rng(7);
  std::lognormal_distribution<double> spread(0.0, 2.5);
  for (int trial = 0; trial < 24; ++trial) {
    std::vector<double> w(5);
    if (trial % 4 == 3) w.back() = 0;  // never stored
    for (size_t i = 0; i + 1 < w.size(); ++i) w[i] = spread(rng);
    if (trial % 4 != 3) w.back() = spread(rng);
    const CodecSpec::Axis axis = trial % 2 ? CodecSpec::Axis::Channels : CodecSpec::Axis::Tokens;
    const int64_t group = axis == CodecSpec::Axis::Tokens ? 3 : 32;
    const int64_t tokens = axis == CodecSpec::Axis::Tokens ? 1 : group;
    for (int64_t per_token : {4, 8, 12, 20}) {
      const int64_t budget = per_token * tokens + (axis == CodecSpec::Axis::Tokens ? 32 : 64);
      const std::vector<int> bits = qbasis_allocate(w, budget, axis, group);
      ASSERT_LE(qbasis_group_cost(bits, axis, group), budget);
      const double best = brute_force_best(w, budget, axis, group);
      const double got = distortion(w, bits, group);
      // The optimum, no better (that would be a costing bug) and no worse.
      EXPECT_NEAR(got, best, 1e-9 * best) << "trial " << trial << " budget " << budget;
    }
  }
}

// Per-channel groups with a distortion table per direction (measured, or the spread model): still
// the exact optimum, and a smooth direction (small spread) is worth bits that the i.i.d. model
// would not give it.
TEST(QBasisAllocation, PerDirectionDistortionsAreTheOptimumAndFavourSmoothDirections) {
  std::mt19937 rng(17);
  std::lognormal_distribution<double> weight(0.0, 2.0);
  std::uniform_real_distribution<double> share(0.02, 1.0);
  const int64_t group = 32;
  for (int trial = 0; trial < 12; ++trial) {
    std::vector<double> w(5), spread(5);
    for (size_t i = 0; i < w.size(); ++i) w[i] = weight(rng), spread[i] = share(rng);
    std::vector<double> table = qbasis_spread_distortion(spread, group);
    // Odd trials: arbitrary measured-like tables, not monotone in the bits, f(0) not 1.
    if (trial % 2)
      for (double& f : table) f = share(rng);
    for (int64_t per_token : {4, 8, 12}) {
      const int64_t budget = per_token * group + 64;
      const std::vector<int> bits =
          qbasis_allocate(w, budget, CodecSpec::Axis::Channels, group, table);
      ASSERT_LE(qbasis_group_cost(bits, CodecSpec::Axis::Channels, group), budget);
      const double best = brute_force_best(w, budget, CodecSpec::Axis::Channels, group, table);
      EXPECT_NEAR(distortion(w, bits, group, table), best, 1e-9 * best) << "trial " << trial;
    }
  }
  // Spreads of 1 are the i.i.d. model itself.
  const std::vector<double> w = {8.0, 4.0, 2.0, 1.0, 0.5, 0.25};
  EXPECT_EQ(qbasis_allocate(w, 32 * 8 + 96, CodecSpec::Axis::Channels, group,
                            qbasis_spread_distortion(std::vector<double>(w.size(), 1.0), group)),
            qbasis_allocate(w, 32 * 8 + 96, CodecSpec::Axis::Channels, group));
  // Two equal weights, room for one stored direction at 2 bits: with κ = 2.31 at G = 32, 2 bits
  // (f = 0.257) beat 0 bits, and the smoother direction (spread 0.1) is the one stored.
  const std::vector<int> smooth =
      qbasis_allocate(std::vector<double>{1.0, 1.0}, 32 * 2 + 32, CodecSpec::Axis::Channels, group,
                      qbasis_spread_distortion(std::vector<double>{1.0, 0.1}, group));
  EXPECT_EQ(smooth, (std::vector<int>{0, 2}));
  // 1 bit is never worth it under the i.i.d. model (κ > 1) but is for a smooth direction.
  EXPECT_EQ(qbasis_allocate(std::vector<double>{1.0}, 32 + 32, CodecSpec::Axis::Channels, group),
            std::vector<int>{0});
  EXPECT_EQ(qbasis_allocate(std::vector<double>{1.0}, 32 + 32, CodecSpec::Axis::Channels, group,
                            qbasis_spread_distortion(std::vector<double>{0.2}, group)),
            std::vector<int>{1});
  // Tables are for per-channel groups only, kQBasisWidths numbers per direction, not negative;
  // spreads are in [0, 1].
  const std::vector<double> one_row(kQBasisWidths, 0.5);
  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_allocate(std::vector<double>{1.0}, 64, CodecSpec::Axis::Tokens, 4,
                                         one_row);
                       }),
                       "per-channel groups only"));
  EXPECT_TRUE(contains(
      error_of([&] {
        qbasis_allocate(std::vector<double>{1.0, 1.0}, 64, CodecSpec::Axis::Channels, 32, one_row);
      }),
      "numbers per direction"));
  std::vector<double> negative = one_row;
  negative[3] = -1;
  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_allocate(std::vector<double>{1.0}, 64, CodecSpec::Axis::Channels,
                                         32, negative);
                       }),
                       "finite and >= 0"));
  EXPECT_TRUE(contains(error_of([] { qbasis_spread_distortion(std::vector<double>{1.5}, 32); }),
                       "must be in [0, 1]"));
}

TEST(QBasisAllocation, ReverseWaterFilling) {
  // Weights falling by 4x per direction: in the high-rate regime one more bit is worth a factor
  // of 4 in weight, so neighbours differ by one bit; weight-0 directions and those below the
  // water level get nothing.
  std::vector<double> w;
  for (int i = 0; i < 12; ++i) w.push_back(std::pow(4.0, -i));
  w.push_back(0.0);
  w.push_back(0.0);
  const int64_t group = 32;
  const std::vector<int> bits =
      qbasis_allocate(w, 32 * 30 + 32 * 8, CodecSpec::Axis::Channels, group);
  for (size_t i = 0; i + 1 < w.size(); ++i) EXPECT_GE(bits[i], bits[i + 1]) << i;
  EXPECT_EQ(bits[12], 0);
  EXPECT_EQ(bits[13], 0);
  EXPECT_EQ(bits[11], 0);  // far below the water level
  EXPECT_GE(bits[0], 5);
  for (size_t i = 0; i + 1 < w.size(); ++i)
    if (bits[i + 1] >= 2) EXPECT_LE(bits[i] - bits[i + 1], 1) << i;
  // Equal weights, budget for exactly 3 bits each plus scales: all at 3.
  const std::vector<int> flat = qbasis_allocate(std::vector<double>(8, 1.0), 32 * 8 * 3 + 32 * 8,
                                                CodecSpec::Axis::Channels, 32);
  for (int b : flat) EXPECT_EQ(b, 3);
  // No weight: nothing stored.
  for (int b : qbasis_allocate(std::vector<double>(5, 0.0), 1000, CodecSpec::Axis::Tokens, 4))
    EXPECT_EQ(b, 0);
}

// A synthetic head of dimension d: a random orthonormal query basis with eigenvalues falling
// fast (queries in a low-dimensional span), keys with their own spread and mean.
struct SyntheticHead {
  int64_t d;
  QBasisHead head;
  HeadqBasisVectors basis;  // one layer, one KV head, full rank
};

SyntheticHead synthetic_head(int64_t d) {
  SyntheticHead s{d, {}, {}};
  HeadqBasisVectors& b = s.basis;
  b.layers = 1;
  b.kv_heads = 1;
  b.head_dim = d;
  b.rank = d;
  b.query_vectors = random_orthonormal_rows(d, d, 11);
  b.key_vectors = random_orthonormal_rows(d, d, 12);
  for (int64_t i = 0; i < d; ++i) {
    b.query_eigenvalues.push_back(100.0 * std::pow(0.5, static_cast<double>(i)));
    b.key_eigenvalues.push_back(4.0 + 2.0 * std::pow(0.8, static_cast<double>(i)));
    b.key_means.push_back(i % 3 == 0 ? 1.5 : -0.25);
  }
  s.head = qbasis_head(parse_codec_spec("qbasis:b3:g8:tok"), &b, 1, 1, d, 0, 0);
  return s;
}

std::vector<float> random_keys(int64_t n, int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> keys(static_cast<size_t>(n * d));
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < d; ++c) keys[t * d + c] = normal(rng) + (c % 3 == 0 ? 1.5f : -0.25f);
  return keys;
}

// `count` queries of d standard normal numbers.
std::vector<float> random_queries(int64_t count, int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> queries(static_cast<size_t>(count * d));
  for (float& x : queries) x = normal(rng);
  return queries;
}

TEST(QBasisHeadConstants, QueryBasisAndControls) {
  const int64_t d = 16;
  SyntheticHead s = synthetic_head(d);
  // The query basis: λ are the eigenvalues themselves.
  for (int64_t i = 0; i < d; ++i)
    EXPECT_NEAR(s.head.query_energy[i], s.basis.query_eigenvalues[i], 1e-9 * 100);
  const QBasisHead random =
      qbasis_head(parse_codec_spec("qbasis:b3:g8:tok:random"), &s.basis, 1, 1, d, 0, 0);
  const QBasisHead keypca =
      qbasis_head(parse_codec_spec("qbasis:b3:g8:tok:keypca"), &s.basis, 1, 1, d, 0, 0);
  EXPECT_EQ(keypca.rows, s.basis.key_vectors);
  // The random basis is orthonormal and not the query basis: no row close to a query row.
  double largest_overlap = 0, trace_query = 0, trace_random = 0;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      double self = 0, cross = 0;
      for (int64_t c = 0; c < d; ++c) {
        self += random.rows[i * d + c] * random.rows[j * d + c];
        cross += random.rows[i * d + c] * s.head.rows[j * d + c];
      }
      EXPECT_NEAR(self, i == j ? 1.0 : 0.0, 1e-12);
      largest_overlap = std::max(largest_overlap, std::abs(cross));
    }
    trace_query += s.head.query_energy[i];
    trace_random += random.query_energy[i];
  }
  EXPECT_LT(largest_overlap, 0.95);
  // Query energy is the same total in any orthonormal basis, spread differently.
  EXPECT_NEAR(trace_random, trace_query, 1e-9 * trace_query);
  EXPECT_LT(*std::max_element(random.query_energy.begin(), random.query_energy.end()),
            0.9 * s.head.query_energy[0]);
  // Key moments: σ² = uᵀ E[k kᵀ] u - (u·m)², checked for one direction the slow way.
  const double* u = s.head.rows.data() + 3 * d;
  double second = 0, mean = 0;
  for (int64_t m = 0; m < d; ++m) {
    double overlap = 0;
    for (int64_t c = 0; c < d; ++c) overlap += u[c] * s.basis.key_vectors[m * d + c];
    second += s.basis.key_eigenvalues[m] * overlap * overlap;
  }
  for (int64_t c = 0; c < d; ++c) mean += u[c] * s.basis.key_means[c];
  EXPECT_NEAR(s.head.key_mean[3], mean, 1e-12);
  EXPECT_NEAR(s.head.key_std[3], std::sqrt(second - mean * mean), 1e-12);

  // The within-group spread: w² = uᵀ W u over σ², for per-channel groups of the calibrated size
  // only, and not under :iid.
  EXPECT_TRUE(s.head.group_spread.empty());  // a basis without it
  HeadqBasisVectors grouped = s.basis;
  grouped.key_group = 8;
  grouped.key_group_vectors = random_orthonormal_rows(d, d, 13);
  for (int64_t i = 0; i < d; ++i)
    grouped.key_group_eigenvalues.push_back(0.5 + 0.25 * static_cast<double>(i % 4));
  const QBasisHead chan =
      qbasis_head(parse_codec_spec("qbasis:b3:g8:chan"), &grouped, 1, 1, d, 0, 0);
  ASSERT_EQ(static_cast<int64_t>(chan.group_spread.size()), d);
  for (int64_t i = 0; i < d; ++i) {
    const double* row = chan.rows.data() + i * d;
    double within = 0;
    for (int64_t m = 0; m < d; ++m) {
      double overlap = 0;
      for (int64_t c = 0; c < d; ++c) overlap += row[c] * grouped.key_group_vectors[m * d + c];
      within += grouped.key_group_eigenvalues[m] * overlap * overlap;
    }
    EXPECT_NEAR(chan.group_spread[i], within / (chan.key_std[i] * chan.key_std[i]), 1e-12) << i;
    EXPECT_GT(chan.group_spread[i], 0.0);
    EXPECT_LT(chan.group_spread[i], 1.0);
  }
  for (const char* other : {"qbasis:b3:g8:chan:iid", "qbasis:b3:g16:chan", "qbasis:b3:g8:tok"})
    EXPECT_TRUE(qbasis_head(parse_codec_spec(other), &grouped, 1, 1, d, 0, 0).group_spread.empty())
        << other;
  // Without measured distortions the allocation uses the spread model.
  EXPECT_TRUE(chan.group_distortion.empty());
  EXPECT_EQ(qbasis_distortion_table(chan, 8), qbasis_spread_distortion(chan.group_spread, 8));
  EXPECT_TRUE(qbasis_distortion_table(s.head, 8).empty());
  // Measured distortions: each basis kind reads its own rows, and the allocation uses them (f(0)
  // = 1 prepended) in place of the spread model.
  grouped.key_group_distortion.resize(static_cast<size_t>(QBasisSpec::kBases * d * kQBasisMaxBits));
  for (size_t i = 0; i < grouped.key_group_distortion.size(); ++i)
    grouped.key_group_distortion[i] = 1.0 / static_cast<double>(i + 2);
  for (const auto& [text, kind] :
       {std::pair{"qbasis:b3:g8:chan", QBasisSpec::Basis::Query},
        std::pair{"qbasis:b3:g8:chan:random", QBasisSpec::Basis::Random},
        std::pair{"qbasis:b3:g8:chan:keypca", QBasisSpec::Basis::KeyPca}}) {
    const QBasisHead measured = qbasis_head(parse_codec_spec(text), &grouped, 1, 1, d, 0, 0);
    const std::span<const double> rows = grouped.key_group_distortion_rows(kind, 0, 0);
    ASSERT_EQ(rows.data(), grouped.key_group_distortion.data() +
                               static_cast<int64_t>(kind) * d * kQBasisMaxBits);
    EXPECT_EQ(measured.group_distortion, std::vector<double>(rows.begin(), rows.end())) << text;
    const std::vector<double> table = qbasis_distortion_table(measured, 8);
    ASSERT_EQ(static_cast<int64_t>(table.size()), d * kQBasisWidths);
    for (int64_t i = 0; i < d; ++i) {
      EXPECT_EQ(table[i * kQBasisWidths], 1.0);
      for (int b = 1; b <= kQBasisMaxBits; ++b)
        EXPECT_EQ(table[i * kQBasisWidths + b], rows[i * kQBasisMaxBits + b - 1]);
    }
  }
  EXPECT_TRUE(qbasis_head(parse_codec_spec("qbasis:b3:g8:chan:iid"), &grouped, 1, 1, d, 0, 0)
                  .group_distortion.empty());
  // :fisher needs the tables, measured for this group and window.
  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_head(parse_codec_spec("qbasis:b3:g8:chan:r16:fisher"), &grouped, 1,
                                     1, d, 0, 0);
                       }),
                       "needs the attention-weighted errors"));
  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_head(parse_codec_spec("qbasis:b3:g16:chan:r16:fisher"), &grouped, 1,
                                     1, d, 0, 0);
                       }),
                       "groups of the calibrated size (8 tokens)"));
  grouped.key_window = 16;
  grouped.key_fisher.assign(static_cast<size_t>(QBasisSpec::kBases * d * kQBasisWidths), 0.5);
  EXPECT_EQ(qbasis_head(parse_codec_spec("qbasis:b3:g8:chan:r16:fisher"), &grouped, 1, 1, d, 0, 0)
                .fisher.size(),
            static_cast<size_t>(d * kQBasisWidths));
  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_head(parse_codec_spec("qbasis:b3:g8:chan:r32:fisher"), &grouped, 1,
                                     1, d, 0, 0);
                       }),
                       "16-token fp16 window"));

  // What a basis must hold.
  const CodecSpec spec = parse_codec_spec("qbasis:b3:g8:tok");
  EXPECT_TRUE(contains(error_of([&] { qbasis_head(spec, nullptr, 1, 1, d, 0, 0); }),
                       "needs a calibrated basis"));
  HeadqBasisVectors low = s.basis;
  low.rank = 8;
  low.query_vectors.resize(8 * d);
  low.key_vectors.resize(8 * d);
  EXPECT_TRUE(contains(error_of([&] { qbasis_head(spec, &low, 1, 1, d, 0, 0); }),
                       "calibrate with --rank 16"));
  HeadqBasisVectors no_means = s.basis;
  no_means.key_means.clear();
  EXPECT_TRUE(
      contains(error_of([&] { qbasis_head(spec, &no_means, 1, 1, d, 0, 0); }), "no key means"));
}

TEST(QBasisStore, RoundTripWithinHalfAStep) {
  const int64_t d = 16, n = 100;
  const SyntheticHead s = synthetic_head(d);
  const std::vector<float> keys = random_keys(n, d, 3);
  for (const char* text : {"qbasis:b3:g4:tok", "qbasis:b2.5:g8:chan", "qbasis:b4:g16:chan:r8"}) {
    const CodecSpec spec = parse_codec_spec(text);
    const auto store = make_qbasis_key_store(spec, s.head);
    for (int64_t t = 0; t < n; ++t) store->append(std::span(keys).subspan(t * d, d));
    const QBasisLayout& layout = store->layout();
    EXPECT_LE(layout.used_bits, layout.budget_bits) << text;
    EXPECT_GT(layout.stored_directions, 0) << text;
    EXPECT_LT(layout.stored_directions, d) << text;  // the least-seen directions get nothing
    EXPECT_EQ(store->size(), n);
    std::vector<float> out(d);
    for (int64_t t = 0; t < store->quantized_size(); ++t) {
      store->reconstruct(t, out);
      for (int64_t i = 0; i < d; ++i) {
        const double* u = s.head.rows.data() + i * d;
        double c = 0, c_hat = 0;
        for (int64_t k = 0; k < d; ++k) {
          c += u[k] * keys[t * d + k];
          c_hat += u[k] * out[k];
        }
        const int b = layout.bits[i];
        if (b == 0) {
          EXPECT_NEAR(c_hat, s.head.key_mean[i], 1e-4) << text << " direction " << i;
        } else {
          // Within half a step of a grid spanning at most the values' range (plus fp16 rounding
          // of the window form and of the scale).
          const double step = 2 * 8.0 * s.head.key_std[i] / ((1 << b) - 1) + 0.05;
          EXPECT_LE(std::abs(c_hat - c), step / 2 + 0.02) << text << " direction " << i;
        }
      }
    }
    // Window keys read back as their fp16 form.
    for (int64_t t = store->quantized_size(); t < n; ++t) {
      store->reconstruct(t, out);
      for (int64_t k = 0; k < d; ++k) EXPECT_NEAR(out[k], keys[t * d + k], 2e-3);
    }
  }
}

TEST(QBasisStore, ErrorShrinksWithBudgetAndFollowsQueries) {
  const int64_t d = 16, n = 256;
  const SyntheticHead s = synthetic_head(d);
  const std::vector<float> keys = random_keys(n, d, 5);
  // Query-weighted error Σ λ_i (u_i·e)² per key, at rising budgets.
  std::vector<double> errors;
  // At d = 16, b2 (32 bits per key) pays for one scale pair and no codes: every key reads as
  // the mean, as it does at b1.
  for (const char* text :
       {"qbasis:b1:g8:tok", "qbasis:b2:g8:tok", "qbasis:b3:g8:tok", "qbasis:b5:g8:tok"}) {
    const auto store = make_qbasis_key_store(parse_codec_spec(text), s.head);
    for (int64_t t = 0; t < n; ++t) store->append(std::span(keys).subspan(t * d, d));
    double sum = 0;
    std::vector<float> out(d);
    for (int64_t t = 0; t < n; ++t) {
      store->reconstruct(t, out);
      for (int64_t i = 0; i < d; ++i) {
        double e = 0;
        for (int64_t k = 0; k < d; ++k) e += s.head.rows[i * d + k] * (keys[t * d + k] - out[k]);
        sum += s.head.query_energy[i] * e * e;
      }
    }
    errors.push_back(sum / n);
  }
  EXPECT_NEAR(errors[0], errors[1], 1e-6 * errors[0]);
  EXPECT_GT(errors[1], 4 * errors[2]);
  EXPECT_GT(errors[2], 4 * errors[3]);
}

TEST(QBasisStore, StoredBytesAreTheBudget) {
  const int64_t d = 16;
  const SyntheticHead s = synthetic_head(d);
  const std::vector<float> keys = random_keys(300, d, 9);
  for (const char* text : {"qbasis:b3:g4:tok", "qbasis:b2.5:g8:chan", "qbasis:b2:g32:chan:r16",
                           "qbasis:b3:g8:tok:r5"}) {
    const CodecSpec spec = parse_codec_spec(text);
    const auto store = make_qbasis_key_store(spec, s.head);
    for (int64_t t = 0; t < 300; ++t) {
      store->append(std::span(keys).subspan(t * d, d));
      const int64_t exact = codec_stored_bits(spec, d, t + 1);
      EXPECT_EQ(store->quantized_size(), quantized_tokens(spec, t + 1)) << text;
      // Codes form one bit stream: at most 7 bits of its last byte are beyond the budget.
      EXPECT_GE(store->stored_bytes() * 8, exact) << text << " at " << t + 1;
      EXPECT_LT(store->stored_bytes() * 8, exact + 8) << text << " at " << t + 1;
    }
  }
}

TEST(QBasisStore, ScoresAreQueryDotStoredKeyInFloat64) {
  const int64_t d = 16, n = 70;
  const SyntheticHead s = synthetic_head(d);
  const std::vector<float> keys = random_keys(n, d, 13);
  const std::vector<float> queries = random_queries(3, d, 17);
  for (const char* text : {"qbasis:b3:g4:tok", "qbasis:b2.5:g8:chan:r16"}) {
    const auto store = make_qbasis_key_store(parse_codec_spec(text), s.head);
    for (int64_t t = 0; t < n; ++t) store->append(std::span(keys).subspan(t * d, d));
    std::vector<int32_t> picked;
    for (int32_t t = 0; t < n; t += 3) picked.push_back(t);
    const PositionSet positions = PositionSet::list(picked);
    std::vector<float> scores(3 * picked.size());
    store->dot(queries, positions, scores);
    std::vector<float> key(d);
    for (size_t i = 0; i < picked.size(); ++i) {
      store->reconstruct(picked[i], key);
      for (int64_t q = 0; q < 3; ++q) {
        double exact = 0, scale = 0;
        for (int64_t c = 0; c < d; ++c) {
          exact += static_cast<double>(queries[q * d + c]) * key[c];
          scale += std::abs(static_cast<double>(queries[q * d + c]) * key[c]);
        }
        EXPECT_NEAR(scores[q * picked.size() + i], exact, 1e-5 * (1 + scale))
            << text << " position " << picked[i];
      }
    }
  }
}

TEST(QBasisCache, BuiltFromABasisAndRefusedOtherwise) {
  const int64_t d = 16;
  SyntheticHead s = synthetic_head(d);
  const CacheShape shape{1, 1, d};
  auto cache = make_cache(shape, "qbasis:b3:g8:chan:r16", "f32", 0, 32, &s.basis);
  EXPECT_TRUE(contains(cache->describe(), "qbasis:b3:g8:chan:r16 (3 bits/elt; 16-23 newest"))
      << cache->describe();
  const std::vector<float> keys = random_keys(64, d, 21);
  for (int64_t t = 0; t < 64; ++t)
    cache->append(0, std::span(keys).subspan(t * d, d), std::span(keys).subspan(t * d, d), 1);
  const auto* codec = dynamic_cast<const CodecCache*>(cache.get());
  ASSERT_NE(codec, nullptr);
  // f32 values, and keys at exactly the budget (up to the last byte of the code stream).
  const int64_t beyond =
      codec->stored_bytes() * 8 - 64 * d * 32 - codec_stored_bits(codec->key_spec(), d, 64);
  EXPECT_GE(beyond, 0);
  EXPECT_LT(beyond, 8);
  EXPECT_TRUE(contains(error_of([&] { make_cache(shape, "qbasis:b3:g8:tok", "f32"); }),
                       "needs a calibrated basis"));
  EXPECT_TRUE(
      contains(error_of([&] { make_cache(shape, "f32", "qbasis:b3:g8:tok"); }), "keys only"));
}

// The measured distortion is what a store of that head really does to each direction: keys coded
// by a per-channel store at its allocated widths and reconstructed have, direction by direction,
// the measured mean squared error at those widths. Constant directions cost nothing, and
// independent Gaussian coordinates cost about the i.i.d. model's κ / (2^b - 1)².
TEST(QBasisDistortion, MeasuredIsWhatTheStoreDoes) {
  const int64_t d = 16, group = 8, tokens = 512 * group;
  const SyntheticHead s = synthetic_head(d);
  std::vector<float> keys = random_keys(tokens, d, 21);
  for (float& x : keys) x = fp16_to_float(float_to_fp16(x));  // what the store quantizes
  const std::vector<double> measured = qbasis_measure_group_distortion(s.head, keys, group);
  ASSERT_EQ(static_cast<int64_t>(measured.size()), d * kQBasisMaxBits);

  QBasisHead head = s.head;
  head.group_distortion = measured;
  const CodecSpec spec = parse_codec_spec("qbasis:b3:g8:chan");
  const auto store = make_qbasis_key_store(spec, head);
  for (int64_t t = 0; t < tokens; ++t)
    store->append(std::span<const float>(keys).subspan(t * d, d));
  ASSERT_EQ(store->quantized_size(), tokens);
  const std::vector<int>& bits = store->layout().bits;
  EXPECT_EQ(bits, qbasis_allocate(
                      [&] {
                        std::vector<double> w(d);
                        for (int64_t i = 0; i < d; ++i)
                          w[i] = head.query_energy[i] * head.key_std[i] * head.key_std[i];
                        return w;
                      }(),
                      store->layout().budget_bits, CodecSpec::Axis::Channels, group,
                      qbasis_distortion_table(head, group)));
  std::vector<double> squared(d, 0.0);
  std::vector<float> reconstructed(d);
  for (int64_t t = 0; t < tokens; ++t) {
    store->reconstruct(t, reconstructed);
    for (int64_t i = 0; i < d; ++i) {
      const double* u = head.rows.data() + i * d;
      double exact = 0, coded = 0;
      for (int64_t c = 0; c < d; ++c)
        exact += u[c] * keys[t * d + c], coded += u[c] * reconstructed[c];
      const double error = (coded - exact) / head.key_std[i];
      squared[i] += error * error;
    }
  }
  int stored = 0;
  for (int64_t i = 0; i < d; ++i) {
    if (bits[i] == 0) continue;
    ++stored;
    const double f = measured[i * kQBasisMaxBits + bits[i] - 1];
    EXPECT_NEAR(squared[i] / tokens, f, 1e-3 * f + 1e-9)
        << "direction " << i << ", " << bits[i] << " bits";
  }
  EXPECT_GT(stored, 2);

  // More bits, less error; at 6 bits the high-rate formula holds: the group's least and greatest
  // values sit on the grid, the other G - 2 carry a uniform rounding error over the group's range,
  // so f = (G - 2) / G · E[R²] / (12 (2^6 - 1)²), R measured here in float64.
  for (int64_t i = 0; i < d; ++i) {
    for (int b = 2; b <= kQBasisMaxBits; ++b)
      EXPECT_LT(measured[i * kQBasisMaxBits + b - 1], measured[i * kQBasisMaxBits + b - 2]) << i;
    double range_squared = 0;
    for (int64_t g = 0; g < tokens / group; ++g) {
      double lo = INFINITY, hi = -INFINITY;
      for (int64_t t = g * group; t < (g + 1) * group; ++t) {
        double c = 0;
        for (int64_t k = 0; k < d; ++k) c += head.rows[i * d + k] * keys[t * d + k];
        const double x = (c - head.key_mean[i]) / head.key_std[i];
        lo = std::min(lo, x);
        hi = std::max(hi, x);
      }
      range_squared += (hi - lo) * (hi - lo) / static_cast<double>(tokens / group);
    }
    const double high_rate =
        static_cast<double>(group - 2) / group * range_squared / (12.0 * 63.0 * 63.0);
    EXPECT_NEAR(measured[i * kQBasisMaxBits + 6 - 1], high_rate, 0.1 * high_rate) << i;
  }

  // Keys constant within each group: coding them loses only the fp16 rounding of the range.
  std::vector<float> steps(keys.size());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < d; ++c) steps[t * d + c] = keys[(t / group) * group * d + c];
  for (double f : qbasis_measure_group_distortion(s.head, steps, group)) EXPECT_LT(f, 1e-5);

  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_measure_group_distortion(
                             s.head, std::span<const float>(keys).first(5 * d), group);
                       }),
                       "not whole groups of 8"));
}

// The query-weighted key PCA is not orthonormal: keys are coded on rows t_i and queries read the
// dual rows s_i (s_i·t_j = δ_ij). Its weights are s_iᵀ Σ_q s_i, its spreads those of t_i·k, the
// store's scores are q·k̂ of its reconstruction, and at 8 bits the reconstruction is the key.
TEST(QBasisWeighted, DualRowsCarryTheQueriesAndInvertTheRows) {
  const int64_t d = 16, n = 64;
  const SyntheticHead s = synthetic_head(d);
  HeadqBasisVectors b = s.basis;
  for (double& m : b.key_means) m *= 0.3;  // every direction of positive variance
  const std::vector<double> u = random_orthonormal_rows(d, d, 31);
  b.weighted_rows.resize(static_cast<size_t>(d * d));
  b.weighted_dual_rows.resize(b.weighted_rows.size());
  for (int64_t i = 0; i < d; ++i) {
    const double scale = 0.25 + 0.5 * static_cast<double>(i);
    for (int64_t c = 0; c < d; ++c) {
      b.weighted_rows[i * d + c] = scale * u[i * d + c];
      b.weighted_dual_rows[i * d + c] = u[i * d + c] / scale;
    }
  }
  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_head(parse_codec_spec("qbasis:b3:g8:chan:weighted"), &s.basis, 1, 1,
                                     d, 0, 0);
                       }),
                       "needs the query-weighted key basis"));
  const QBasisHead head =
      qbasis_head(parse_codec_spec("qbasis:b16:g8:chan:weighted"), &b, 1, 1, d, 0, 0);
  EXPECT_EQ(head.rows, b.weighted_rows);
  EXPECT_EQ(head.dual_rows, b.weighted_dual_rows);
  // Direction 5 the slow way: λ from s_5 and Σ_q, m and σ from t_5 and the key moments.
  const double* t5 = b.weighted_rows.data() + 5 * d;
  const double* s5 = b.weighted_dual_rows.data() + 5 * d;
  double lambda = 0, second = 0, mean = 0;
  for (int64_t m = 0; m < d; ++m) {
    double over_q = 0, over_k = 0;
    for (int64_t c = 0; c < d; ++c)
      over_q += s5[c] * b.query_vectors[m * d + c], over_k += t5[c] * b.key_vectors[m * d + c];
    lambda += b.query_eigenvalues[m] * over_q * over_q;
    second += b.key_eigenvalues[m] * over_k * over_k;
  }
  for (int64_t c = 0; c < d; ++c) mean += t5[c] * b.key_means[c];
  EXPECT_NEAR(head.query_energy[5], lambda, 1e-9 * lambda);
  EXPECT_NEAR(head.key_mean[5], mean, 1e-12);
  EXPECT_NEAR(head.key_std[5], std::sqrt(second - mean * mean), 1e-9);

  const std::vector<float> keys = random_keys(n, d, 41);
  const std::vector<float> queries = random_queries(2, d, 43);
  for (const char* text : {"qbasis:b16:g8:chan:weighted", "qbasis:b3:g4:tok:weighted"}) {
    const auto store = make_qbasis_key_store(parse_codec_spec(text), head);
    for (int64_t t = 0; t < n; ++t) store->append(std::span(keys).subspan(t * d, d));
    if (std::string(text).find("b16") != std::string::npos)
      for (int b : store->layout().bits) EXPECT_EQ(b, 8);
    std::vector<int32_t> all(n);
    for (int32_t t = 0; t < n; ++t) all[t] = t;
    std::vector<float> scores(2 * n), key(d);
    store->dot(queries, PositionSet::list(all), scores);
    const bool fine = std::string(text).find("b16") != std::string::npos;
    for (int64_t t = 0; t < n; ++t) {
      store->reconstruct(t, key);
      double norm = 0, error = 0;
      for (int64_t c = 0; c < d; ++c) {
        norm += keys[t * d + c] * keys[t * d + c];
        error += (key[c] - keys[t * d + c]) * (key[c] - keys[t * d + c]);
      }
      if (fine) EXPECT_LT(std::sqrt(error), 0.02 * std::sqrt(norm)) << text << " key " << t;
      for (int64_t q = 0; q < 2; ++q) {
        double exact = 0, scale = 0;
        for (int64_t c = 0; c < d; ++c) {
          exact += static_cast<double>(queries[q * d + c]) * key[c];
          scale += std::abs(static_cast<double>(queries[q * d + c]) * key[c]);
        }
        EXPECT_NEAR(scores[q * n + t], exact, 1e-5 * (1 + scale)) << text << " key " << t;
      }
    }
  }
}

// The Fisher table: per direction, (s_i·q)² times the variance under the query's attention of the
// coding error of the keys a store would hold quantized at that query (the rest are exact), summed
// over the watched queries. Checked at 0 bits (read as the mean) against float64 and a real
// store's quantized count, and at 8 bits against nearly nothing.
TEST(QBasisFisher, IsTheAttentionWeightedScoreErrorOfTheCodedKeys) {
  const int64_t d = 8, group = 4, window = 8, n = 64;
  const SyntheticHead s = synthetic_head(d);
  std::vector<float> keys = random_keys(n, d, 51);
  for (float& x : keys) x = fp16_to_float(float_to_fp16(x));
  std::mt19937 rng(53);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct Query {
    int64_t position;
    std::vector<float> query, weights;
    std::vector<int32_t> positions;
  };
  std::vector<Query> queries;
  for (int64_t position : {5, 20, 41, 63}) {
    Query q{position, std::vector<float>(d), {}, {}};
    for (float& x : q.query) x = normal(rng);
    double total = 0;
    for (int64_t j = 0; j <= position; ++j) {
      q.positions.push_back(static_cast<int32_t>(j));
      q.weights.push_back(std::exp(normal(rng)));
      total += q.weights.back();
    }
    for (float& w : q.weights) w = static_cast<float>(w / total);
    queries.push_back(std::move(q));
  }
  std::vector<ObservedQuery> observed;
  for (const Query& q : queries) observed.push_back({q.position, q.query, q.positions, q.weights});
  std::vector<double> fisher(static_cast<size_t>(d * kQBasisWidths), 0.0);
  qbasis_accumulate_fisher(s.head, keys, group, window, observed, fisher);

  std::vector<double> expected(d, 0.0);
  for (const Query& q : queries) {
    // How many of the query's keys a store with this window and group holds quantized.
    const auto store = make_qbasis_key_store(
        parse_codec_spec(str_cat("qbasis:b16:g", group, ":chan:r", window)), s.head);
    for (int64_t t = 0; t <= q.position; ++t) store->append(std::span(keys).subspan(t * d, d));
    const int64_t coded = store->quantized_size();
    if (q.position == 5) EXPECT_EQ(coded, 0);
    for (int64_t i = 0; i < d; ++i) {
      const double* u = s.head.rows.data() + i * d;
      double projection = 0, first = 0, second = 0;
      for (int64_t c = 0; c < d; ++c) projection += u[c] * q.query[c];
      for (int64_t j = 0; j < coded; ++j) {
        double coordinate = 0;
        for (int64_t c = 0; c < d; ++c) coordinate += u[c] * keys[j * d + c];
        const double error = s.head.key_mean[i] - coordinate;
        first += q.weights[j] * error;
        second += q.weights[j] * error * error;
      }
      expected[i] += projection * projection * (second - first * first);
    }
  }
  for (int64_t i = 0; i < d; ++i) {
    EXPECT_NEAR(fisher[i * kQBasisWidths], expected[i], 1e-4 * expected[i]) << i;
    EXPECT_GT(expected[i], 0.0);
    EXPECT_LT(fisher[i * kQBasisWidths + 8], 1e-3 * fisher[i * kQBasisWidths]) << i;
    EXPECT_LT(fisher[i * kQBasisWidths + 3], fisher[i * kQBasisWidths + 1]) << i;
  }
  // The allocation reads it over the weights λ_i σ_i².
  QBasisHead with = s.head;
  with.fisher = fisher;
  const std::vector<double> table = qbasis_distortion_table(with, group);
  for (int64_t i = 0; i < d; ++i)
    EXPECT_NEAR(table[i * kQBasisWidths + 2] * s.head.query_energy[i] * s.head.key_std[i] *
                    s.head.key_std[i],
                fisher[i * kQBasisWidths + 2], 1e-12 * (1 + fisher[i * kQBasisWidths + 2]));
  EXPECT_TRUE(contains(error_of([&] {
                         qbasis_accumulate_fisher(s.head, std::span<const float>(keys).first(3 * d),
                                                  group, window, observed, fisher);
                       }),
                       "not whole groups of 4"));
}

}  // namespace
}  // namespace visikv

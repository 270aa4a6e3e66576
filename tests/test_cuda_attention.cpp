// The CUDA kernels (cuda/attention.h) against float64 references on fresh random inputs. Every
// kernel test needs a GPU and is reported as skipped (not passed) without one; the shape checks
// at the end run everywhere. Outputs are poisoned (NaN) before each run, so a position the kernel
// fails to write shows up as a failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/half.h"
#include "visikv/cuda/attention.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/headq.h"

namespace visikv {
namespace {

using test_support::error_of;
using test_support::random_vector;

#define REQUIRE_GPU()                                                          \
  do {                                                                         \
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device available"; \
  } while (false)

// Fresh inputs on every run; the seed is printed so a failure can be replayed.
uint32_t fresh_seed() {
  const uint32_t seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  return seed;
}

uint16_t to_element(float x, cuda::Element element) {
  return element == cuda::Element::BF16 ? float_to_bf16(x) : float_to_fp16(x);
}
float from_element(uint16_t x, cuda::Element element) {
  return element == cuda::Element::BF16 ? bf16_to_float(x) : fp16_to_float(x);
}

// softmax(scale · q·k_j) weighted sum of v_j over `support`, in float64.
std::vector<double> reference_attention(
    std::span<const float> query,
    const std::function<void(int64_t, std::vector<double>&, std::vector<double>&)>& row,
    std::span<const int64_t> support, double scale) {
  const size_t d = query.size();
  std::vector<double> scores(support.size()), key(d), value(d), out(d, 0.0);
  for (size_t i = 0; i < support.size(); ++i) {
    row(support[i], key, value);
    double dot = 0;
    for (size_t c = 0; c < d; ++c) dot += query[c] * key[c];
    scores[i] = scale * dot;
  }
  const double top = *std::max_element(scores.begin(), scores.end());
  double total = 0;
  for (size_t i = 0; i < support.size(); ++i) {
    const double w = std::exp(scores[i] - top);
    total += w;
    row(support[i], key, value);
    for (size_t c = 0; c < d; ++c) out[c] += w * value[c];
  }
  for (double& x : out) x /= total;
  return out;
}

double relative_error(std::span<const float> got, std::span<const double> expected) {
  double diff = 0, norm = 0;
  for (size_t c = 0; c < expected.size(); ++c) {
    if (!std::isfinite(got[c])) return INFINITY;
    diff += (got[c] - expected[c]) * (got[c] - expected[c]);
    norm += expected[c] * expected[c];
  }
  return std::sqrt(diff / std::max(norm, 1e-300));
}

std::vector<int64_t> iota_positions(int64_t n) {
  std::vector<int64_t> positions(n);
  std::iota(positions.begin(), positions.end(), 0);
  return positions;
}

// A dense test problem: float originals and their bf16 / fp16 roundings.
struct DenseProblem {
  cuda::AttentionShape shape;
  cuda::Element element;
  std::vector<int32_t> lengths;
  std::vector<float> keys, values, queries;  // originals
  std::vector<uint16_t> key_bits, value_bits;

  DenseProblem(cuda::AttentionShape s, cuda::Element e, std::vector<int32_t> lens,
               std::mt19937& rng)
      : shape(s), element(e), lengths(std::move(lens)) {
    const size_t cache = static_cast<size_t>(s.sequences * s.kv_heads * s.capacity * s.head_dim);
    keys = random_vector(rng, cache);
    values = random_vector(rng, cache);
    queries = random_vector(rng, static_cast<size_t>(s.sequences * s.q_heads * s.head_dim), 2.0f);
    for (float x : keys) key_bits.push_back(to_element(x, e));
    for (float x : values) value_bits.push_back(to_element(x, e));
  }
  int64_t at(int64_t sequence, int64_t kv_head, int64_t position) const {
    return ((sequence * shape.kv_heads + kv_head) * shape.capacity + position) * shape.head_dim;
  }
  std::span<const float> query(int64_t sequence, int64_t q_head) const {
    return std::span(queries).subspan((sequence * shape.q_heads + q_head) * shape.head_dim,
                                      shape.head_dim);
  }
  // Rows as stored (rounded) or as given (originals).
  auto rows(int64_t sequence, int64_t kv_head, bool rounded) const {
    return [this, sequence, kv_head, rounded](int64_t j, std::vector<double>& k,
                                              std::vector<double>& v) {
      const int64_t base = at(sequence, kv_head, j);
      for (int64_t c = 0; c < shape.head_dim; ++c) {
        k[c] = rounded ? from_element(key_bits[base + c], element) : keys[base + c];
        v[c] = rounded ? from_element(value_bits[base + c], element) : values[base + c];
      }
    };
  }
  cuda::DenseCache upload() const {
    return {element, cuda::DeviceArray<uint16_t>(std::span<const uint16_t>(key_bits)),
            cuda::DeviceArray<uint16_t>(std::span<const uint16_t>(value_bits))};
  }
};

// Cases print their sequence lengths (the other fields are printed by the tests that fail).
template <typename Case>
requires requires(const Case& c) { c.lengths; }
void PrintTo(const Case& c, std::ostream* out) {
  *out << "lengths";
  for (int32_t n : c.lengths) *out << " " << n;
}

// Parameterised cases are named by their index.
constexpr auto kCaseName = [](const auto& info) { return "case" + std::to_string(info.index); };

struct DecodeCase {
  cuda::Element element;
  int64_t q_heads, kv_heads, head_dim;
  std::vector<int32_t> lengths;
};

class CudaDenseDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(CudaDenseDecode, MatchesFloat64) {
  REQUIRE_GPU();
  const DecodeCase& c = GetParam();
  std::mt19937 rng(fresh_seed());
  const int64_t capacity = *std::max_element(c.lengths.begin(), c.lengths.end()) + 5;
  const cuda::AttentionShape shape{static_cast<int64_t>(c.lengths.size()), c.q_heads, c.kv_heads,
                                   c.head_dim, capacity};
  const DenseProblem problem(shape, c.element, c.lengths, rng);
  const cuda::DenseCache cache = problem.upload();
  cuda::DeviceArray<float> queries{std::span<const float>(problem.queries)};
  cuda::DeviceArray<int32_t> lengths{std::span<const int32_t>(problem.lengths)};
  cuda::DeviceArray<float> out(problem.queries.size());
  cuda::Workspace workspace;
  out.poison();
  cuda::decode_dense(shape, cache, queries, lengths, out, workspace);
  const std::vector<float> got = out.download();
  const double scale = 1.0 / std::sqrt(double(c.head_dim));
  double worst_rounded = 0, worst_original = 0;
  for (int64_t s = 0; s < shape.sequences; ++s)
    for (int64_t h = 0; h < shape.q_heads; ++h) {
      const int64_t kv = h / shape.group();
      const auto support = iota_positions(c.lengths[s]);
      const std::span<const float> mine =
          std::span(got).subspan((s * shape.q_heads + h) * c.head_dim, c.head_dim);
      worst_rounded = std::max(
          worst_rounded,
          relative_error(mine, reference_attention(problem.query(s, h), problem.rows(s, kv, true),
                                                   support, scale)));
      worst_original = std::max(
          worst_original,
          relative_error(mine, reference_attention(problem.query(s, h), problem.rows(s, kv, false),
                                                   support, scale)));
    }
  // Against the stored numbers only float32 accumulation differs; against the unrounded inputs
  // the bf16 / fp16 rounding of the cache shows (bf16: about 1e-3 to 1e-2).
  std::printf("relative error: %.3g vs stored inputs, %.3g vs unrounded inputs\n", worst_rounded,
              worst_original);
  EXPECT_LT(worst_rounded, 1e-5);
  EXPECT_LT(worst_original, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaDenseDecode,
    ::testing::Values(DecodeCase{cuda::Element::BF16, 32, 8, 128, {4099, 1, 777}},
                      DecodeCase{cuda::Element::BF16, 9, 3, 64, {2048, 513}},
                      DecodeCase{cuda::Element::F16, 8, 8, 128, {300, 1000, 17, 256}},
                      DecodeCase{cuda::Element::F16, 16, 2, 64, {20000}},
                      DecodeCase{cuda::Element::BF16, 4, 4, 64, {255, 256, 257}}),
    kCaseName);

struct IntCase {
  std::string keys, values;
  int64_t q_heads, kv_heads, head_dim;
  std::vector<int32_t> lengths;
};

class CudaIntDecode : public ::testing::TestWithParam<IntCase> {};

TEST_P(CudaIntDecode, MatchesTheCpuCodecsNumbers) {
  REQUIRE_GPU();
  const IntCase& c = GetParam();
  std::mt19937 rng(fresh_seed());
  const int64_t d = c.head_dim, sequences = static_cast<int64_t>(c.lengths.size());
  const int64_t capacity = *std::max_element(c.lengths.begin(), c.lengths.end()) + 3;
  const CodecSpec key_spec = parse_codec_spec(c.keys), value_spec = parse_codec_spec(c.values);
  const cuda::IntLayout layout = cuda::IntLayout::from_specs(key_spec, value_spec, d);
  cuda::IntCacheHost host(layout, sequences, c.kv_heads, capacity);
  if (key_spec.headq)
    for (int64_t h = 0; h < c.kv_heads; ++h)
      host.set_basis(h, headq_basis_rows(key_spec, nullptr, 1, c.kv_heads, d, 0, h));
  // The oracle: one CPU CodecCache per sequence holding the same keys and values.
  std::vector<std::unique_ptr<CodecCache>> oracles;
  for (int64_t s = 0; s < sequences; ++s) {
    oracles.push_back(std::make_unique<CodecCache>(CacheShape{1, c.kv_heads, d}, key_spec,
                                                   value_spec, c.lengths[s], 64));
    const std::vector<float> keys = random_vector(rng, c.lengths[s] * c.kv_heads * d);
    const std::vector<float> values = random_vector(rng, c.lengths[s] * c.kv_heads * d);
    oracles.back()->append(0, keys, values, c.lengths[s]);
    for (int64_t t = 0; t < c.lengths[s]; ++t)
      for (int64_t h = 0; h < c.kv_heads; ++h)
        host.store(s, h, t, std::span(keys).subspan((t * c.kv_heads + h) * d, d),
                   std::span(values).subspan((t * c.kv_heads + h) * d, d));
  }
  const cuda::AttentionShape shape{sequences, c.q_heads, c.kv_heads, d, capacity};
  const std::vector<float> query_values = random_vector(rng, sequences * c.q_heads * d, 2.0f);
  const cuda::IntCache cache = cuda::IntCache::upload(host);
  cuda::DeviceArray<float> queries{std::span<const float>(query_values)};
  cuda::DeviceArray<int32_t> lengths{std::span<const int32_t>(c.lengths)};
  cuda::DeviceArray<float> out(query_values.size());
  cuda::Workspace workspace;
  out.poison();
  cuda::decode_int(shape, cache, queries, lengths, out, workspace);
  const std::vector<float> got = out.download();
  double worst = 0;
  std::vector<float> key(d), value(d);
  for (int64_t s = 0; s < sequences; ++s)
    for (int64_t h = 0; h < c.q_heads; ++h) {
      const int64_t kv = h / shape.group();
      const auto rows = [&](int64_t j, std::vector<double>& k, std::vector<double>& v) {
        oracles[s]->stored_key(0, kv, j, key);  // k̂ + U_r ĉ: what scores see
        oracles[s]->stored_value(0, kv, j, value);
        std::copy(key.begin(), key.end(), k.begin());
        std::copy(value.begin(), value.end(), v.begin());
      };
      const auto expected =
          reference_attention(std::span(query_values).subspan((s * c.q_heads + h) * d, d), rows,
                              iota_positions(c.lengths[s]), 1.0 / std::sqrt(double(d)));
      worst = std::max(
          worst, relative_error(std::span(got).subspan((s * c.q_heads + h) * d, d), expected));
    }
  std::printf("relative error vs the CPU codec's numbers: %.3g\n", worst);
  EXPECT_LT(worst, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Specs, CudaIntDecode,
    ::testing::Values(
        IntCase{"int2:g64:tok", "int2:g64:tok", 32, 8, 128, {3000, 5}},
        IntCase{"int4:g64:tok", "int4:g64:tok", 9, 3, 64, {1500, 700, 1}},
        IntCase{"int2:g64:tok+headq:r8:s4:random", "int2:g64:tok", 32, 8, 128, {2500, 300}},
        IntCase{"int2:g64:tok+headq:r8:s4:random", "int2:g64:tok", 9, 3, 64, {1024}},
        IntCase{
            "int4:g32:tok+headq:r16:s2:random:wrongsign", "int2:g64:tok", 8, 2, 128, {999, 64}}),
    kCaseName);

// The candidate region of the query at position n - 1 (SELECTOR_SPECS.md).
struct HostRegion {
  int64_t anchors_end, tail_begin, first_block, blocks;
  HostRegion(int64_t n, int64_t anchors, int64_t window, int64_t block) {
    anchors_end = std::min(anchors, n);
    const int64_t window_begin = std::max<int64_t>(0, n - std::min(window, n));
    tail_begin = std::max(anchors_end, std::min(window_begin, (n - 1) / block * block));
    first_block = anchors_end / block;
    blocks = tail_begin > anchors_end ? (tail_begin - 1) / block - first_block + 1 : 0;
  }
};

// Per-block summaries of the stored keys, in float64.
struct HostSummary {
  std::vector<double> centroid, lo, hi;
};
HostSummary summarize(const DenseProblem& p, int64_t s, int64_t kv, int64_t first, int64_t end) {
  const int64_t d = p.shape.head_dim;
  HostSummary summary{std::vector<double>(d, 0.0), std::vector<double>(d, INFINITY),
                      std::vector<double>(d, -INFINITY)};
  for (int64_t j = first; j < end; ++j)
    for (int64_t c = 0; c < d; ++c) {
      const double x = from_element(p.key_bits[p.at(s, kv, j) + c], p.element);
      summary.centroid[c] += x / double(end - first);
      summary.lo[c] = std::min(summary.lo[c], x);
      summary.hi[c] = std::max(summary.hi[c], x);
    }
  return summary;
}
double rule_value(const HostSummary& summary, std::span<const float> q, cuda::BlockRule rule,
                  double scale) {
  double value = 0;
  for (size_t c = 0; c < q.size(); ++c)
    value += rule == cuda::BlockRule::Centroid
                 ? q[c] * summary.centroid[c]
                 : std::max(q[c] * summary.lo[c], q[c] * summary.hi[c]);
  return scale * value;
}

// The chosen blocks are a top set of the pooled values: none unchosen beats a chosen one by more
// than float32 rounding.
void expect_top_set(const std::vector<double>& pooled, const std::set<int64_t>& chosen,
                    size_t want) {
  ASSERT_EQ(chosen.size(), std::min(want, pooled.size()));
  double worst_chosen = INFINITY, best_other = -INFINITY, magnitude = 1e-30;
  for (size_t b = 0; b < pooled.size(); ++b) {
    magnitude = std::max(magnitude, std::abs(pooled[b]));
    if (chosen.count(static_cast<int64_t>(b)))
      worst_chosen = std::min(worst_chosen, pooled[b]);
    else
      best_other = std::max(best_other, pooled[b]);
  }
  EXPECT_GE(worst_chosen, best_other - 1e-4 * magnitude);
}

struct SparseCase {
  cuda::BlockRule rule;
  int64_t q_heads, kv_heads, head_dim, anchors, window, top_k, block;
  std::vector<int32_t> lengths;
};

class CudaSparseDecode : public ::testing::TestWithParam<SparseCase> {};

TEST_P(CudaSparseDecode, EqualsDenseAttentionOnItsSupport) {
  REQUIRE_GPU();
  const SparseCase& c = GetParam();
  std::mt19937 rng(fresh_seed());
  const int64_t capacity = *std::max_element(c.lengths.begin(), c.lengths.end()) + 7;
  const cuda::AttentionShape shape{static_cast<int64_t>(c.lengths.size()), c.q_heads, c.kv_heads,
                                   c.head_dim, capacity};
  const DenseProblem problem(shape, cuda::Element::BF16, c.lengths, rng);
  const cuda::DenseCache cache = problem.upload();
  cuda::DeviceArray<float> queries{std::span<const float>(problem.queries)};
  cuda::DeviceArray<int32_t> lengths{std::span<const int32_t>(problem.lengths)};
  cuda::BlockSummariesGpu summaries;
  cuda::summarize_blocks(shape, cache, lengths, c.block, summaries);
  const cuda::SparseSpec spec{c.anchors, c.window, c.top_k, c.rule};
  cuda::Support support;
  cuda::DeviceArray<int32_t> chosen;
  cuda::select_sparse(shape, summaries, queries, lengths, spec, support, &chosen);
  cuda::DeviceArray<float> out(problem.queries.size()), dense(problem.queries.size());
  cuda::Workspace workspace;
  out.poison();
  cuda::decode_dense(shape, cache, queries, lengths, out, workspace, &support);
  const std::vector<float> got = out.download();
  const std::vector<int32_t> positions = support.positions.download();
  const std::vector<int32_t> counts = support.counts.download();
  const std::vector<int32_t> blocks = chosen.download();
  const int64_t top_blocks = static_cast<int64_t>(blocks.size()) / (shape.sequences * c.kv_heads);
  const double scale = 1.0 / std::sqrt(double(c.head_dim));
  double worst = 0;
  for (int64_t s = 0; s < shape.sequences; ++s)
    for (int64_t kv = 0; kv < c.kv_heads; ++kv) {
      const int64_t n = c.lengths[s], head = s * c.kv_heads + kv;
      const HostRegion region(n, c.anchors, c.window, c.block);
      // The choice: a top set of the pooled rule values over the candidate blocks.
      std::vector<double> pooled(region.blocks, -INFINITY);
      for (int64_t b = 0; b < region.blocks; ++b) {
        const int64_t global = region.first_block + b;
        const HostSummary summary =
            summarize(problem, s, kv, global * c.block, std::min((global + 1) * c.block, n));
        for (int64_t g = 0; g < shape.group(); ++g)
          pooled[b] = std::max(
              pooled[b],
              rule_value(summary, problem.query(s, kv * shape.group() + g), c.rule, scale));
      }
      std::set<int64_t> mine;
      for (int64_t i = 0; i < top_blocks; ++i)
        if (blocks[head * top_blocks + i] >= 0)
          mine.insert(blocks[head * top_blocks + i] - region.first_block);
      expect_top_set(pooled, mine, spec.top_blocks(c.block));
      // The support: anchors, the chosen blocks' candidate positions, the tail; sorted.
      std::vector<int64_t> expected;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t b = j / c.block - region.first_block;
        if (j < region.anchors_end || j >= region.tail_begin || mine.count(b))
          expected.push_back(j);
      }
      ASSERT_EQ(counts[head], static_cast<int64_t>(expected.size())) << "sequence " << s;
      for (size_t i = 0; i < expected.size(); ++i)
        ASSERT_EQ(positions[head * support.max_support + i], expected[i]);
      for (int64_t g = 0; g < shape.group(); ++g) {
        const int64_t h = kv * shape.group() + g;
        worst = std::max(
            worst,
            relative_error(std::span(got).subspan((s * c.q_heads + h) * c.head_dim, c.head_dim),
                           reference_attention(problem.query(s, h), problem.rows(s, kv, true),
                                               expected, scale)));
      }
    }
  std::printf("relative error on the support: %.3g\n", worst);
  EXPECT_LT(worst, 1e-5);

  // With every block chosen the support is everything: the dense kernel's answer.
  cuda::SparseSpec everything = spec;
  everything.top_k = capacity;
  cuda::select_sparse(shape, summaries, queries, lengths, everything, support);
  out.poison();
  cuda::decode_dense(shape, cache, queries, lengths, out, workspace, &support);
  cuda::decode_dense(shape, cache, queries, lengths, dense, workspace);
  const std::vector<float> all = out.download(), reference = dense.download();
  for (size_t i = 0; i < all.size(); ++i) ASSERT_NEAR(all[i], reference[i], 1e-5) << i;
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaSparseDecode,
    ::testing::Values(SparseCase{cuda::BlockRule::Bound, 32, 8, 128, 1, 64, 1024, 64, {8192, 3000}},
                      SparseCase{cuda::BlockRule::Centroid, 32, 8, 128, 1, 64, 32, 64, {5000}},
                      SparseCase{cuda::BlockRule::Bound, 9, 3, 64, 4, 16, 100, 16, {2000, 77, 1}},
                      SparseCase{cuda::BlockRule::Centroid, 9, 3, 64, 0, 0, 64, 32, {1500, 600}}),
    kCaseName);

class CudaCertified : public ::testing::TestWithParam<double> {};

TEST_P(CudaCertified, BoundHoldsAgainstDenseAttention) {
  REQUIRE_GPU();
  const double eps = GetParam();
  std::mt19937 rng(fresh_seed());
  const std::vector<int32_t> lens{6000, 2500};
  const cuda::AttentionShape shape{2, 8, 2, 128, 6016};
  DenseProblem problem(shape, cuda::Element::BF16, lens, rng);
  // Plant a few keys the queries attend to strongly, so that a small support certifies.
  for (int64_t s = 0; s < shape.sequences; ++s)
    for (int64_t kv = 0; kv < shape.kv_heads; ++kv)
      for (int planted = 0; planted < 3; ++planted) {
        const int64_t j = std::uniform_int_distribution<int64_t>(0, lens[s] - 1)(rng);
        for (int64_t c = 0; c < shape.head_dim; ++c) {
          const float x = 0.25f * problem.query(s, kv * shape.group())[c];
          problem.key_bits[problem.at(s, kv, j) + c] = to_element(x, problem.element);
        }
      }
  const cuda::DenseCache cache = problem.upload();
  cuda::DeviceArray<float> queries{std::span<const float>(problem.queries)};
  cuda::DeviceArray<int32_t> lengths{std::span<const int32_t>(problem.lengths)};
  cuda::BlockSummariesGpu summaries;
  cuda::summarize_blocks(shape, cache, lengths, 64, summaries);
  cuda::Support support;
  cuda::DeviceArray<float> delta;
  cuda::select_certified(shape, cache, summaries, queries, lengths, 1, 64, eps, support, delta);
  cuda::DeviceArray<float> out(problem.queries.size());
  cuda::Workspace workspace;
  out.poison();
  cuda::decode_dense(shape, cache, queries, lengths, out, workspace, &support);
  const std::vector<float> got = out.download(), deltas = delta.download();
  const std::vector<int32_t> positions = support.positions.download(),
                             counts = support.counts.download();
  const double scale = 1.0 / std::sqrt(128.0);
  for (int64_t s = 0; s < shape.sequences; ++s)
    for (int64_t kv = 0; kv < shape.kv_heads; ++kv) {
      const int64_t head = s * shape.kv_heads + kv, n = lens[s];
      std::vector<int64_t> chosen(positions.begin() + head * support.max_support,
                                  positions.begin() + head * support.max_support + counts[head]);
      ASSERT_TRUE(std::is_sorted(chosen.begin(), chosen.end()));
      for (int64_t g = 0; g < shape.group(); ++g) {
        const int64_t h = kv * shape.group() + g;
        const double d = deltas[s * shape.q_heads + h];
        EXPECT_LE(d, eps);
        // The true dropped mass and the output error, from float64 dense attention.
        const auto rows = problem.rows(s, kv, true);
        std::vector<double> key(128), value(128), scores(n);
        double top = -INFINITY, max_norm = 0;
        for (int64_t j = 0; j < n; ++j) {
          rows(j, key, value);
          double dot = 0, norm = 0;
          for (int c = 0; c < 128; ++c) {
            dot += problem.query(s, h)[c] * key[c];
            norm += value[c] * value[c];
          }
          scores[j] = scale * dot;
          top = std::max(top, scores[j]);
          max_norm = std::max(max_norm, std::sqrt(norm));
        }
        double total = 0, kept = 0;
        std::set<int64_t> in(chosen.begin(), chosen.end());
        for (int64_t j = 0; j < n; ++j) {
          total += std::exp(scores[j] - top);
          if (in.count(j)) kept += std::exp(scores[j] - top);
        }
        EXPECT_LE(1.0 - kept / total, d + 1e-6) << "dropped mass above the certificate";
        const auto dense = reference_attention(problem.query(s, h), rows, iota_positions(n), scale);
        double diff = 0;
        for (int c = 0; c < 128; ++c) {
          const double e = got[(s * shape.q_heads + h) * 128 + c] - dense[c];
          diff += e * e;
        }
        EXPECT_LE(std::sqrt(diff), 2 * d * max_norm + 1e-4 * max_norm);
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Targets, CudaCertified, ::testing::Values(0.1, 0.01, 1e-3));

struct PrefillCase {
  cuda::Element element;
  cuda::BlockRule rule;
  int64_t q_heads, kv_heads, head_dim, anchors, window, top_k;
  std::vector<int32_t> lengths;
};

class CudaSparsePrefill : public ::testing::TestWithParam<PrefillCase> {};

TEST_P(CudaSparsePrefill, MatchesFloat64OnTheChosenSupport) {
  REQUIRE_GPU();
  const PrefillCase& c = GetParam();
  std::mt19937 rng(fresh_seed());
  constexpr int64_t B = cuda::kPrefillBlock;
  const int64_t capacity = (*std::max_element(c.lengths.begin(), c.lengths.end()) + B - 1) / B * B;
  const cuda::AttentionShape shape{static_cast<int64_t>(c.lengths.size()), c.q_heads, c.kv_heads,
                                   c.head_dim, capacity};
  const DenseProblem problem(shape, c.element, c.lengths, rng);
  const int64_t d = c.head_dim;
  // Prefill queries {sequences, q_heads, capacity, d}.
  const std::vector<float> query_values =
      random_vector(rng, shape.sequences * c.q_heads * capacity * d, 2.0f);
  std::vector<uint16_t> query_bits;
  for (float x : query_values) query_bits.push_back(to_element(x, c.element));
  const cuda::DenseCache cache = problem.upload();
  cuda::DeviceArray<uint16_t> queries{std::span<const uint16_t>(query_bits)};
  cuda::DeviceArray<int32_t> lengths{std::span<const int32_t>(problem.lengths)};
  cuda::BlockSummariesGpu summaries;
  cuda::summarize_blocks(shape, cache, lengths, B, summaries);
  const cuda::SparseSpec spec{c.anchors, c.window, c.top_k, c.rule};
  cuda::DeviceArray<int32_t> chosen;
  cuda::select_prefill(shape, summaries, c.element, queries, lengths, spec, chosen);
  cuda::DeviceArray<float> out(query_bits.size());
  out.poison();
  cuda::sparse_prefill(shape, cache, queries, lengths, spec, chosen, out);
  const std::vector<float> got = out.download();
  const std::vector<int32_t> blocks = chosen.download();
  const int64_t query_blocks = capacity / B, top_blocks = spec.top_blocks(B);
  const double scale = 1.0 / std::sqrt(double(d));
  double worst = 0;
  std::vector<float> query(d);
  for (int64_t s = 0; s < shape.sequences; ++s)
    for (int64_t kv = 0; kv < c.kv_heads; ++kv)
      for (int64_t qb = 0; qb * B < c.lengths[s]; ++qb) {
        const int64_t row0 = qb * B, rows = std::min(B, c.lengths[s] - row0);
        // The choice: a top set over the candidates, ranked with the block's mean query.
        const int64_t first = c.anchors / B;
        const int64_t end = std::max<int64_t>(0, row0 - c.window + 1) / B;
        std::vector<double> pooled;
        for (int64_t b = first; b < end; ++b) {
          const HostSummary summary = summarize(problem, s, kv, b * B, (b + 1) * B);
          double best = -INFINITY;
          for (int64_t g = 0; g < shape.group(); ++g) {
            const int64_t h = kv * shape.group() + g;
            for (int64_t ch = 0; ch < d; ++ch) {
              double sum = 0;
              for (int64_t r = 0; r < rows; ++r)
                sum += from_element(
                    query_bits[((s * c.q_heads + h) * capacity + row0 + r) * d + ch], c.element);
              query[ch] = static_cast<float>(sum / rows);
            }
            best = std::max(best, rule_value(summary, query, c.rule, scale));
          }
          pooled.push_back(best);
        }
        std::set<int64_t> mine;
        const int32_t* row_blocks =
            blocks.data() + ((s * c.kv_heads + kv) * query_blocks + qb) * top_blocks;
        for (int64_t i = 0; i < top_blocks; ++i)
          if (row_blocks[i] >= 0) mine.insert(row_blocks[i] - first);
        expect_top_set(pooled, mine, top_blocks);
        for (int64_t g = 0; g < shape.group(); ++g) {
          const int64_t h = kv * shape.group() + g;
          for (int64_t i = row0; i < row0 + rows; ++i) {
            std::vector<int64_t> support;
            for (int64_t j = 0; j <= i; ++j)
              if (j < c.anchors || j > i - c.window || j / B == qb || mine.count(j / B - first))
                support.push_back(j);
            for (int64_t ch = 0; ch < d; ++ch)
              query[ch] = from_element(query_bits[((s * c.q_heads + h) * capacity + i) * d + ch],
                                       c.element);
            const auto expected =
                reference_attention(query, problem.rows(s, kv, true), support, scale);
            worst = std::max(worst, relative_error(std::span(got).subspan(
                                                       ((s * c.q_heads + h) * capacity + i) * d, d),
                                                   expected));
          }
        }
      }
  // P is rounded to the input precision before the second product, as in FlashAttention.
  std::printf("relative error on the support: %.3g\n", worst);
  EXPECT_LT(worst, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaSparsePrefill,
    ::testing::Values(
        PrefillCase{
            cuda::Element::BF16, cuda::BlockRule::Bound, 4, 2, 128, 1, 64, 128, {1000, 333}},
        PrefillCase{cuda::Element::BF16, cuda::BlockRule::Centroid, 9, 3, 64, 1, 64, 32, {700}},
        PrefillCase{
            cuda::Element::F16, cuda::BlockRule::Bound, 8, 8, 64, 70, 10, 200, {513, 64, 1}},
        // Every candidate chosen: plain causal attention.
        PrefillCase{cuda::Element::BF16, cuda::BlockRule::Centroid, 2, 1, 128, 0, 1, 512, {450}}),
    kCaseName);

// Shape checks happen before any device call, so they run everywhere.
TEST(CudaAttention, BadShapesAreNamedErrors) {
  cuda::DenseCache cache;
  cuda::DeviceArray<float> queries, out;
  cuda::DeviceArray<int32_t> lengths;
  cuda::Workspace workspace;
  const auto decode_error = [&](cuda::AttentionShape shape) {
    return error_of([&] { cuda::decode_dense(shape, cache, queries, lengths, out, workspace); });
  };
  EXPECT_NE(decode_error({1, 8, 8, 96, 16}).find("head_dim 96"), std::string::npos);
  EXPECT_NE(decode_error({1, 12, 8, 64, 16}).find("12 query heads over 8"), std::string::npos);
  EXPECT_NE(decode_error({1, 32, 2, 64, 16}).find("at most 8"), std::string::npos);
  EXPECT_NE(decode_error({0, 8, 8, 64, 16}).find("must be positive"), std::string::npos);
  EXPECT_NE(decode_error({1, 8, 8, 64, 16}).find("queries and out"), std::string::npos);
}

}  // namespace
}  // namespace visikv

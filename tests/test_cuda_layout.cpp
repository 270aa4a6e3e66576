// The GPU integer-cache layout (cuda/int_layout.h), checked on the CPU: the host packer must hold
// the codes a CodecCache of the same specs holds, so the numbers it decodes to are the CPU
// codec's numbers to the bit. Runs without a GPU (and without CUDA).
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/cuda/int_layout.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/headq.h"

namespace visikv {
namespace {

using test_support::error_of;
using test_support::random_vector;

struct LayoutCase {
  std::string keys, values;
  int64_t head_dim;
};

class CudaLayout : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(CudaLayout, PackedCodesDecodeToTheCpuCodecsNumbers) {
  const LayoutCase& c = GetParam();
  const int64_t d = c.head_dim, kv_heads = 2, tokens = 37, sequences = 2;
  const CodecSpec key_spec = parse_codec_spec(c.keys), value_spec = parse_codec_spec(c.values);
  const cuda::IntLayout layout = cuda::IntLayout::from_specs(key_spec, value_spec, d);
  cuda::IntCacheHost host(layout, sequences, kv_heads, tokens + 3);
  std::mt19937 rng(7);
  for (int64_t s = 0; s < sequences; ++s) {
    // One CPU cache per sequence: the oracle for the codes.
    CodecCache cpu({1, kv_heads, d}, key_spec, value_spec, tokens, 16);
    if (key_spec.headq)
      for (int64_t h = 0; h < kv_heads; ++h)
        host.set_basis(h, headq_basis_rows(key_spec, nullptr, 1, kv_heads, d, 0, h));
    std::vector<float> keys = random_vector(rng, tokens * kv_heads * d);
    std::vector<float> values = random_vector(rng, tokens * kv_heads * d, 2.0f);
    for (size_t i = 0; i < keys.size(); i += 13) keys[i] *= 6.0f;  // outlier channels
    cpu.append(0, keys, values, tokens);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < kv_heads; ++h)
        host.store(s, h, t, std::span(keys).subspan((t * kv_heads + h) * d, d),
                   std::span(values).subspan((t * kv_heads + h) * d, d));

    std::vector<float> expected(d), got(d), query = random_vector(rng, d);
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::vector<float> cpu_scores(tokens);
      cpu.score(0, h, query, PositionSet::range(0, tokens), cpu_scores);
      for (int64_t t = 0; t < tokens; ++t) {
        cpu.stored_key(0, h, t, expected);
        host.scored_key(s, h, t, got);
        EXPECT_EQ(got, expected) << "key " << t << " head " << h;
        cpu.stored_value(0, h, t, expected);
        host.decode_value(s, h, t, got);
        EXPECT_EQ(got, expected) << "value " << t << " head " << h;
        // Scores read the same numbers in another order: q·k̂ + (U_rᵀq)·ĉ.
        host.scored_key(s, h, t, got);
        double score = 0, magnitude = 0;
        for (int64_t i = 0; i < d; ++i) {
          score += double{query[i]} * got[i];
          magnitude += std::abs(double{query[i]} * got[i]);
        }
        EXPECT_NEAR(cpu_scores[t], score, 1e-5 * magnitude) << "score " << t;
      }
    }
  }
  // Tight packing: b bits per element, two fp16 per group.
  const int64_t rows = sequences * kv_heads * (tokens + 3);
  EXPECT_EQ(static_cast<int64_t>(host.key_codes.size()), rows * d * key_spec.bits / 8);
  EXPECT_EQ(static_cast<int64_t>(host.key_params.size()), rows * 2 * d / key_spec.group);
  EXPECT_EQ(static_cast<int64_t>(host.value_codes.size()), rows * d * value_spec.bits / 8);
}

INSTANTIATE_TEST_SUITE_P(
    Specs, CudaLayout,
    ::testing::Values(LayoutCase{"int2:g64:tok", "int2:g64:tok", 64},
                      LayoutCase{"int4:g64:tok", "int4:g64:tok", 128},
                      LayoutCase{"int2:g64:tok+headq:r8:s4:random", "int2:g64:tok", 64},
                      LayoutCase{"int2:g32:tok+headq:r16:s2:random", "int4:g128:tok", 128},
                      LayoutCase{"int4:g64:tok+headq:r8:s8:random:wrongsign", "int2:g64:tok",
                                 128}));

TEST(CudaLayout, UnsupportedSpecsAreNamedErrors) {
  const auto layout_error = [](const char* keys, const char* values) {
    return error_of(
        [&] { cuda::IntLayout::from_specs(parse_codec_spec(keys), parse_codec_spec(values), 64); });
  };
  EXPECT_NE(layout_error("int2:g32:chan", "int2:g64:tok").find("int2:g32:chan"), std::string::npos);
  EXPECT_NE(layout_error("int2:g64:tok:r128", "int2:g64:tok").find("not supported"),
            std::string::npos);
  EXPECT_NE(layout_error("int2:g64:tok", "int2:g64:tok:had").find("not supported"),
            std::string::npos);
  EXPECT_NE(layout_error("int3:g64:tok", "int2:g64:tok").find("2 or 4"), std::string::npos);
  EXPECT_NE(layout_error("int2:g64:tok", "f16").find("not supported"), std::string::npos);
  EXPECT_NE(layout_error("int2:g4:tok", "int2:g64:tok").find("multiple of 8"), std::string::npos);
  EXPECT_NE(layout_error("int2:g64:tok+headq:r4:s4:random", "int2:g64:tok").find("rank 4"),
            std::string::npos);
  EXPECT_NE(layout_error("int2:g64:tok+headq:r8:s16:random", "int2:g64:tok").find("16"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              cuda::IntLayout layout = cuda::IntLayout::from_specs(
                  parse_codec_spec("int2:g64:tok"), parse_codec_spec("int2:g64:tok"), 64);
              cuda::IntCacheHost host(layout, 1, 1, 4);
              std::vector<float> x(64);
              host.store(0, 0, 4, x, x);
            }).find("out of range"),
            std::string::npos);
}

}  // namespace
}  // namespace visikv

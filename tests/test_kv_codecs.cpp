// Quantized KV-cache codecs: spec parsing, bit accounting, closed-form quantization error, and
// score / accumulate against a float64 reference built from an independent scalar quantizer.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/attention/attention.h"
#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/kv/hadamard.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

// ---------------------------------------------------------------------------------------------
// Independent scalar reference.

// Every finite fp16 number, decoded by hand, sorted: directed rounding by binary search.
const std::vector<double>& fp16_numbers() {
  static const std::vector<double> numbers = [] {
    std::vector<double> out;
    for (uint32_t h = 0; h < 0x10000; ++h) {
      const int exponent = (h >> 10) & 31, mantissa = h & 1023;
      if (exponent == 31) continue;  // inf / NaN
      const double magnitude =
          exponent == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1024 + mantissa, exponent - 25);
      out.push_back((h & 0x8000) ? -magnitude : magnitude);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }();
  return numbers;
}
double fp16_floor(double x) {
  const auto& v = fp16_numbers();
  return *(std::upper_bound(v.begin(), v.end(), x) - 1);
}
double fp16_ceil(double x) {
  const auto& v = fp16_numbers();
  return *std::lower_bound(v.begin(), v.end(), x);
}
float round_f16(float x) { return fp16_to_float(float_to_fp16(x)); }
float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

struct Codec {
  std::string spec;
  std::string dense;  // "f32", "f16", "bf16"; empty for integer codecs
  int bits = 0;
  int64_t group = 0;
  bool per_channel = false;
  int64_t window = 0;
  bool hadamard = false;
};

struct Grid {
  double scale, zero;
};
Grid reference_grid(const std::vector<float>& group, int bits) {
  const float lo = *std::min_element(group.begin(), group.end());
  const float hi = *std::max_element(group.begin(), group.end());
  const double zero = fp16_floor(lo);
  return {fp16_ceil((hi - zero) / ((1 << bits) - 1)), zero};
}
double reference_dequantize(float x, const Grid& grid, int bits) {
  if (grid.scale == 0) return grid.zero;
  const float t = (x - static_cast<float>(grid.zero)) / static_cast<float>(grid.scale);
  const double code = std::clamp<double>(std::floor(t + 0.5f), 0, (1 << bits) - 1);
  return grid.zero + grid.scale * code;
}

// The stored form of n vectors of one head ({n, d}, already rotated for :had codecs), as doubles.
std::vector<double> reference_stored(const Codec& c, const std::vector<float>& x, int64_t n,
                                     int64_t d) {
  std::vector<double> out(x.size());
  if (!c.dense.empty()) {
    for (size_t i = 0; i < x.size(); ++i)
      out[i] = c.dense == "f32" ? x[i] : c.dense == "f16" ? round_f16(x[i]) : round_bf16(x[i]);
    return out;
  }
  // Tokens pass through the fp16 window unless there is none (per-token groups without :r).
  std::vector<float> input(x);
  if (c.per_channel || c.window > 0)
    for (float& v : input) v = round_f16(v);
  const int64_t past_window = std::max<int64_t>(0, n - c.window);
  const int64_t quantized = c.per_channel ? past_window / c.group * c.group : past_window;
  for (int64_t i = quantized * d; i < n * d; ++i) out[i] = round_f16(x[i]);
  if (!c.per_channel) {
    for (int64_t t = 0; t < quantized; ++t) {
      for (int64_t g = 0; g < d; g += c.group) {
        std::vector<float> group(input.begin() + t * d + g, input.begin() + t * d + g + c.group);
        const Grid grid = reference_grid(group, c.bits);
        for (int64_t i = 0; i < c.group; ++i)
          out[t * d + g + i] = reference_dequantize(group[i], grid, c.bits);
      }
    }
  } else {
    for (int64_t t0 = 0; t0 < quantized; t0 += c.group) {
      for (int64_t ch = 0; ch < d; ++ch) {
        std::vector<float> group;
        for (int64_t t = t0; t < t0 + c.group; ++t) group.push_back(input[t * d + ch]);
        const Grid grid = reference_grid(group, c.bits);
        for (int64_t i = 0; i < c.group; ++i)
          out[(t0 + i) * d + ch] = reference_dequantize(group[i], grid, c.bits);
      }
    }
  }
  return out;
}

// H = W·S / sqrt(d), W the Sylvester Walsh-Hadamard matrix; the signs S are read off the
// library's rotation of unit vectors, and the test checks that every column has this form.
struct ReferenceHadamard {
  int64_t d;
  std::vector<double> h;  // row-major d x d

  explicit ReferenceHadamard(int64_t dim) : d(dim), h(dim * dim) {
    const HadamardRotation rotation(dim);
    const double norm = 1.0 / std::sqrt(static_cast<double>(dim));
    for (int64_t j = 0; j < d; ++j) {
      std::vector<float> e(d, 0.0f);
      e[j] = 1.0f;
      rotation.rotate(e);
      const double sign = e[0] > 0 ? 1.0 : -1.0;
      for (int64_t i = 0; i < d; ++i) {
        const double walsh = (std::popcount(static_cast<uint64_t>(i & j)) % 2) ? -1.0 : 1.0;
        h[i * d + j] = sign * walsh * norm;
        EXPECT_NEAR(e[i], h[i * d + j], 1e-6) << "column " << j << " row " << i;
      }
    }
  }
  // Hᵀ y
  std::vector<double> transpose_times(const std::vector<double>& y) const {
    std::vector<double> x(d, 0.0);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < d; ++j) x[j] += h[i * d + j] * y[i];
    return x;
  }
};

// {tokens, heads, d} from per-head {tokens, d} arrays.
std::vector<float> interleave(const std::vector<std::vector<float>>& per_head, int64_t tokens,
                              int64_t d) {
  const int64_t heads = static_cast<int64_t>(per_head.size());
  std::vector<float> out(tokens * heads * d);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h)
      std::copy_n(per_head[h].begin() + t * d, d, out.begin() + (t * heads + h) * d);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Specs and bit accounting.

TEST(CodecSpec, ParsesFieldsAndPrintsCanonically) {
  const CodecSpec kivi = parse_codec_spec("int2:g32:chan:r128:had");
  EXPECT_EQ(kivi.kind, CodecSpec::Kind::Int);
  EXPECT_EQ(kivi.axis, CodecSpec::Axis::Channels);
  EXPECT_EQ(kivi.bits, 2);
  EXPECT_EQ(kivi.group, 32);
  EXPECT_EQ(kivi.window, 128);
  EXPECT_TRUE(kivi.hadamard);
  EXPECT_EQ(kivi.token_group(), 32);
  EXPECT_EQ(kivi.text(), "int2:g32:chan:r128:had");
  const CodecSpec tok = parse_codec_spec("int3:g64:tok");
  EXPECT_EQ(tok.axis, CodecSpec::Axis::Tokens);
  EXPECT_EQ(tok.token_group(), 1);
  EXPECT_FALSE(tok.hadamard);
  EXPECT_EQ(tok.text(), "int3:g64:tok");
  EXPECT_EQ(parse_codec_spec("fp16").text(), "f16");
  EXPECT_EQ(parse_codec_spec("bf16:had").text(), "bf16:had");
  EXPECT_EQ(parse_codec_spec("f32").dense, DenseFormat::F32);
}

// Each side takes every codec but the options of the other side, which it rejects by name.
TEST(CodecSpec, KeyAndValueSidesRejectTheOtherSidesOptions) {
  EXPECT_EQ(parse_key_codec_spec("int2:g64:tok+headq:r8:s4").text(), "int2:g64:tok+headq:r8:s4");
  EXPECT_EQ(parse_value_codec_spec("a2:int2/int4:g64:w64:avg3").text(),
            "a2:int2/int4:g64:w64:avg3");
  EXPECT_EQ(parse_key_codec_spec("fp32").text(), "f32");
  EXPECT_EQ(parse_value_codec_spec("int4:g32:chan:r128").text(), "int4:g32:chan:r128");
  EXPECT_TRUE(KeyCodecSpec{}.codec.is_dense());  // f32 by default
  const auto message = [](auto parse) {
    try {
      parse();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message([] { parse_key_codec_spec("a1:int2/int4:g64:w64:avg3"); }),
            "key codec 'a1:int2/int4:g64:w64:avg3': the value bit policy 'a1' is for values only");
  EXPECT_EQ(message([] { parse_value_codec_spec("int2:g64:tok+headq:r8:s4:random"); }),
            "value codec 'int2:g64:tok+headq:r8:s4:random': the HeadQ side code "
            "'+headq:r8:s4:random' is for keys only");
  EXPECT_THROW(parse_key_codec_spec("int5:g64:tok"), Error);  // the grammar's own errors
}

TEST(CodecSpec, RejectsBadSpecsWithErrors) {
  for (const char* bad : {"",
                          "f8",
                          "int",
                          "int4",
                          "int4:g32",
                          "int5:g32:tok",
                          "int1:g32:tok",
                          "int16:g32:tok",
                          "int4:g0:tok",
                          "int4:g-3:tok",
                          "int4:g+3:tok",
                          "int4:gx:tok",
                          "int4:32:tok",
                          "int4:g32:row",
                          "int4:g32:chan:r0",
                          "int4:g32:chan:r-1",
                          "int4:g32:tok:had:r4",
                          "int4:g32:tok:foo",
                          "f16:r4",
                          "f16:had:had",
                          "INT4:g32:tok",
                          "int4:g99999999999:tok"}) {
    EXPECT_THROW(parse_codec_spec(bad), Error) << bad;
    EXPECT_THROW(make_cache({1, 1, 64}, bad, "f16"), Error) << bad;
    EXPECT_THROW(make_cache({1, 1, 64}, "f16", bad), Error) << bad;
  }
  try {
    parse_codec_spec("int5:g32:tok");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bit width 5"), std::string::npos) << e.what();
  }
  // Specs that parse but do not fit the head dimension.
  EXPECT_THROW(make_cache({1, 1, 64}, "int4:g48:tok", "f16"), Error);     // 48 does not divide 64
  EXPECT_THROW(make_cache({1, 1, 24}, "int4:g8:tok:had", "f16"), Error);  // 24 not a power of 2
  EXPECT_THROW(make_cache({1, 1, 24}, "f32", "f32:had"), Error);
  EXPECT_THROW(make_cache({1, 1, 12}, "int4:g4:tok", "f16"), Error);  // 12 % 8 != 0
  EXPECT_THROW(make_cache({0, 1, 64}, "int4:g32:tok", "f16"), Error);
  EXPECT_THROW(make_cache({1, 1, 64}, "int4:g32:tok", "f16", 0, 0), Error);
  EXPECT_NO_THROW(make_cache({1, 1, 24}, "int4:g12:tok", "int2:g5:chan:r3"));
}

TEST(CodecBits, MatchHandComputedNumbers) {
  struct Case {
    const char* spec;
    int64_t d;
    double bits_per_element, bits_per_vector;
    int64_t window_min, window_max;
  };
  for (const Case& c : {
           Case{"int2:g64:tok", 64, 2.5, 160, 0, 0},        // 2 + 32/64
           Case{"int2:g32:tok", 64, 3.0, 192, 0, 0},        // 2 + 32/32
           Case{"int3:g32:tok", 128, 4.0, 512, 0, 0},       // 3 + 32/32
           Case{"int4:g128:tok", 128, 4.25, 544, 0, 0},     // 4 + 32/128
           Case{"int8:g16:tok:had", 64, 10.0, 640, 0, 0},   // 8 + 32/16
           Case{"int4:g64:tok:r16", 64, 4.5, 288, 16, 16},  // window of exactly 16 tokens
           Case{"int2:g32:chan", 64, 3.0, 192, 0, 31},      // partial group stays fp16
           Case{"int8:g32:chan:r128", 128, 9.0, 1152, 128, 159},
           Case{"f32", 64, 32, 2048, 0, 0},
           Case{"f16", 64, 16, 1024, 0, 0},
           Case{"bf16", 128, 16, 2048, 0, 0},
       }) {
    const CodecBits bits = codec_bits(parse_codec_spec(c.spec), c.d);
    EXPECT_DOUBLE_EQ(bits.bits_per_element, c.bits_per_element) << c.spec;
    EXPECT_DOUBLE_EQ(bits.bits_per_vector, c.bits_per_vector) << c.spec;
    EXPECT_EQ(bits.window_min_tokens, c.window_min) << c.spec;
    EXPECT_EQ(bits.window_max_tokens, c.window_max) << c.spec;
  }
  // Exact totals: 10 tokens at d = 64 in int3:g32:tok = 10 * (64 * 3 + 2 groups * 32).
  EXPECT_EQ(codec_stored_bits(parse_codec_spec("int3:g32:tok"), 64, 10), 2560);
  // 50 tokens in int2:g32:chan:r8: 32 quantized (64 * 32 * 2 code bits + 64 channel groups * 32)
  // and 18 fp16 tokens (18 * 64 * 16).
  EXPECT_EQ(codec_stored_bits(parse_codec_spec("int2:g32:chan:r8"), 64, 50), 4096 + 2048 + 18432);
  EXPECT_EQ(quantized_tokens(parse_codec_spec("int2:g32:chan:r8"), 50), 32);
  EXPECT_EQ(quantized_tokens(parse_codec_spec("int2:g32:chan:r8"), 39), 0);
  EXPECT_EQ(quantized_tokens(parse_codec_spec("int2:g32:chan:r8"), 40), 32);
  EXPECT_EQ(quantized_tokens(parse_codec_spec("int4:g64:tok:r16"), 20), 4);

  // The caches hold exactly that many bytes (codes packed tightly, 3-bit included).
  std::mt19937 rng(5);
  for (const char* spec : {"int3:g32:tok", "int2:g32:chan:r8", "int4:g8:tok:r3", "int8:g64:tok",
                           "int3:g16:chan", "f16"}) {
    for (int64_t n : {1, 7, 39, 40, 50, 73}) {
      auto cache = make_cache({1, 2, 64}, spec, spec);
      const auto k = random_vector(rng, n * 2 * 64), v = random_vector(rng, n * 2 * 64);
      cache->append(0, k, v, n);
      const auto* codec = dynamic_cast<const CodecCache*>(cache.get());
      if (codec == nullptr) continue;  // f16/f16 is the dense cache
      EXPECT_EQ(codec->stored_bytes() * 8, 4 * codec_stored_bits(parse_codec_spec(spec), 64, n))
          << spec << " n=" << n;
    }
  }
}

TEST(CodecBits, DescribeNamesBothSides) {
  EXPECT_EQ(make_cache({1, 1, 64}, "int2:g64:tok", "f16")->describe(),
            "keys int2:g64:tok (2.5 bits/elt), values f16 (16 bits/elt)");
  EXPECT_EQ(make_cache({1, 1, 64}, "int2:g32:chan:r128", "int4:g32:tok:had")->describe(),
            "keys int2:g32:chan:r128 (3 bits/elt; 128-159 newest tokens f16), "
            "values int4:g32:tok:had (5 bits/elt)");
  EXPECT_EQ(make_cache({1, 1, 64}, "f16", "f16")->describe(), "dense f16");
  EXPECT_EQ(make_cache({1, 1, 64}, "bf16", "bf16")->describe(), "dense bf16");
  EXPECT_EQ(make_cache({1, 1, 64}, "f32", "f16")->describe(),
            "keys f32 (32 bits/elt), values f16 (16 bits/elt)");
}

// ---------------------------------------------------------------------------------------------
// Closed-form quantization error.

// One group of G = 16 elements laid out along channels (tok) or along tokens (chan).
std::vector<float> stored_group(const std::vector<float>& group, int bits, bool per_channel) {
  const int64_t g = static_cast<int64_t>(group.size()), d = per_channel ? 8 : g;
  const std::string spec = str_cat("int", bits, ":g", g, per_channel ? ":chan" : ":tok");
  CodecCache cache({1, 1, d}, parse_codec_spec(spec), parse_codec_spec("f32"), 0, 32);
  std::vector<float> keys;
  if (per_channel) {  // channel 0 carries the group, the other channels are zero
    for (float x : group) {
      keys.push_back(x);
      keys.insert(keys.end(), d - 1, 0.0f);
    }
    cache.append(0, keys, keys, g);
  } else {
    cache.append(0, group, group, 1);
  }
  std::vector<float> out, row(d);
  for (int64_t t = 0; t < (per_channel ? g : 1); ++t) {
    cache.stored_key(0, 0, t, row);
    if (per_channel)
      out.push_back(row[0]);
    else
      out = row;
  }
  return out;
}

TEST(IntCodes, ClosedFormErrorOnKnownGroups) {
  for (bool per_channel : {false, true}) {
    for (int bits : {2, 3, 4, 8}) {
      SCOPED_TRACE(str_cat(bits, " bits, ", per_channel ? "chan" : "tok"));
      const int levels = (1 << bits) - 1;
      const double scale = 0.25, zero = -1.0;  // both fp16 numbers: the grid is exact
      // Endpoints on the grid, everything else at midpoints: the error is exactly scale / 2.
      std::vector<float> midpoints = {static_cast<float>(zero),
                                      static_cast<float>(zero + levels * scale)};
      for (int i = 0; midpoints.size() < 16; ++i)
        midpoints.push_back(static_cast<float>(zero + ((i % levels) + 0.5) * scale));
      const auto mid = stored_group(midpoints, bits, per_channel);
      double worst = 0;
      for (size_t i = 0; i < mid.size(); ++i)
        worst = std::max(worst, std::abs(double(mid[i]) - midpoints[i]));
      EXPECT_EQ(worst, scale / 2);

      // Values on the grid come back exactly.
      std::mt19937 rng(bits);
      std::vector<float> on_grid = {static_cast<float>(zero + levels * scale),
                                    static_cast<float>(zero)};
      while (on_grid.size() < 16)
        on_grid.push_back(static_cast<float>(zero + (rng() % (levels + 1)) * scale));
      EXPECT_EQ(stored_group(on_grid, bits, per_channel), on_grid);

      // A constant group (an fp16 number) comes back exactly.
      const std::vector<float> constant(16, 0.3125f);
      EXPECT_EQ(stored_group(constant, bits, per_channel), constant);

      // Random groups: every element within scale / 2 of its value, scale from the range.
      std::uniform_real_distribution<float> uniform(-3.0f, 5.0f);
      for (int trial = 0; trial < 50; ++trial) {
        std::vector<float> group(16);
        for (float& x : group) x = uniform(rng);
        if (per_channel)  // per-channel groups are quantized from the fp16 window
          for (float& x : group) x = round_f16(x);
        const Grid grid = reference_grid(group, bits);
        const float range = *std::max_element(group.begin(), group.end()) -
                            *std::min_element(group.begin(), group.end());
        EXPECT_LE(grid.scale, range / levels * (1 + 1.0 / 256) + 1e-7);
        const auto stored = stored_group(group, bits, per_channel);
        for (size_t i = 0; i < group.size(); ++i)
          EXPECT_LE(std::abs(double(stored[i]) - group[i]),
                    grid.scale / 2 + 1e-6 * (1 + std::abs(group[i])));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// score / accumulate against the float64 reference.

class CodecAgreement : public ::testing::TestWithParam<Codec> {};

TEST_P(CodecAgreement, ScoreAndAccumulateMatchReferenceOnDequantizedValues) {
  const Codec c = GetParam();
  const int64_t layers = 2, kv_heads = 2, d = 64, n = 150, group = 3, prefill = 40;
  std::mt19937 rng(99);
  std::vector<std::vector<float>> k_heads, v_heads;
  for (int64_t h = 0; h < kv_heads; ++h) {
    k_heads.push_back(random_vector(rng, n * d));
    v_heads.push_back(random_vector(rng, n * d, 0.5f));
  }
  // A few outlier channels, as real keys have.
  for (auto& k : k_heads)
    for (int64_t t = 0; t < n; ++t) k[t * d + 5] *= 8.0f;
  const auto keys = interleave(k_heads, n, d), values = interleave(v_heads, n, d);
  auto cache = make_cache({layers, kv_heads, d}, c.spec, c.spec, 16, 16);
  // Layer 1: a prefill then one token at a time; layer 0 stays empty.
  const int64_t row = kv_heads * d;
  cache->append(1, std::span(keys).first(prefill * row), std::span(values).first(prefill * row),
                prefill);
  for (int64_t t = prefill; t < n; ++t)
    cache->append(1, std::span(keys).subspan(t * row, row), std::span(values).subspan(t * row, row),
                  1);
  ASSERT_EQ(cache->length(1), n);
  ASSERT_EQ(cache->length(0), 0);

  const std::vector<int32_t> picks = {0, 1, 31, 32, 63, 64, 100, 120, 127, 128, 140, 149};
  const std::vector<PositionSet> sets = {PositionSet::range(0, n), PositionSet::range(17, 133),
                                         PositionSet::list(picks), PositionSet::range(149, 150)};
  for (int64_t h = 0; h < kv_heads; ++h) {
    SCOPED_TRACE(str_cat(c.spec, " head ", h));
    // Reference stored vectors in the model's coordinates.
    std::vector<float> input = k_heads[h], value_input = v_heads[h];
    std::vector<double> k_ref, v_ref;
    if (c.hadamard) {
      const HadamardRotation rotation(d);
      const ReferenceHadamard reference(d);
      for (int64_t t = 0; t < n; ++t) {
        rotation.rotate(std::span(input).subspan(t * d, d));
        rotation.rotate(std::span(value_input).subspan(t * d, d));
      }
      const auto k_rot = reference_stored(c, input, n, d);
      const auto v_rot = reference_stored(c, value_input, n, d);
      for (int64_t t = 0; t < n; ++t) {
        const auto k =
            reference.transpose_times({k_rot.begin() + t * d, k_rot.begin() + t * d + d});
        const auto v =
            reference.transpose_times({v_rot.begin() + t * d, v_rot.begin() + t * d + d});
        k_ref.insert(k_ref.end(), k.begin(), k.end());
        v_ref.insert(v_ref.end(), v.begin(), v.end());
      }
    } else {
      k_ref = reference_stored(c, input, n, d);
      v_ref = reference_stored(c, value_input, n, d);
    }

    if (const auto* codec = dynamic_cast<const CodecCache*>(cache.get())) {
      std::vector<float> stored(d);
      for (int64_t t = 0; t < n; ++t) {
        codec->stored_key(1, h, t, stored);
        for (int64_t ch = 0; ch < d; ++ch)
          ASSERT_NEAR(stored[ch], k_ref[t * d + ch], 2e-5 * (1 + std::abs(k_ref[t * d + ch])))
              << "token " << t << " channel " << ch;
        codec->stored_value(1, h, t, stored);
        for (int64_t ch = 0; ch < d; ++ch)
          ASSERT_NEAR(stored[ch], v_ref[t * d + ch], 2e-5 * (1 + std::abs(v_ref[t * d + ch])));
      }
    }

    const auto queries = random_vector(rng, group * d);
    for (const PositionSet& set : sets) {
      const int64_t m = set.size();
      std::vector<float> scores(group * m, NAN);
      cache->score(1, h, queries, set, scores);
      std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
      std::vector<float> weights(group * m);
      for (float& w : weights) w = uniform(rng);
      std::vector<float> out(group * d, 0.5f);  // accumulate adds to what is there
      cache->accumulate(1, h, weights, set, out);
      for (int64_t q = 0; q < group; ++q) {
        std::vector<double> expected_out(d, 0.5), magnitude(d, 0.5);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t p = set[i];
          double dot = 0, size = 0;
          for (int64_t ch = 0; ch < d; ++ch) {
            dot += double(queries[q * d + ch]) * k_ref[p * d + ch];
            size += std::abs(double(queries[q * d + ch]) * k_ref[p * d + ch]);
          }
          EXPECT_NEAR(scores[q * m + i], dot, 1e-5 * size + 1e-6) << "query " << q << " pos " << p;
          for (int64_t ch = 0; ch < d; ++ch) {
            expected_out[ch] += weights[q * m + i] * v_ref[p * d + ch];
            magnitude[ch] += std::abs(weights[q * m + i] * v_ref[p * d + ch]);
          }
        }
        for (int64_t ch = 0; ch < d; ++ch)
          EXPECT_NEAR(out[q * d + ch], expected_out[ch], 1e-5 * magnitude[ch])
              << "query " << q << " channel " << ch;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Codecs, CodecAgreement,
    ::testing::Values(Codec{"int8:g64:tok", "", 8, 64}, Codec{"int4:g32:tok", "", 4, 32},
                      Codec{"int3:g16:tok", "", 3, 16}, Codec{"int2:g8:tok", "", 2, 8},
                      Codec{"int4:g4:tok", "", 4, 4}, Codec{"int3:g64:tok:r5", "", 3, 64, false, 5},
                      Codec{"int2:g32:chan", "", 2, 32, true},
                      Codec{"int4:g16:chan:r24", "", 4, 16, true, 24},
                      Codec{"int8:g32:chan:r32", "", 8, 32, true, 32},
                      Codec{"int3:g7:chan:r3", "", 3, 7, true, 3},
                      Codec{"int4:g32:tok:had", "", 4, 32, false, 0, true},
                      Codec{"int2:g16:chan:r8:had", "", 2, 16, true, 8, true}, Codec{"f32", "f32"},
                      Codec{"f16", "f16"}, Codec{"bf16", "bf16"},
                      Codec{"f16:had", "f16", 0, 0, false, 0, true}),
    [](const ::testing::TestParamInfo<Codec>& info) {
      std::string name = info.param.spec;
      for (char& ch : name)
        if (ch == ':') ch = '_';
      return name;
    });

// ---------------------------------------------------------------------------------------------
// Full-precision window, rotation, attention.

TEST(KiviWindow, NewestTokensStayExactFp16) {
  const int64_t d = 32, n = 100;
  std::mt19937 rng(11);
  const auto keys = random_vector(rng, n * d);
  for (const char* text : {"int2:g16:chan:r20", "int2:g16:chan", "int2:g32:tok:r7"}) {
    SCOPED_TRACE(text);
    const CodecSpec spec = parse_codec_spec(text);
    CodecCache cache({1, 1, d}, spec, parse_codec_spec("f16"), 0, 32);
    std::vector<float> stored(d);
    for (int64_t t = 0; t < n; ++t) {
      cache.append(0, std::span(keys).subspan(t * d, d), std::span(keys).subspan(t * d, d), 1);
      const int64_t exact_from = quantized_tokens(spec, t + 1);
      const int64_t window = t + 1 - exact_from;
      EXPECT_GE(window, std::min<int64_t>(t + 1, spec.window));
      EXPECT_LE(window, spec.window + spec.token_group() - 1);
      for (int64_t j = 0; j <= t; ++j) {
        cache.stored_key(0, 0, j, stored);
        double error = 0;
        for (int64_t c = 0; c < d; ++c)
          error = std::max(error, double(std::abs(stored[c] - round_f16(keys[j * d + c]))));
        if (j >= exact_from)
          ASSERT_EQ(error, 0.0) << "token " << j << " of " << t + 1;
        else
          ASSERT_GT(error, 0.0) << "token " << j << " of " << t + 1 << " should be 2-bit";
      }
    }
  }
}

TEST(Hadamard, IsOrthonormalAndInvertible) {
  for (int64_t d : {1, 2, 8, 64, 128}) {
    const ReferenceHadamard reference(d);  // checks the W·S/sqrt(d) form column by column
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j) {
        double dot = 0;
        for (int64_t k = 0; k < d; ++k) dot += reference.h[i * d + k] * reference.h[j * d + k];
        EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-12);
      }
    }
    std::mt19937 rng(d);
    auto x = random_vector(rng, d);
    const auto original = x;
    const HadamardRotation rotation(d);
    rotation.rotate(x);
    rotation.unrotate(x);
    for (int64_t i = 0; i < d; ++i) EXPECT_NEAR(x[i], original[i], 1e-5);
    if (d >= 64) {  // the sign flip is really random
      int negative = 0;
      for (int64_t j = 0; j < d; ++j) negative += reference.h[j] < 0;  // row 0 = the signs
      EXPECT_GT(negative, d / 4);
      EXPECT_LT(negative, 3 * d / 4);
    }
  }
  EXPECT_THROW(HadamardRotation(12), Error);
  EXPECT_THROW(HadamardRotation(0), Error);
}

// Max |score error| over every key for a few queries, relative to the dense f32 scores.
double score_error(const std::string& spec, const std::vector<float>& keys,
                   const std::vector<float>& queries, int64_t n, int64_t d) {
  auto exact = make_cache({1, 1, d}, "f32", "f32");
  auto cache = make_cache({1, 1, d}, spec, "f32");
  exact->append(0, keys, keys, n);
  cache->append(0, keys, keys, n);
  const int64_t count = static_cast<int64_t>(queries.size()) / d;
  std::vector<float> a(count * n), b(count * n);
  exact->score(0, 0, queries, PositionSet::range(0, n), a);
  cache->score(0, 0, queries, PositionSet::range(0, n), b);
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, double(std::abs(a[i] - b[i])));
  return worst;
}

TEST(Hadamard, RotatedScoresMatchUnrotatedAndTameOutliers) {
  const int64_t d = 64, n = 200;
  std::mt19937 rng(21);
  auto keys = random_vector(rng, n * d);
  const auto queries = random_vector(rng, 4 * d);
  // Without quantization the rotation changes scores only by float rounding.
  EXPECT_LT(score_error("f32:had", keys, queries, n, d), 2e-5);
  // int8 with and without rotation: both close to exact. Scores have standard deviation
  // sqrt(d) = 8; int8 keys err by about 0.006 per channel, so q·e is about 0.05 (max ~0.2).
  const double int8_plain = score_error("int8:g64:tok", keys, queries, n, d);
  const double int8_rotated = score_error("int8:g64:tok:had", keys, queries, n, d);
  const double int4_plain = score_error("int4:g64:tok", keys, queries, n, d);
  EXPECT_LT(int8_plain, 0.4);
  EXPECT_LT(int8_rotated, 0.4);
  EXPECT_LT(int8_plain, int4_plain / 8);
  EXPECT_LT(int8_rotated, int4_plain / 8);
  // One outlier channel: per-token groups waste their range on it; the rotation spreads it.
  for (int64_t t = 0; t < n; ++t) keys[t * d + 3] *= 40.0f;
  const double plain = score_error("int4:g64:tok", keys, queries, n, d);
  const double rotated = score_error("int4:g64:tok:had", keys, queries, n, d);
  EXPECT_LT(rotated, plain / 2) << "plain " << plain << " rotated " << rotated;
}

TEST(CodecAttention, ErrorAgainstDenseShrinksWithBits) {
  const int64_t tokens = 96, heads = 6, kv_heads = 2, d = 64;
  std::mt19937 rng(1234);
  const auto q = random_vector(rng, tokens * heads * d);
  const auto k = random_vector(rng, tokens * kv_heads * d);
  const auto v = random_vector(rng, tokens * kv_heads * d);
  const AttentionSpec spec{heads, d, 1.0 / std::sqrt(double(d)), 0};
  const auto run = [&](const std::string& key_spec, const std::string& value_spec) {
    auto cache = make_cache({1, kv_heads, d}, key_spec, value_spec, 0, 16);
    std::vector<float> out(tokens * heads * d, NAN);
    const int64_t row = kv_heads * d;
    for (int64_t t = 0; t < tokens; ++t) {  // decode order: every key quantized when written
      cache->append(0, std::span(k).subspan(t * row, row), std::span(v).subspan(t * row, row), 1);
      attend_causal(*cache, 0, std::span(q).subspan(t * heads * d, heads * d), 1, t, spec,
                    std::span(out).subspan(t * heads * d, heads * d));
    }
    return out;
  };
  const auto dense = run("f32", "f32");
  const auto error = [&](const std::string& key_spec, const std::string& value_spec) {
    const auto out = run(key_spec, value_spec);
    double worst = 0;
    for (size_t i = 0; i < out.size(); ++i)
      worst = std::max(worst, double(std::abs(out[i] - dense[i])));
    return worst;
  };
  const double e8 = error("int8:g32:tok", "int8:g32:tok");
  const double e4 = error("int4:g32:tok", "int4:g32:tok");
  const double e3 = error("int3:g32:tok", "int3:g32:tok");
  const double e2 = error("int2:g32:tok", "int2:g32:tok");
  EXPECT_LT(e8, 0.03);
  EXPECT_LT(e8, e4);
  EXPECT_LT(e4, e3);
  EXPECT_LT(e3, e2);
  EXPECT_GT(e2, 0.05);
  // KIVI keys with a window, f16 values: between int8 and int2 everywhere.
  const double kivi = error("int2:g32:chan:r32", "f16");
  EXPECT_LT(kivi, e2);
  EXPECT_GT(kivi, e8);
  std::printf(
      "max |attention output - dense|: int8 %.3g, int4 %.3g, int3 %.3g, int2 %.3g, "
      "int2:g32:chan:r32 keys %.3g\n",
      e8, e4, e3, e2, kivi);
}

// ---------------------------------------------------------------------------------------------
// The factory and the cache around the stores.

TEST(MakeCache, DenseSpecsBehaveExactlyAsTheDenseCache) {
  const int64_t d = 24, n = 30;
  std::mt19937 rng(8);
  const auto k = random_vector(rng, n * 2 * d), v = random_vector(rng, n * 2 * d);
  const auto q = random_vector(rng, 3 * d);
  std::vector<float> weights(3 * n);
  for (float& w : weights) w = std::uniform_real_distribution<float>(0, 1)(rng);
  const auto results = [&](KVCache& cache) {
    cache.append(0, k, v, n);
    std::vector<float> scores(3 * n), out(3 * d, 0.0f);
    cache.score(0, 1, q, PositionSet::range(0, n), scores);
    cache.accumulate(0, 1, weights, PositionSet::range(0, n), out);
    scores.insert(scores.end(), out.begin(), out.end());
    return scores;
  };
  for (DenseFormat format : {DenseFormat::F32, DenseFormat::F16, DenseFormat::BF16}) {
    const std::string name = format == DenseFormat::F32   ? "f32"
                             : format == DenseFormat::F16 ? "f16"
                                                          : "bf16";
    auto made = make_cache({1, 2, d}, name, name);
    auto dense = make_dense_cache({1, 2, d}, format);
    EXPECT_EQ(made->describe(), dense->describe());
    // One dense store: the dense cache is a codec cache of dense rows on both sides.
    EXPECT_EQ(dense->describe(), "dense " + name);
    EXPECT_NE(dynamic_cast<CodecCache*>(dense.get()), nullptr);
    EXPECT_EQ(results(*made), results(*dense)) << name;
  }
  // Mixed dense formats go through the store cache and still match, bit for bit, each side.
  auto mixed = make_cache({1, 2, d}, "f32", "f16");
  auto keys_dense = make_dense_cache({1, 2, d}, DenseFormat::F32);
  auto values_dense = make_dense_cache({1, 2, d}, DenseFormat::F16);
  const auto m = results(*mixed), kd = results(*keys_dense), vd = results(*values_dense);
  EXPECT_TRUE(std::equal(m.begin(), m.begin() + 3 * n, kd.begin()));
  EXPECT_TRUE(std::equal(m.begin() + 3 * n, m.end(), vd.begin() + 3 * n));
}

// The stored keys of layer 0, {n, kv_heads, d}, as the cache reads them back.
std::vector<float> stored_keys(const CodecCache& cache, int64_t n) {
  const int64_t kv_heads = cache.shape().kv_heads, d = cache.shape().head_dim;
  std::vector<float> keys(static_cast<size_t>(n * kv_heads * d));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < kv_heads; ++h)
      cache.stored_key(0, h, j, std::span(keys).subspan((j * kv_heads + h) * d, d));
  return keys;
}

// Summaries describe the stored keys (what scores read), also after keys leave an fp16 window
// for their quantized form, with a Hadamard rotation, and with a HeadQ side code.
TEST(CodecCacheTest, SummariesComeFromStoredKeys) {
  const int64_t d = 16, n = 45, block = 8;
  for (const char* key_codec :
       {"int2:g16:tok", "int4:g8:tok", "int2:g8:chan:r12", "int2:g16:tok:had",
        "int2:g16:tok+headq:r4:s4:random", "int2:g8:chan:r12+headq:r4:s4:random"}) {
    SCOPED_TRACE(key_codec);
    std::mt19937 rng(3);
    auto made = make_cache({1, 2, d}, key_codec, "int2:g8:chan", 0, block);
    const auto* cache = dynamic_cast<const CodecCache*>(made.get());
    ASSERT_NE(cache, nullptr);
    const auto k = random_vector(rng, n * 2 * d), v = random_vector(rng, n * 2 * d);
    for (int64_t t = 0; t < n; ++t) {
      made->append(0, std::span(k).subspan(t * 2 * d, 2 * d),
                   std::span(v).subspan(t * 2 * d, 2 * d), 1);
      if (t == 20 || t == n - 1)
        expect_summaries_match(*made, stored_keys(*cache, t + 1), t + 1, 2, d, block, 1e-6);
    }
    // The stored keys differ from the exact ones, so this checks the form, not a coincidence.
    EXPECT_NE(stored_keys(*cache, n), k);
    EXPECT_THROW(made->summary(0, 0, 6), Error);
    EXPECT_THROW(made->summary(0, 2, 0), Error);
  }
}

TEST(CodecCacheTest, ChecksBoundsAndClears) {
  const int64_t d = 32, n = 40;
  std::mt19937 rng(4);
  auto cache = make_cache({2, 1, d}, "int4:g32:tok", "int2:g16:chan:r4");
  const auto k = random_vector(rng, n * d), v = random_vector(rng, n * d);
  std::vector<float> too_short(d - 1);
  EXPECT_THROW(cache->append(0, too_short, too_short, 1), Error);
  EXPECT_THROW(cache->append(2, k, v, n), Error);
  cache->append(1, k, v, n);
  const auto q = random_vector(rng, d);
  std::vector<float> scores(n + 1), out(d);
  EXPECT_THROW(cache->score(0, 0, q, PositionSet::range(0, 1), scores), Error);
  EXPECT_THROW(cache->score(1, 0, q, PositionSet::range(0, n + 1), scores), Error);
  EXPECT_THROW(cache->score(1, 1, q, PositionSet::range(0, n), scores), Error);
  EXPECT_THROW(cache->accumulate(1, 0, scores, PositionSet::range(0, n + 1), out), Error);
  std::vector<float> first(n);
  cache->score(1, 0, q, PositionSet::range(0, n), first);
  cache->clear();
  EXPECT_EQ(cache->length(1), 0);
  EXPECT_EQ(dynamic_cast<CodecCache&>(*cache).stored_bytes(), 0);
  EXPECT_THROW(cache->score(1, 0, q, PositionSet::range(0, 1), scores), Error);
  cache->append(1, k, v, n);  // the same tokens again give the same scores
  std::vector<float> again(n);
  cache->score(1, 0, q, PositionSet::range(0, n), again);
  EXPECT_EQ(first, again);
}

}  // namespace
}  // namespace visikv

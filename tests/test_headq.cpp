// HeadQ: the side-code key codec, its bit accounting and controls, the eigen solver,
// calibration and the basis file. Answers known in closed form: with an unquantized side code
// the correction cancels a residual lying in span(U_r) (score = exact score to float rounding),
// the wrong sign doubles the score error, random bases are orthonormal, V Λ Vᵀ = A, and
// calibration's eigenpairs satisfy uᵀ Σ u = λ for a Σ the test accumulates itself.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/attention/attention.h"
#include "visikv/calibration/basis_file.h"
#include "visikv/calibration/calibrate.h"
#include "visikv/calibration/headq_basis.h"
#include "visikv/calibration/symmetric_eigen.h"
#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/perplexity.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/headq.h"
#include "visikv/kv/qbasis.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

ProgramRun run(const std::string& args) { return run_visikv(args); }

namespace fs = std::filesystem;

const std::string kModels = std::string(VISIKV_FIXTURES) + "/models";

fs::path temp_file(const std::string& name) {
  return fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()));
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::vector<float> gaussian(int64_t n, uint32_t seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> out(static_cast<size_t>(n));
  for (float& x : out) x = dist(rng);
  return out;
}

double dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}

// Orthonormal rows spanning `vectors` ({count, d}) first, completed with random directions to
// `rank` rows.
std::vector<double> basis_spanning(const std::vector<float>& vectors, int64_t count, int64_t d,
                                   int64_t rank) {
  std::vector<double> rows(static_cast<size_t>(rank * d));
  const std::vector<double> fill = random_orthonormal_rows(rank, d, 99);
  for (int64_t j = 0; j < rank; ++j) {
    double* row = rows.data() + j * d;
    for (int64_t c = 0; c < d; ++c) row[c] = j < count ? vectors[j * d + c] : fill[j * d + c];
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t i = 0; i < j; ++i) {
        double overlap = 0;
        for (int64_t c = 0; c < d; ++c) overlap += row[c] * rows[i * d + c];
        for (int64_t c = 0; c < d; ++c) row[c] -= overlap * rows[i * d + c];
      }
    double norm = 0;
    for (int64_t c = 0; c < d; ++c) norm += row[c] * row[c];
    for (int64_t c = 0; c < d; ++c) row[c] /= std::sqrt(norm);
  }
  return rows;
}

// A one-head basis whose query rows are `rows` ({rank, d}).
HeadqBasis one_head_basis(const std::vector<double>& rows, int64_t rank, int64_t d) {
  HeadqBasis b;
  b.fingerprint = "test";
  b.layers = b.kv_heads = 1;
  b.head_dim = d;
  b.rank = rank;
  b.query_eigenvalues.assign(static_cast<size_t>(d), 0.0);
  b.key_eigenvalues.assign(static_cast<size_t>(d), 0.0);
  b.query_vectors = rows;
  b.key_vectors = rows;
  return b;
}

// Residuals e = x - x̂ of `keys` ({n, d}) under a plain codec (what HeadQ's base stores).
std::vector<float> residuals(const std::string& base_spec, const std::vector<float>& keys,
                             int64_t n, int64_t d, bool through_fp16) {
  const CacheShape shape{1, 1, d};
  auto cache = make_cache(shape, base_spec, "f32");
  std::vector<float> values(static_cast<size_t>(d), 0.0f);
  for (int64_t t = 0; t < n; ++t) cache->append(0, std::span(keys).subspan(t * d, d), values, 1);
  std::vector<float> out(static_cast<size_t>(n * d)), stored(static_cast<size_t>(d));
  for (int64_t t = 0; t < n; ++t) {
    dynamic_cast<CodecCache&>(*cache).stored_key(0, 0, t, stored);
    for (int64_t c = 0; c < d; ++c) {
      const float k = keys[t * d + c];
      out[t * d + c] = (through_fp16 ? fp16_to_float(float_to_fp16(k)) : k) - stored[c];
    }
  }
  return out;
}

struct Scores {
  std::vector<float> headq, base, exact;
};

// Scores of `queries` against n keys through `spec` (basis from the residuals of `base_spec`,
// which must be spec's base), through the plain base, and exactly (q·k, or q·fp16(k)).
Scores score_all(const std::string& spec, const std::string& base_spec, int64_t n, int64_t d,
                 int64_t rank, bool through_fp16) {
  const std::vector<float> keys = gaussian(n * d, 1, 2.0f);
  const std::vector<float> e = residuals(base_spec, keys, n, d, through_fp16);
  const HeadqBasis basis = one_head_basis(basis_spanning(e, std::min(n, rank), d, rank), rank, d);
  const CacheShape shape{1, 1, d};
  auto headq = make_cache(shape, spec, "f32", 0, 32, &basis);
  auto base = make_cache(shape, base_spec, "f32");
  std::vector<float> values(static_cast<size_t>(d), 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    headq->append(0, std::span(keys).subspan(t * d, d), values, 1);
    base->append(0, std::span(keys).subspan(t * d, d), values, 1);
  }
  const int64_t queries = 3;
  const std::vector<float> q = gaussian(queries * d, 2);
  Scores s;
  s.headq.resize(static_cast<size_t>(queries * n));
  s.base.resize(s.headq.size());
  s.exact.resize(s.headq.size());
  const PositionSet all = PositionSet::range(0, n);
  headq->score(0, 0, q, all, s.headq);
  base->score(0, 0, q, all, s.base);
  for (int64_t j = 0; j < queries; ++j)
    for (int64_t t = 0; t < n; ++t) {
      double exact = 0;
      for (int64_t c = 0; c < d; ++c) {
        const float k = keys[t * d + c];
        exact += double(q[j * d + c]) * (through_fp16 ? fp16_to_float(float_to_fp16(k)) : k);
      }
      s.exact[j * n + t] = static_cast<float>(exact);
    }
  return s;
}

// --- spec grammar and bits -----------------------------------------------------------------

TEST(HeadqSpec, ParsesAndPrintsCanonically) {
  const CodecSpec s = parse_codec_spec("int2:g64:tok+headq:r8:s4");
  ASSERT_TRUE(s.headq.has_value());
  EXPECT_EQ(s.bits, 2);
  EXPECT_EQ(s.headq->rank, 8);
  EXPECT_EQ(s.headq->bits, 4);
  EXPECT_EQ(s.headq->basis, HeadqSpec::Basis::Query);
  EXPECT_FALSE(s.headq->wrong_sign);
  EXPECT_EQ(s.text(), "int2:g64:tok+headq:r8:s4");
  const CodecSpec c = parse_codec_spec("int2:g32:chan:r128:had+headq:r16:s2:keypca:wrongsign");
  EXPECT_TRUE(c.hadamard);
  EXPECT_EQ(c.headq->basis, HeadqSpec::Basis::KeyPca);
  EXPECT_TRUE(c.headq->wrong_sign);
  EXPECT_EQ(c.text(), "int2:g32:chan:r128:had+headq:r16:s2:wrongsign:keypca");
  EXPECT_EQ(parse_codec_spec("int4:g32:tok+headq:r4:s32:random").headq->basis,
            HeadqSpec::Basis::Random);
  EXPECT_FALSE(parse_codec_spec("int2:g64:tok").headq.has_value());
}

TEST(HeadqSpec, BadSpecsAreClearErrors) {
  const auto message = [](const std::string& spec) {
    return error_of([&] { parse_codec_spec(spec); });
  };
  EXPECT_NE(message("f16+headq:r8:s4").find("integer base"), std::string::npos);
  EXPECT_NE(message("int2:g64:tok+headq:r8:s5").find("side-code bits 5"), std::string::npos);
  EXPECT_NE(message("int2:g64:tok+headq:r0:s4").find("HeadQ rank"), std::string::npos);
  EXPECT_NE(message("int2:g64:tok+headq:r8").find("rank and bits"), std::string::npos);
  EXPECT_NE(message("int2:g64:tok+headq:r8:s4:upside").find("'upside'"), std::string::npos);
  EXPECT_NE(message("int2:g64:tok+headq:r8:s4:random:keypca").find("at most one"),
            std::string::npos);
  EXPECT_NE(message("int2:g64:tok+sideq:r8:s4").find("unknown side code"), std::string::npos);
  EXPECT_NE(message("int2:g64:tok+headq:r8:s4+headq:r8:s4").find("at most one '+'"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              codec_bits(parse_codec_spec("int2:g64:tok+headq:r80:s4"), 64);
            }).find("exceeds head_dim"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              make_cache({1, 1, 64}, "int2:g64:tok", "int2:g64:tok+headq:r8:s4:random");
            }).find("keys only"),
            std::string::npos);
  EXPECT_NE(error_of([] {
              make_cache({1, 1, 64}, "int2:g64:tok+headq:r8:s4", "f32");
            }).find("needs a HeadQ basis file"),
            std::string::npos);
}

TEST(HeadqSpec, BitCountsAreExact) {
  // int2:g64:tok is 2·64 + 32 = 160 bits per key; the side code adds r·b_s + 32.
  CodecBits b = codec_bits(parse_codec_spec("int2:g64:tok+headq:r8:s4"), 64);
  EXPECT_EQ(b.bits_per_vector, 160 + 8 * 4 + 32);
  EXPECT_EQ(b.side_bits_per_vector, 64);
  EXPECT_DOUBLE_EQ(b.bits_per_element, 224.0 / 64);
  EXPECT_EQ(codec_bits(parse_codec_spec("int2:g64:tok+headq:r16:s2"), 64).bits_per_vector,
            160 + 32 + 32);
  EXPECT_EQ(codec_bits(parse_codec_spec("int2:g64:tok+headq:r8:s16"), 64).bits_per_vector,
            160 + 128);  // fp16 numbers carry no scale
  EXPECT_EQ(codec_bits(parse_codec_spec("int2:g64:tok+headq:r8:s32"), 64).bits_per_vector,
            160 + 256);
  // Window tokens carry no side code: 10 appends with :r4 leave 6 quantized.
  EXPECT_EQ(codec_stored_bits(parse_codec_spec("int2:g64:tok:r4+headq:r8:s4"), 64, 10),
            6 * 160 + 4 * 64 * 16 + 6 * 64);
  EXPECT_NE(describe_codec(parse_codec_spec("int2:g64:tok+headq:r8:s4"), 64).find("224 bits/key"),
            std::string::npos);

  // What the stores hold: the side codes of r·b_s bits form one bit stream.
  for (const std::string spec :
       {"int2:g64:tok+headq:r8:s4:random", "int2:g64:tok+headq:r4:s3:random",
        "int2:g32:chan:r8+headq:r16:s16:random", "int4:g64:tok:had+headq:r8:s32:random"}) {
    const CacheShape shape{2, 2, 64};
    auto cache = make_cache(shape, spec, "f16");
    const int64_t n = 45;
    const std::vector<float> kv = gaussian(n * 2 * 64, 5);
    for (int64_t l = 0; l < 2; ++l) cache->append(l, kv, kv, n);
    const auto& codec = dynamic_cast<const CodecCache&>(*cache);
    const int64_t key_bits = codec_stored_bits(parse_codec_spec(spec), 64, n);
    const int64_t value_bytes = n * 64 * 2;
    EXPECT_GE((codec.stored_bytes() / 4 - value_bytes) * 8, key_bits) << spec;
    EXPECT_LT((codec.stored_bytes() / 4 - value_bytes) * 8, key_bits + 8) << spec;
  }
}

// --- the correction, in closed form ----------------------------------------------------------

TEST(HeadqCodec, ExactSideCodeCancelsAResidualInTheSpan) {
  const int64_t n = 8, d = 64, r = 8;
  const Scores s = score_all("int2:g64:tok+headq:r8:s32", "int2:g64:tok", n, d, r, false);
  double base_error = 0;
  for (size_t i = 0; i < s.exact.size(); ++i) {
    EXPECT_NEAR(s.headq[i], s.exact[i], 2e-4f * (1 + std::abs(s.exact[i]))) << i;
    base_error = std::max(base_error, double(std::abs(s.base[i] - s.exact[i])));
  }
  EXPECT_GT(base_error, 0.1);  // the base quantizer alone is far off
}

TEST(HeadqCodec, WrongSignDoublesTheScoreError) {
  const int64_t n = 8, d = 64, r = 8;
  const Scores s = score_all("int2:g64:tok+headq:r8:s32:wrongsign", "int2:g64:tok", n, d, r, false);
  for (size_t i = 0; i < s.exact.size(); ++i) {
    const float base_error = s.base[i] - s.exact[i];
    EXPECT_NEAR(s.headq[i] - s.exact[i], 2 * base_error, 2e-4f * (1 + std::abs(s.exact[i]))) << i;
  }
}

TEST(HeadqCodec, CancelsThroughHadamardWindowsAndChannelGroups) {
  // Rotated base: the store sees H k and the rotated basis; scores are still q·k.
  Scores s = score_all("int2:g64:tok:had+headq:r8:s32", "int2:g64:tok:had", 8, 64, 8, false);
  for (size_t i = 0; i < s.exact.size(); ++i)
    EXPECT_NEAR(s.headq[i], s.exact[i], 2e-4f * (1 + std::abs(s.exact[i])));
  // Per-token window: keys are quantized from fp16 when they leave the 4 newest; the 8 older
  // ones are side-coded, the 4 newest score as fp16: all equal q·fp16(k).
  s = score_all("int2:g64:tok:r4+headq:r8:s32", "int2:g64:tok:r4", 12, 64, 8, true);
  for (size_t i = 0; i < s.exact.size(); ++i)
    EXPECT_NEAR(s.headq[i], s.exact[i], 2e-4f * (1 + std::abs(s.exact[i])));
  // Per-channel groups of 8 tokens: 16 of 20 keys quantized two groups at a time.
  s = score_all("int2:g8:chan+headq:r16:s32", "int2:g8:chan", 20, 64, 16, true);
  for (size_t i = 0; i < s.exact.size(); ++i)
    EXPECT_NEAR(s.headq[i], s.exact[i], 2e-4f * (1 + std::abs(s.exact[i])));
}

TEST(HeadqCodec, QuantizedSideCodeErrorIsBoundedAndStoredKeyMatchesScores) {
  // ĉ is within half a side-code step of c = U e, so |score error| <= |U q|₁ · step / 2.
  const int64_t n = 8, d = 64, r = 8;
  const std::vector<float> keys = gaussian(n * d, 1, 2.0f);
  const std::vector<float> e = residuals("int2:g64:tok", keys, n, d, false);
  const HeadqBasis basis = one_head_basis(basis_spanning(e, n, d, r), r, d);
  auto cache = make_cache({1, 1, d}, "int2:g64:tok+headq:r8:s8", "f32", 0, 32, &basis);
  std::vector<float> values(static_cast<size_t>(d), 0.0f);
  for (int64_t t = 0; t < n; ++t) cache->append(0, std::span(keys).subspan(t * d, d), values, 1);
  const std::vector<float> q = gaussian(d, 7);
  std::vector<float> scores(static_cast<size_t>(n)), stored(static_cast<size_t>(d));
  cache->score(0, 0, q, PositionSet::range(0, n), scores);
  double projected_l1 = 0;
  for (int64_t j = 0; j < r; ++j) {
    double p = 0;
    for (int64_t c = 0; c < d; ++c) p += basis.query_vectors[j * d + c] * q[c];
    projected_l1 += std::abs(p);
  }
  for (int64_t t = 0; t < n; ++t) {
    // c = U e has range at most 2 |e|, so its 8-bit step is at most 2 |e| / 255 (plus rounding).
    const double e_norm = std::sqrt(dot(&e[t * d], &e[t * d], d));
    const double bound = projected_l1 * (2 * e_norm / 255 * 1.01) / 2 + 1e-3;
    EXPECT_NEAR(scores[t], dot(q.data(), &keys[t * d], d), bound) << t;
    dynamic_cast<CodecCache&>(*cache).stored_key(0, 0, t, stored);
    EXPECT_NEAR(dot(q.data(), stored.data(), d), scores[t], 1e-3 * (1 + std::abs(scores[t])));
  }
}

// Scores read the stored key: q · (base + U_rᵀ ĉ) for side codes of 2, 3, 4 and 8 bits at
// ranks that are multiples of 8, for positions that fill a block of eight and for a remainder,
// in any subset of positions.
TEST(HeadqCodec, PackedSideCodeScoresMatchStoredKeys) {
  const int64_t n = 13, d = 64;
  const std::vector<float> keys = gaussian(n * d, 3, 2.0f);
  const std::vector<float> q = gaussian(2 * d, 4);
  for (const char* spec : {"int2:g64:tok+headq:r8:s2:random", "int2:g64:tok+headq:r16:s3:random",
                           "int4:g32:tok+headq:r8:s4:random", "int2:g64:tok+headq:r24:s8:random"}) {
    auto cache = make_cache({1, 1, d}, spec, "f32");
    std::vector<float> values(static_cast<size_t>(d), 0.0f);
    for (int64_t t = 0; t < n; ++t) cache->append(0, std::span(keys).subspan(t * d, d), values, 1);
    const std::vector<int32_t> some{1, 4, 5, 9, 12};
    for (const PositionSet& set : {PositionSet::range(0, n), PositionSet::list(some)}) {
      const int64_t m = set.size();
      std::vector<float> scores(static_cast<size_t>(2 * m)), stored(static_cast<size_t>(d));
      cache->score(0, 0, q, set, scores);
      for (int64_t i = 0; i < m; ++i) {
        dynamic_cast<CodecCache&>(*cache).stored_key(0, 0, set[i], stored);
        for (int64_t j = 0; j < 2; ++j) {
          const double expected = dot(q.data() + j * d, stored.data(), d);
          EXPECT_NEAR(scores[j * m + i], expected, 1e-4 * (1 + std::abs(expected)))
              << spec << " position " << set[i] << " query " << j;
        }
      }
    }
  }
}

TEST(HeadqCodec, RandomBasisIsOrthonormalAndSeeded) {
  for (const int64_t rank : {1, 8, 64}) {
    const std::vector<double> rows = random_orthonormal_rows(rank, 64, 1234);
    for (int64_t i = 0; i < rank; ++i)
      for (int64_t j = 0; j < rank; ++j) {
        double s = 0;
        for (int64_t c = 0; c < 64; ++c) s += rows[i * 64 + c] * rows[j * 64 + c];
        EXPECT_NEAR(s, i == j ? 1.0 : 0.0, 1e-12);
      }
    EXPECT_EQ(rows, random_orthonormal_rows(rank, 64, 1234));
  }
  EXPECT_NE(random_orthonormal_rows(8, 64, 1), random_orthonormal_rows(8, 64, 2));
  const CodecSpec spec = parse_codec_spec("int2:g64:tok+headq:r8:s4:random");
  const std::vector<float> rows = headq_basis_rows(spec, nullptr, 2, 3, 64, 1, 2);
  const std::vector<double> expected = random_orthonormal_rows(8, 64, headq_random_seed(1, 2));
  ASSERT_EQ(rows.size(), expected.size());
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i], static_cast<float>(expected[i]));
  EXPECT_NE(headq_random_seed(1, 2), headq_random_seed(2, 1));
}

// --- eigen solver -----------------------------------------------------------------------------

TEST(SymmetricEigen, ReproducesARandomSpdMatrix) {
  const int64_t n = 24;
  const std::vector<float> b = gaussian(n * n, 11);
  std::vector<double> a(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = i == j ? 0.5 : 0.0;
      for (int64_t k = 0; k < n; ++k) s += double(b[k * n + i]) * b[k * n + j];
      a[i * n + j] = s;
    }
  const SymmetricEigen e = symmetric_eigen(a, n);
  for (int64_t i = 0; i + 1 < n; ++i) EXPECT_GE(e.values[i], e.values[i + 1]);
  EXPECT_GT(e.values[n - 1], 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double vlv = 0, vv = 0;
      for (int64_t k = 0; k < n; ++k) {
        vlv += e.vectors[k * n + i] * e.values[k] * e.vectors[k * n + j];
        vv += e.vectors[i * n + k] * e.vectors[j * n + k];
      }
      EXPECT_NEAR(vlv, a[i * n + j], 1e-10 * (1 + std::abs(a[i * n + j])));
      EXPECT_NEAR(vv, i == j ? 1.0 : 0.0, 1e-12);
    }
}

TEST(SymmetricEigen, RepeatedEigenvaluesAndBadInput) {
  // diag(3, 1, 3, 2): eigenvalues 3, 3, 2, 1.
  const std::vector<double> a = {3, 0, 0, 0, 0, 1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 2};
  const SymmetricEigen e = symmetric_eigen(a, 4);
  EXPECT_EQ(e.values, (std::vector<double>{3, 3, 2, 1}));
  EXPECT_NE(error_of([] { symmetric_eigen(std::vector<double>(5, 0.0), 2); }).find("2 x 2"),
            std::string::npos);
  EXPECT_NE(error_of([] { symmetric_eigen(std::vector<double>{NAN}, 1); }).find("non-finite"),
            std::string::npos);
}

// --- calibration and the basis file ----------------------------------------------------------

const std::string kCalibrationText =
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold, and the early bird catches the worm. "
    "Where there is a will there is a way; the pen is mightier than the sword.";

// The query second moment of (layer, kv head), accumulated independently of calibrate_headq.
class SecondMoment final : public AttentionObserver {
 public:
  SecondMoment(int64_t layer, int64_t kv_head, int64_t d)
      : layer_(layer), kv_head_(kv_head), d_(d), sum_(d * d, 0.0) {}
  void observe(const AttentionEvent& e) override {
    if (e.layer != layer_ || e.kv_head != kv_head_) return;
    std::lock_guard lock(mutex_);
    for (int64_t i = 0; i < d_; ++i)
      for (int64_t j = 0; j < d_; ++j) sum_[i * d_ + j] += double(e.query[i]) * e.query[j];
    ++count_;
  }
  double quadratic_form(std::span<const double> u) const {
    double s = 0;
    for (int64_t i = 0; i < d_; ++i)
      for (int64_t j = 0; j < d_; ++j) s += u[i] * sum_[i * d_ + j] * u[j];
    return s / count_;
  }
  int64_t count() const { return count_; }

 private:
  int64_t layer_, kv_head_, d_;
  std::vector<double> sum_;
  int64_t count_ = 0;
  std::mutex mutex_;
};

TEST(HeadqCalibration, WritesAFileThatLoadsBackIdentically) {
  const Model llama = Model::load(kModels + "/llama");
  CalibrationOptions options;
  options.tokens = 70;
  options.rank = 4;
  options.window = 32;
  const HeadqBasis basis = calibrate_headq(llama, kCalibrationText, "inline", options);
  const int64_t d = llama.config().head_dim;
  EXPECT_EQ(basis.layers, 2);
  EXPECT_EQ(basis.kv_heads, 2);
  EXPECT_EQ(basis.head_dim, d);
  EXPECT_EQ(basis.rank, 4);
  EXPECT_EQ(basis.tokens, 70);
  EXPECT_EQ(basis.fingerprint, model_fingerprint(llama));

  // Eigenpairs of the query moment, checked against a Σ accumulated here from the same windows.
  Decoder decoder(llama);
  const std::vector<int32_t> ids = llama.tokenizer().encode(kCalibrationText, false);
  SecondMoment moment(1, 1, d);
  const bool bos = llama.tokenizer().adds_bos();
  int64_t done = 0;
  // The within-group key spread of head (1, 1), from the keys each window's cache holds: whole
  // groups of kCalibratedKeyGroup (= the 32-position window here: two of the three windows).
  std::vector<double> within(static_cast<size_t>(d * d), 0.0);
  int64_t group_tokens = 0;
  std::vector<float> group_keys;  // those groups' keys as a cache codes them (fp16)
  for (size_t start = 0; done < options.tokens; start += bos ? 31 : 32) {
    std::vector<int32_t> window;
    if (bos) window.push_back(*llama.tokenizer().bos_id());
    for (size_t i = start; i < ids.size() && window.size() < 32; ++i) window.push_back(ids[i]);
    window.resize(std::min<size_t>(window.size(), options.tokens - done));
    auto cache = make_cache(decoder.cache_shape(), "f32", "f32");
    decoder.next_logits(window, *cache, {.observer = &moment});
    done += static_cast<int64_t>(window.size());
    const auto& stored = dynamic_cast<const CodecCache&>(*cache);
    const int64_t n = static_cast<int64_t>(window.size());
    for (int64_t g0 = 0; g0 + kCalibratedKeyGroup <= n; g0 += kCalibratedKeyGroup) {
      std::vector<double> keys(static_cast<size_t>(kCalibratedKeyGroup * d)), mean(d, 0.0);
      std::vector<float> key(d);
      for (int64_t t = 0; t < kCalibratedKeyGroup; ++t) {
        stored.stored_key(1, 1, g0 + t, key);
        for (int64_t c = 0; c < d; ++c) keys[t * d + c] = key[c], mean[c] += key[c];
        for (float x : key) group_keys.push_back(fp16_to_float(float_to_fp16(x)));
      }
      for (int64_t c = 0; c < d; ++c) mean[c] /= kCalibratedKeyGroup;
      for (int64_t t = 0; t < kCalibratedKeyGroup; ++t)
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j)
            within[i * d + j] += (keys[t * d + i] - mean[i]) * (keys[t * d + j] - mean[j]);
      group_tokens += kCalibratedKeyGroup;
    }
  }
  ASSERT_EQ(group_tokens, 64);
  ASSERT_EQ(basis.key_group, kCalibratedKeyGroup);
  const std::span<const double> group_rows = basis.key_group_rows(1, 1);
  for (int64_t j = 0; j < basis.rank; ++j) {
    const double value = basis.key_group_eigenvalues[(1 * 2 + 1) * d + j];
    double form = 0;
    for (int64_t i = 0; i < d; ++i)
      for (int64_t k = 0; k < d; ++k)
        form += group_rows[j * d + i] * within[i * d + k] * group_rows[j * d + k];
    EXPECT_NEAR(form / static_cast<double>(group_tokens), value, 1e-5 * (1 + value)) << j;
    EXPECT_GE(value, 0.0);
  }
  // Below full rank nothing is measured; at full rank (what query-basis codecs need) the cost of
  // coding each direction of each basis kind in those groups is (format version 4), the same as
  // measuring it on the keys collected here.
  EXPECT_TRUE(basis.key_group_distortion.empty());
  CalibrationOptions full_options = options;
  full_options.rank = d;
  // Progress counts the second pass: every position runs twice at full rank.
  std::vector<std::pair<int64_t, int64_t>> reports;
  const HeadqBasis full =
      calibrate_headq(llama, kCalibrationText, "inline", full_options,
                      [&](int64_t done, int64_t total) { reports.emplace_back(done, total); });
  ASSERT_EQ(reports.size(), 6u);  // three windows, twice
  EXPECT_EQ(reports.back(), std::make_pair(int64_t{140}, int64_t{140}));
  for (size_t i = 1; i < reports.size(); ++i) EXPECT_GT(reports[i].first, reports[i - 1].first);
  for (const QBasisSpec::Basis kind :
       {QBasisSpec::Basis::Query, QBasisSpec::Basis::Random, QBasisSpec::Basis::KeyPca}) {
    const std::vector<double> measured = qbasis_measure_group_distortion(
        qbasis_head(kind, full, 1, 1), group_keys, kCalibratedKeyGroup);
    const std::span<const double> rows = full.key_group_distortion_rows(kind, 1, 1);
    ASSERT_EQ(rows.size(), measured.size());
    for (size_t i = 0; i < rows.size(); ++i)
      EXPECT_NEAR(rows[i], measured[i], 1e-9 * (1 + measured[i]))
          << static_cast<int>(kind) << " " << i;
  }
  // The query-weighted key PCA: dual rows (s_i·t_j = δ_ij), unit weights s_iᵀ Σ_q s_i, and
  // uncorrelated coordinates t_i·k of descending variance.
  {
    const std::span<const double> t = full.weighted_key_rows(1, 1);
    const std::span<const double> dual = full.weighted_key_dual_rows(1, 1);
    ASSERT_EQ(static_cast<int64_t>(t.size()), d * d);
    const std::span<const double> key_rows = full.key_rows(1, 1);
    const double* key_values = full.key_eigenvalues.data() + (1 * 2 + 1) * d;
    const double* mean = full.key_means.data() + (1 * 2 + 1) * d;
    const auto covariance = [&](int64_t i, int64_t j) {
      double sum = 0, mi = 0, mj = 0;
      for (int64_t m = 0; m < d; ++m) {
        double a = 0, b = 0;
        for (int64_t c = 0; c < d; ++c)
          a += t[i * d + c] * key_rows[m * d + c], b += t[j * d + c] * key_rows[m * d + c];
        sum += key_values[m] * a * b;
      }
      for (int64_t c = 0; c < d; ++c) mi += t[i * d + c] * mean[c], mj += t[j * d + c] * mean[c];
      return sum - mi * mj;
    };
    for (int64_t i = 0; i < d; ++i) {
      EXPECT_NEAR(moment.quadratic_form(dual.subspan(i * d, d)), 1.0, 1e-6) << i;
      for (int64_t j = 0; j < d; ++j) {
        double product = 0;
        for (int64_t c = 0; c < d; ++c) product += t[i * d + c] * dual[j * d + c];
        EXPECT_NEAR(product, i == j ? 1.0 : 0.0, 1e-9) << i << " " << j;
      }
      for (int64_t j = i + 1; j < std::min<int64_t>(d, i + 3); ++j)
        EXPECT_NEAR(covariance(i, j), 0.0,
                    1e-6 * std::sqrt(std::abs(covariance(i, i) * covariance(j, j))) + 1e-12);
      if (i + 1 < d) EXPECT_GE(covariance(i, i) + 1e-9, covariance(i + 1, i + 1)) << i;
    }
  }
  EXPECT_EQ(moment.count(), 70 * 2);  // two query heads per KV head
  const std::span<const double> rows = basis.query_rows(1, 1);
  for (int64_t j = 0; j < basis.rank; ++j) {
    const double lambda = basis.query_eigenvalues[(1 * 2 + 1) * d + j];
    EXPECT_NEAR(moment.quadratic_form(rows.subspan(j * d, d)), lambda, 1e-6 * (1 + lambda));
    for (int64_t i = 0; i < basis.rank; ++i) {
      double s = 0;
      for (int64_t c = 0; c < d; ++c) s += rows[j * d + c] * rows[i * d + c];
      EXPECT_NEAR(s, i == j ? 1.0 : 0.0, 1e-12);
    }
  }
  for (int64_t j = 0; j + 1 < d; ++j)
    EXPECT_GE(basis.query_eigenvalues[j], basis.query_eigenvalues[j + 1]);

  const fs::path path = temp_file("headq_basis");
  save_headq_basis(basis, path);
  const HeadqBasis loaded = load_headq_basis(path, llama);
  EXPECT_EQ(loaded.fingerprint, basis.fingerprint);
  EXPECT_EQ(loaded.model, basis.model);
  EXPECT_EQ(loaded.text, "inline");
  EXPECT_EQ(loaded.tokens, basis.tokens);
  EXPECT_EQ(loaded.window, basis.window);
  EXPECT_EQ(loaded.rank, basis.rank);
  EXPECT_EQ(loaded.query_eigenvalues, basis.query_eigenvalues);
  EXPECT_EQ(loaded.query_vectors, basis.query_vectors);
  EXPECT_EQ(loaded.key_eigenvalues, basis.key_eigenvalues);
  EXPECT_EQ(loaded.key_vectors, basis.key_vectors);
  // Key means (format version 2): one per channel of every head, kept to the bit.
  EXPECT_EQ(basis.key_means.size(), static_cast<size_t>(basis.heads() * d));
  EXPECT_EQ(loaded.key_means, basis.key_means);
  // The within-group spread (version 3), likewise.
  EXPECT_EQ(loaded.key_group, kCalibratedKeyGroup);
  EXPECT_EQ(loaded.key_group_eigenvalues, basis.key_group_eigenvalues);
  EXPECT_EQ(loaded.key_group_vectors, basis.key_group_vectors);
  // The rank-4 basis has no measured distortions: version 3. The full-rank one is version 4 and
  // keeps them to the bit.
  const auto version_of = [](const fs::path& file) {
    std::ifstream in(file, std::ios::binary);
    char preamble[12];
    in.read(preamble, sizeof preamble);
    uint32_t version = 0;
    std::memcpy(&version, preamble + 8, sizeof version);
    return version;
  };
  EXPECT_EQ(version_of(path), 3u);
  {
    const fs::path full_path = temp_file("headq_basis_v4");
    save_headq_basis(full, full_path);
    EXPECT_EQ(version_of(full_path), 4u);
    const HeadqBasis reread = load_headq_basis(full_path, llama, d);
    EXPECT_EQ(reread.key_group_distortion, full.key_group_distortion);
    EXPECT_EQ(reread.key_window, kCalibratedKeyWindow);
    ASSERT_FALSE(full.key_fisher.empty());
    EXPECT_EQ(reread.key_fisher, full.key_fisher);
    EXPECT_EQ(reread.weighted_rows, full.weighted_rows);
    EXPECT_EQ(reread.weighted_dual_rows, full.weighted_dual_rows);
    EXPECT_EQ(reread.key_group_vectors, full.key_group_vectors);
    fs::remove(full_path);
  }
  {
    // A basis without it is written as version 2, which loads without it.
    HeadqBasis older = basis;
    older.key_group = 0;
    older.key_group_eigenvalues.clear();
    older.key_group_vectors.clear();
    const fs::path older_path = temp_file("headq_basis_v2");
    save_headq_basis(older, older_path);
    EXPECT_EQ(version_of(older_path), 2u);
    const HeadqBasis reread = load_headq_basis(older_path, llama);
    EXPECT_EQ(reread.key_group, 0);
    EXPECT_TRUE(reread.key_group_vectors.empty());
    EXPECT_EQ(reread.key_means, basis.key_means);
    fs::remove(older_path);
  }

  // Another model: named by its fingerprint.
  const Model mistral = Model::load(kModels + "/mistral");
  const std::string other = error_of([&] { load_headq_basis(path, mistral); });
  EXPECT_NE(other.find("fingerprint " + basis.fingerprint), std::string::npos) << other;
  EXPECT_NE(other.find(model_fingerprint(mistral)), std::string::npos) << other;
  // Another rank.
  EXPECT_NE(error_of([&] { load_headq_basis(path, llama, 8); }).find("rank 8 is needed"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              make_cache(decoder.cache_shape(), "int2:g16:tok+headq:r8:s4", "f32", 0, 32, &loaded);
            }).find("needs rank 8"),
            std::string::npos);
  // Another shape.
  EXPECT_NE(error_of([&] {
              make_cache({3, 2, 16}, "int2:g16:tok+headq:r4:s4", "f32", 0, 32, &loaded);
            }).find("3 x 2 x 16"),
            std::string::npos);

  // Damaged files.
  {
    std::ifstream in(path, std::ios::binary);
    const std::string bytes(std::istreambuf_iterator<char>(in), {});
    std::ofstream(path, std::ios::binary | std::ios::trunc)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size() - 8));
    EXPECT_NE(error_of([&] { load_headq_basis(path); }).find("runs past the end"),
              std::string::npos);
    std::ofstream(path, std::ios::binary | std::ios::trunc) << "not a basis";
    EXPECT_NE(error_of([&] { load_headq_basis(path); }).find("bad magic"), std::string::npos);
  }
  fs::remove(path);
  EXPECT_NE(error_of([&] { load_headq_basis(path); }).find("no such file"), std::string::npos);

  // HeadQ in a forward pass on the fixture: finite perplexity through the whole stack.
  PerplexityOptions ppl;
  ppl.mode = PerplexityMode::Decode;
  ppl.window = 32;
  ppl.key_codec = parse_key_codec_spec("int2:g16:tok+headq:r4:s4");
  ppl.headq_basis = &loaded;
  if (bos) ppl.bos = llama.tokenizer().bos_id();
  const PerplexityResult result = perplexity(decoder, ids, ppl);
  EXPECT_TRUE(std::isfinite(result.ppl) && result.ppl > 1) << result.ppl;
}

TEST(HeadqCalibration, BadInputIsAClearError) {
  const Model llama = Model::load(kModels + "/llama");
  CalibrationOptions options;
  EXPECT_NE(error_of([&] {
              calibrate_headq(llama, "", "empty.txt", options);
            }).find("calibration text 'empty.txt' is empty"),
            std::string::npos);
  options.rank = 17;
  EXPECT_NE(error_of([&] { calibrate_headq(llama, "text", "t", options); }).find("rank 17"),
            std::string::npos);
}

// --- the command line ------------------------------------------------------------------------

TEST(HeadqCli, CalibrateThenPpl) {
  const fs::path text = temp_file("headq_text.txt"), out = temp_file("headq_cli.basis");
  std::ofstream(text) << kCalibrationText << "\n" << kCalibrationText << "\n";
  ProgramRun r = run("calibrate " + kModels + "/llama --text " + text.string() +
                     " --tokens 60 --rank 4 --window 32 --out " + out.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("rank:         4"), std::string::npos) << r.output;
  r = run("ppl " + kModels + "/llama -f " + text.string() +
          " --mode decode -L 32 --keys int2:g16:tok+headq:r4:s4 --basis " + out.string());
  EXPECT_EQ(r.status, 0) << r.output;
  r = run("ppl " + kModels + "/mistral -f " + text.string() +
          " --mode decode -L 32 --keys int2:g16:tok+headq:r4:s4 --basis " + out.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("fingerprint"), std::string::npos) << r.output;
  r = run("ppl " + kModels + "/llama -f " + text.string() +
          " --mode decode -L 32 --keys int2:g16:tok+headq:r4:s4");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--basis"), std::string::npos) << r.output;
  const fs::path empty = temp_file("headq_empty.txt");
  std::ofstream(empty).flush();
  r = run("calibrate " + kModels + "/llama --text " + empty.string() + " --out " + out.string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("is empty"), std::string::npos) << r.output;
  fs::remove(text);
  fs::remove(out);
  fs::remove(empty);
}

// --- the default model ------------------------------------------------------------------------

TEST(HeadqDefaultModel, RankEightSideCodeLowersInt2DecodePerplexity) {
  if (!fs::exists(Model::default_model_path()) || !fs::exists(default_calibration_text()) ||
      !fs::exists(default_test_text()))
    GTEST_SKIP() << "the default model or the WikiText files are missing (scripts/setup.sh)";
  const Model model = Model::load("default");
  CalibrationOptions options;
  options.tokens = 300;
  options.rank = 8;
  const HeadqBasis basis = calibrate_headq(model, read_text_file(default_calibration_text()),
                                           "wikitext-2 valid", options);
  Decoder decoder(model);
  const std::string text = read_text_file(default_test_text()).substr(0, 20000);
  const std::vector<int32_t> ids = model.tokenizer().encode(text, false);
  PerplexityOptions o;
  o.mode = PerplexityMode::Decode;
  o.max_tokens = 200;
  o.headq_basis = &basis;
  if (model.tokenizer().adds_bos()) o.bos = model.tokenizer().bos_id();
  o.key_codec = parse_key_codec_spec("int2:g64:tok");
  const double plain = perplexity(decoder, ids, o).ppl;
  o.key_codec = parse_key_codec_spec("int2:g64:tok+headq:r8:s4");
  const double headq = perplexity(decoder, ids, o).ppl;
  std::printf("decode PPL over 200 tokens: int2:g64:tok %.3f, +headq:r8:s4 %.3f\n", plain, headq);
  EXPECT_LT(headq, plain);
}

}  // namespace
}  // namespace visikv

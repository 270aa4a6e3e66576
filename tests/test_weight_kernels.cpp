// The weight kernels (model/weight_kernels.h) for every stored type and every instruction set this
// CPU can run: dot products against a float64 reference over the `gguf` package's dequantized
// values, and a chunk of tokens equal bit for bit to one token at a time.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/formats/dequantize.h"
#include "visikv/formats/gguf.h"
#include "visikv/model/amx_products.h"
#include "visikv/model/matmul.h"
#include "visikv/model/weight_kernels.h"

namespace visikv {
namespace {

const std::filesystem::path kQuants =
    std::filesystem::path(VISIKV_FIXTURES) / "formats" / "quants.gguf";

using test_support::available_targets;
using test_support::TargetGuard;

// Checks dot_row_tokens on every row of `tensor` for 1 to 7 tokens against float64 sums of the
// dequantized row.
void expect_rows_match_reference(const TensorRef& tensor) {
  const int64_t n = tensor.row_size();
  constexpr int64_t kTokens = 7;
  const int64_t x_stride = n + 3;  // rows of x need not be packed
  std::mt19937 rng(1234);
  const std::vector<float> x = test_support::random_vector(rng, kTokens * x_stride);
  for (int64_t r = 0; r < tensor.rows(); ++r) {
    std::vector<float> w(static_cast<size_t>(n));
    dequantize(tensor.dtype, tensor.row(r), w);
    const std::byte* row = tensor.row(r).data();
    // All tokens in one call, written with a stride into a poisoned buffer.
    std::vector<float> y(kTokens * 2, std::numeric_limits<float>::quiet_NaN());
    dot_row_tokens(tensor.dtype, row, n, x.data(), x_stride, kTokens, y.data(), 2);
    for (int64_t t = 0; t < kTokens; ++t) {
      double exact = 0, magnitude = 0;
      for (int64_t i = 0; i < n; ++i) {
        exact += double{w[i]} * x[t * x_stride + i];
        magnitude += std::abs(double{w[i]} * x[t * x_stride + i]);
      }
      const float got = y[t * 2];
      EXPECT_NEAR(got, exact, 1e-6 * magnitude + 1e-30)
          << tensor.describe() << " row " << r << " token " << t;
      EXPECT_TRUE(std::isnan(y[t * 2 + 1])) << "wrote outside its stride";
      // Alone, and in every chunk size, the token gets the same bits.
      for (int64_t chunk = 1; chunk <= kTokens - t; ++chunk) {
        std::vector<float> part(static_cast<size_t>(chunk),
                                std::numeric_limits<float>::quiet_NaN());
        dot_row_tokens(tensor.dtype, row, n, x.data() + t * x_stride, x_stride, chunk, part.data(),
                       1);
        EXPECT_EQ(part[0], got) << tensor.describe() << " row " << r << " token " << t
                                << " in a chunk of " << chunk;
      }
    }
    // dot_stored_row is the one-token case.
    EXPECT_EQ(dot_stored_row(tensor.dtype, row, x.data(), n), y[0]);
  }
}

class WeightKernels : public ::testing::TestWithParam<const char*> {};

TEST_P(WeightKernels, MatchFloat64OnEveryTarget) {
  const GgufFile file(kQuants);
  const std::string type = GetParam();
  const TensorRef& tensor = file.tensor((type.starts_with("Q") ? "q." : "f.") + type);
  ASSERT_EQ(dtype_name(tensor.dtype), type);
  const std::vector<std::string> targets = available_targets();
  ASSERT_FALSE(targets.empty());
  for (const std::string& target : targets) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    expect_rows_match_reference(tensor);
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, WeightKernels,
                         ::testing::Values("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K",
                                           "Q6_K", "F16", "BF16", "F32"),
                         [](const auto& info) { return std::string(info.param); });

// Float rows need not be a whole number of 32-value units: the last values are added one at a
// time (45 = 32 + 13).
TEST(WeightKernels, FloatRowsWithTails) {
  constexpr int64_t kRows = 3, kCols = 45;
  std::mt19937 rng(99);
  const std::vector<float> values = test_support::random_vector(rng, kRows * kCols);
  std::vector<uint16_t> halves(values.size()), bfloats(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    halves[i] = float_to_fp16(values[i]);
    bfloats[i] = float_to_bf16(values[i]);
  }
  const auto view = [](const auto& v) {
    return std::span<const std::byte>(reinterpret_cast<const std::byte*>(v.data()),
                                      v.size() * sizeof(v[0]));
  };
  const TensorRef tensors[] = {{"f32", DType::F32, {kRows, kCols}, view(values)},
                               {"f16", DType::F16, {kRows, kCols}, view(halves)},
                               {"bf16", DType::BF16, {kRows, kCols}, view(bfloats)}};
  for (const std::string& target : available_targets()) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    for (const TensorRef& tensor : tensors) expect_rows_match_reference(tensor);
  }
}

TEST(WeightKernels, TargetSelection) {
  for (const std::string& target : available_targets()) {
    const TargetGuard guard(target);
    const std::string chosen = weight_kernel_target();
    if (target == "generic") {
      EXPECT_TRUE(chosen == "EMU128" || chosen == "SCALAR") << chosen;
    } else if (target == "avx2") {
      EXPECT_EQ(chosen, "AVX2");
    } else if (target == "avx512") {
      EXPECT_EQ(chosen, "AVX3");
    } else if (target == "avx512vnni") {
      EXPECT_EQ(chosen, "AVX3_DL");
    } else if (target == "amx") {
      EXPECT_EQ(chosen, "AVX3_DL+AMX");
    } else if (target == "neon") {
      EXPECT_EQ(chosen, "NEON");
    }
  }
  // The other architecture's instruction sets are refused by name, never replaced by this one's.
#if defined(__x86_64__) || defined(__i386__)
  const char* foreign = "neon";
#else
  const char* foreign = "avx2";
#endif
  EXPECT_EQ(test_support::error_of([&] { set_weight_kernel_target(foreign); }),
            str_cat("SIMD target '", foreign, "' is not available on this CPU"));
  EXPECT_EQ(test_support::error_of([] { set_weight_kernel_target("sse9"); }),
            "unknown SIMD target 'sse9' (expected native, amx, avx512vnni, avx512, avx2, neon or "
            "generic)");
  // AMX is refused where the CPU lacks it, and narrower targets turn it off.
  if (!amx::available()) {
    EXPECT_EQ(test_support::error_of([] { set_weight_kernel_target("amx"); }),
              "SIMD target 'amx' is not available on this CPU");
  } else {
    set_weight_kernel_target("avx512vnni");
    EXPECT_FALSE(amx::enabled());
    set_weight_kernel_target("native");
    EXPECT_TRUE(amx::enabled());
  }
}

}  // namespace
}  // namespace visikv

namespace visikv {
namespace {

// The int8 products on activations that 8 bits represent exactly (k / 64 for integers |k| <= 127,
// one value per block of 32 at ±127/64, so every block's scale is 1/64): they must then equal the
// float64 dot product up to float32 sums, for every block type and target.
TEST(WeightKernels, Int8ProductsAreExactOnRepresentableActivations) {
  const GgufFile file(kQuants);
  for (const char* type : {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}) {
    SCOPED_TRACE(type);
    const TensorRef& tensor = file.tensor(std::string("q.") + type);
    const int64_t n = tensor.row_size();
    constexpr int64_t kTokens = 6;
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> code(-127, 127);
    std::vector<float> x(static_cast<size_t>(kTokens * n));
    for (size_t i = 0; i < x.size(); ++i)
      x[i] = static_cast<float>(i % 32 == 5 ? (i % 64 == 5 ? 127 : -127) : code(rng)) / 64.0f;
    Int8Activations xq;
    quantize_activations(x.data(), kTokens, n, xq);
    for (int64_t i = 0; i < kTokens * n; ++i)
      ASSERT_EQ(static_cast<float>(xq.codes[i]) * xq.scales[i / 32], x[i]) << "value " << i;
    for (const std::string& target : available_targets()) {
      SCOPED_TRACE(target);
      const TargetGuard guard(target);
      for (int64_t r = 0; r < tensor.rows(); ++r) {
        std::vector<float> w(static_cast<size_t>(n));
        dequantize(tensor.dtype, tensor.row(r), w);
        std::vector<float> y(kTokens, std::numeric_limits<float>::quiet_NaN());
        dot_row_tokens_int8(tensor.dtype, tensor.row(r).data(), n, xq, 0, kTokens, y.data(), 1);
        for (int64_t t = 0; t < kTokens; ++t) {
          double exact = 0, magnitude = 0;
          for (int64_t i = 0; i < n; ++i) {
            exact += double{w[i]} * x[t * n + i];
            magnitude += std::abs(double{w[i]} * x[t * n + i]);
          }
          EXPECT_NEAR(y[t], exact, 2e-6 * magnitude) << "row " << r << " token " << t;
          float alone = std::numeric_limits<float>::quiet_NaN();
          dot_row_tokens_int8(tensor.dtype, tensor.row(r).data(), n, xq, t, 1, &alone, 1);
          EXPECT_EQ(alone, y[t]) << "row " << r << " token " << t << " alone";
        }
      }
    }
  }
}

}  // namespace
}  // namespace visikv

namespace visikv {
namespace {

// Random rows of `type` with small fp16 scales where the format keeps them (the other bytes
// random), or normal float values for the float types: every value finite.
std::vector<std::byte> random_rows(DType type, int64_t rows, int64_t columns, std::mt19937& rng) {
  const DTypeInfo& info = dtype_info(type);
  std::vector<std::byte> data(static_cast<size_t>(rows * storage_bytes(type, columns)));
  if (info.block_elements == 1) {
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < rows * columns; ++i) {
      const float v = normal(rng);
      if (type == DType::F32) {
        std::memcpy(data.data() + 4 * i, &v, 4);
      } else {
        const uint16_t h = type == DType::F16 ? float_to_fp16(v) : float_to_bf16(v);
        std::memcpy(data.data() + 2 * i, &h, 2);
      }
    }
    return data;
  }
  for (auto& b : data) b = static_cast<std::byte>(rng() & 0xFF);
  const uint16_t scale = float_to_fp16(0.01f);
  for (int64_t b = 0; b < rows * columns / info.block_elements; ++b) {
    std::byte* block = data.data() + b * info.block_bytes;
    if (type == DType::Q6_K) {
      std::memcpy(block + 208, &scale, 2);
      continue;
    }
    std::memcpy(block, &scale, 2);
    if (type == DType::Q4_1 || type == DType::Q5_1 || type == DType::Q4_K || type == DType::Q5_K)
      std::memcpy(block + 2, &scale, 2);
  }
  return data;
}

// Rows longer than one step of the blocked product (2304 values: steps of 1024, 1024 and 256), an
// odd number of them and a token count with a partial group: every output of the blocked product
// equals the one-token row kernel's, bit for bit, on every target.
TEST(WeightKernels, BlockedProductEqualsTheRowKernelOnLongRows) {
  constexpr int64_t kRows = 5, kColumns = 2304, kTokens = 9;
  for (const DType type :
       {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0,
        DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(type)));
    std::mt19937 rng(11);
    const std::vector<std::byte> weights = random_rows(type, kRows, kColumns, rng);
    const int64_t row_bytes = storage_bytes(type, kColumns);
    const std::vector<float> x = test_support::random_vector(rng, kTokens * kColumns);
    for (const std::string& target : available_targets()) {
      SCOPED_TRACE(target);
      const TargetGuard guard(target);
      std::vector<float> all(kTokens * kRows, std::numeric_limits<float>::quiet_NaN());
      dot_rows_tokens(type, weights.data(), row_bytes, kRows, kColumns, x.data(), kColumns, kTokens,
                      all.data(), kRows);
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t t = 0; t < kTokens; ++t) {
          float one = std::numeric_limits<float>::quiet_NaN();
          dot_row_tokens(type, weights.data() + r * row_bytes, kColumns, x.data() + t * kColumns,
                         kColumns, 1, &one, 1);
          ASSERT_TRUE(std::isfinite(one)) << r << " " << t;
          EXPECT_EQ(all[t * kRows + r], one) << r << " " << t;
        }
    }
  }
}

// A range of rows in one call gives, row by row, the bits of one-row calls (both products). With
// more than four tokens the float products run blocked (weight_kernels.cpp BlockedRows): 512-value
// rows take two steps, three rows leave one after the pairs, and 5, 7 and 10 tokens leave one,
// three and two tokens after the groups of four; every output must be the single-token result.
TEST(WeightKernels, RowRangesEqualSingleRows) {
  const GgufFile file(kQuants);
  for (const char* type :
       {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"}) {
    SCOPED_TRACE(type);
    const TensorRef& tensor = file.tensor((type[0] == 'Q' ? "q." : "f.") + std::string(type));
    const int64_t n = tensor.row_size(), rows = tensor.rows();
    const int64_t row_bytes = static_cast<int64_t>(tensor.row(0).size());
    const bool block = type[0] == 'Q';
    for (const int64_t tokens : {int64_t{5}, int64_t{7}, int64_t{10}}) {
      SCOPED_TRACE(tokens);
      std::mt19937 rng(3);
      const std::vector<float> x = test_support::random_vector(rng, tokens * n);
      Int8Activations xq;
      quantize_activations(x.data(), tokens, n, xq);
      for (const std::string& target : available_targets()) {
        SCOPED_TRACE(target);
        const TargetGuard guard(target);
        std::vector<float> all(tokens * rows, std::numeric_limits<float>::quiet_NaN());
        dot_rows_tokens(tensor.dtype, tensor.row(0).data(), row_bytes, rows, n, x.data(), n, tokens,
                        all.data(), rows);
        std::vector<float> all_int8(tokens * rows, std::numeric_limits<float>::quiet_NaN());
        if (block)
          dot_rows_tokens_int8(tensor.dtype, tensor.row(0).data(), row_bytes, rows, n, xq, 0,
                               tokens, all_int8.data(), rows);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t t = 0; t < tokens; ++t) {
            float one = std::numeric_limits<float>::quiet_NaN();
            dot_row_tokens(tensor.dtype, tensor.row(r).data(), n, x.data() + t * n, n, 1, &one, 1);
            EXPECT_EQ(all[t * rows + r], one) << r << " " << t;
            if (!block) continue;
            one = std::numeric_limits<float>::quiet_NaN();
            dot_row_tokens_int8(tensor.dtype, tensor.row(r).data(), n, xq, t, 1, &one, 1);
            EXPECT_EQ(all_int8[t * rows + r], one) << r << " " << t;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace visikv

namespace visikv {
namespace {

const char* const kBlockTypes[] = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"};

// Activations with an outlier channel every 64 values (as the default model's early layers have),
// so that blocks with and without one round at very different scales.
std::vector<float> outlier_activations(std::mt19937& rng, int64_t tokens, int64_t n) {
  std::vector<float> x = test_support::random_vector(rng, static_cast<size_t>(tokens * n));
  for (int64_t i = 0; i < tokens * n; i += 64) x[i] *= 300.0f;
  return x;
}

// The 16-bit rounding: codes within ±32767, each block's largest value at ±32767, every value
// within half a step of its code, and the sums of 16 rounded values.
TEST(WeightKernels, Int16ActivationsRoundEachBlockOfThirtyTwo) {
  constexpr int64_t kTokens = 3, kN = 256;
  std::mt19937 rng(5);
  std::vector<float> x = outlier_activations(rng, kTokens, kN);
  std::fill(x.begin() + 32, x.begin() + 64, 0.0f);  // an all-zero block: scale 0, codes 0
  Int16Activations q;
  quantize_activations(x.data(), kTokens, kN, q);
  ASSERT_EQ(q.codes.size(), static_cast<size_t>(kTokens * kN));
  ASSERT_EQ(q.scales.size(), static_cast<size_t>(kTokens * kN / 32));
  ASSERT_EQ(q.sums16.size(), static_cast<size_t>(kTokens * kN / 16));
  for (int64_t b = 0; b < kTokens * kN / 32; ++b) {
    const float scale = q.scales[b];
    int peak = 0;
    for (int64_t i = 32 * b; i < 32 * (b + 1); ++i) {
      peak = std::max(peak, std::abs(int{q.codes[i]}));
      EXPECT_LE(std::abs(static_cast<double>(q.codes[i]) * scale - x[i]), 0.5 * scale * (1 + 1e-6))
          << i;
    }
    EXPECT_EQ(peak, b == 1 ? 0 : 32767) << "block " << b;
    for (int half = 0; half < 2; ++half) {
      double sum = 0;
      for (int64_t i = 32 * b + 16 * half; i < 32 * b + 16 * half + 16; ++i)
        sum += static_cast<double>(q.codes[i]) * scale;
      EXPECT_NEAR(q.sums16[2 * b + half], sum, 1e-7 * std::abs(sum)) << b << " " << half;
    }
  }
  EXPECT_EQ(q.scales[1], 0.0f);
  EXPECT_THROW(quantize_activations(x.data(), 1, 48, q), Error);
}

// Blocks of 256 (the super-block types' activations): one scale per 256 values, the largest at
// ±32767, sums per 16; a block other than 32 or 256, or a row that is not a whole number of them,
// is refused.
TEST(WeightKernels, Int16ActivationsInBlocksOfTwoHundredFiftySix) {
  constexpr int64_t kTokens = 2, kN = 512;
  std::mt19937 rng(7);
  const std::vector<float> x = outlier_activations(rng, kTokens, kN);
  Int16Activations q;
  quantize_activations(x.data(), kTokens, kN, q, 256);
  EXPECT_EQ(q.block, 256);
  ASSERT_EQ(q.scales.size(), static_cast<size_t>(kTokens * kN / 256));
  ASSERT_EQ(q.sums16.size(), static_cast<size_t>(kTokens * kN / 16));
  for (int64_t b = 0; b < kTokens * kN / 256; ++b) {
    int peak = 0;
    for (int64_t i = 256 * b; i < 256 * (b + 1); ++i) {
      peak = std::max(peak, std::abs(int{q.codes[i]}));
      EXPECT_LE(std::abs(static_cast<double>(q.codes[i]) * q.scales[b] - x[i]),
                0.5 * q.scales[b] * (1 + 1e-6))
          << i;
    }
    EXPECT_EQ(peak, 32767) << "block " << b;
    for (int64_t g = 16 * b; g < 16 * (b + 1); ++g) {
      double sum = 0;
      for (int64_t i = 16 * g; i < 16 * g + 16; ++i)
        sum += static_cast<double>(q.codes[i]) * q.scales[b];
      EXPECT_NEAR(q.sums16[g], sum, 1e-7 * std::abs(sum)) << g;
    }
  }
  EXPECT_THROW(quantize_activations(x.data(), 1, 288, q, 256), Error);
  EXPECT_THROW(quantize_activations(x.data(), 1, 512, q, 64), Error);
  // Activations in the wrong blocks for the weight type: a clear error, not a misread.
  std::vector<std::byte> row(static_cast<size_t>(storage_bytes(DType::Q4_K, 512)));
  float y = 0;
  quantize_activations(x.data(), 1, 512, q, 32);
  try {
    dot_row_tokens_int16(DType::Q4_K, row.data(), 512, q, 0, 1, &y, 1);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("blocks of 256"), std::string::npos) << e.what();
  }
  quantize_activations(x.data(), 1, 512, q, 256);
  std::vector<std::byte> q4_0(static_cast<size_t>(storage_bytes(DType::Q4_0, 512)));
  EXPECT_THROW(dot_row_tokens_int16(DType::Q4_0, q4_0.data(), 512, q, 0, 1, &y, 1), Error);
}

// The super-block types at the edge of the int32 sums: every weight at its largest magnitude
// (Q4_K/Q5_K scale 63 times code 15/31; Q6_K scale -128 times code -32 = 4096) and every
// activation code at 32767, on every target: the largest sums the kernels' lanes can meet must
// not wrap. The result equals float64 of the dequantized row times the rounded activations.
TEST(WeightKernels, Int16SuperBlockSumsDoNotOverflow) {
  constexpr int64_t kN = 1024;
  for (const DType type : {DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
    SCOPED_TRACE(std::string(dtype_name(type)));
    const DTypeInfo& info = dtype_info(type);
    std::vector<std::byte> row(static_cast<size_t>(storage_bytes(type, kN)));
    const uint16_t d = float_to_fp16(0.5f), zero = 0;
    for (int64_t b = 0; b < kN / info.block_elements; ++b) {
      std::byte* block = row.data() + b * info.block_bytes;
      if (type == DType::Q6_K) {
        std::memset(block, 0, 192);          // codes 0: q - 32 = -32
        std::memset(block + 192, 0x80, 16);  // scales -128
        std::memcpy(block + 208, &d, 2);
      } else {
        std::memcpy(block, &d, 2);
        std::memcpy(block + 2, &zero, 2);                      // dmin 0: no offsets
        std::memset(block + 4, 0xFF, 12);                      // scales and mins 63
        std::memset(block + 16, 0xFF, info.block_bytes - 16);  // codes 15 (31 with fifth bits)
      }
    }
    const std::vector<float> x(kN, 1.0f);
    Int16Activations xq;
    quantize_activations(x.data(), 1, kN, xq, 256);
    std::vector<float> w(kN);
    dequantize(type, row, w);
    double expected = 0;
    for (int64_t i = 0; i < kN; ++i) expected += double{w[i]} * xq.codes[i] * xq.scales[i / 256];
    for (const std::string& target : available_targets()) {
      SCOPED_TRACE(target);
      const TargetGuard guard(target);
      float y = std::numeric_limits<float>::quiet_NaN();
      dot_row_tokens_int16(type, row.data(), kN, xq, 0, 1, &y, 1);
      EXPECT_NEAR(y, expected, 1e-6 * std::abs(expected));
    }
  }
}

// The tile products (AMX) against the vector kernels that decode on the same CPU (one token at a
// time, the exact-totals definition): the same bits for every super-block type, over rows and
// tokens that are not whole tiles (37 rows, 1 to 70 tokens from several first tokens), steps that
// are not whole (9 super-blocks: two steps of four and one of one), weights and activations at
// random and at the largest magnitudes (every weight at its largest, activation codes of +-32767
// with mixed signs: the sums' high bytes carry), poisoned outputs around. (Every test that runs all
// targets runs "amx" too, against float64.)
TEST(WeightKernels, Int16TileProductsEqualTheVectorKernels) {
  if (!amx::available()) GTEST_SKIP() << "no AMX-INT8 on this CPU";
  constexpr int64_t kRows = 37, kColumns = 2304, kTokens = 70;
  for (const DType type : {DType::Q4_K, DType::Q5_K, DType::Q6_K})
    for (const bool extreme : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(type)) + (extreme ? " extreme" : " random"));
      std::mt19937 rng(31);
      std::vector<std::byte> weights = random_rows(type, kRows, kColumns, rng);
      const int64_t row_bytes = storage_bytes(type, kColumns);
      std::vector<float> x = outlier_activations(rng, kTokens, kColumns);
      if (extreme) {
        const DTypeInfo& info = dtype_info(type);
        for (int64_t b = 0; b < kRows * kColumns / info.block_elements; ++b) {
          std::byte* block = weights.data() + b * info.block_bytes;
          if (type == DType::Q6_K) {
            std::memset(block, 0, 192);          // codes 0: q - 32 = -32
            std::memset(block + 192, 0x80, 16);  // scales -128
          } else {
            std::memset(block + 4, 0xFF, 12);                      // scales and mins 63
            std::memset(block + 16, 0xFF, info.block_bytes - 16);  // codes 15 (31)
          }
        }
        // Every value at its block's largest magnitude (code +-32767), signs mixed.
        for (size_t i = 0; i < x.size(); ++i) x[i] = (i * 7919) % 3 == 0 ? -1.0f : 1.0f;
      }
      const auto product = [&](const char* target, int64_t first, int64_t tokens) {
        const TargetGuard guard(target);
        Int16Activations xq;
        quantize_activations(x.data(), kTokens, kColumns, xq, 256);
        EXPECT_EQ(xq.has_tile_bytes(), std::string(target) == "amx");
        std::vector<float> y((tokens + 2) * (kRows + 3), std::numeric_limits<float>::quiet_NaN());
        dot_rows_tokens_int16(type, weights.data(), row_bytes, kRows, kColumns, xq, first, tokens,
                              y.data() + kRows + 3, kRows + 3);
        return y;
      };
      for (const auto& [first, tokens] :
           {std::pair<int64_t, int64_t>{0, 70}, {3, 64}, {5, 17}, {60, 10}, {0, 5}, {69, 1}}) {
        SCOPED_TRACE(std::to_string(tokens) + " tokens from " + std::to_string(first));
        const std::vector<float> tiles = product("amx", first, tokens);
        std::vector<float> vectors(tiles.size(), std::numeric_limits<float>::quiet_NaN());
        for (int64_t t = 0; t < tokens; ++t) {
          const std::vector<float> one = product("amx", first + t, 1);
          std::copy(one.begin() + kRows + 3, one.begin() + 2 * (kRows + 3),
                    vectors.begin() + (t + 1) * (kRows + 3));
        }
        for (size_t i = 0; i < tiles.size(); ++i) {
          const int64_t row = static_cast<int64_t>(i) / (kRows + 3) - 1,
                        column = static_cast<int64_t>(i) % (kRows + 3);
          if (row < 0 || row >= tokens || column >= kRows) {
            ASSERT_TRUE(std::isnan(tiles[i])) << "wrote outside the outputs at " << i;
            continue;
          }
          ASSERT_TRUE(std::isfinite(tiles[i])) << "token " << row << " row " << column;
          ASSERT_EQ(tiles[i], vectors[i]) << "token " << row << " row " << column;
        }
      }
    }
}

// The activation codes on every target against the scalar definition (weight_kernels.h): per
// block the scale max|x| / max, codes nearbyint(x * (1 / scale)) clamped, a block with a value
// that is not finite getting a NaN scale and zero codes for its other values; blocks of 32 and 256,
// 8 and 16 bits, ties at .5 included.
TEST(WeightKernels, ActivationCodesEqualTheScalarDefinitionOnEveryTarget) {
  constexpr int64_t kTokens = 3, kN = 512;
  std::mt19937 rng(43);
  std::vector<float> x = outlier_activations(rng, kTokens, kN);
  for (int64_t i = 0; i < 32; ++i) x[64 + i] = static_cast<float>(i) - 15.5f;  // ties
  x[300] = std::numeric_limits<float>::infinity();
  x[700] = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 1024; i < 1056; ++i) x[i] = 0.0f;  // an all-zero block
  const auto expect_codes = [&](const auto& q, float max, int64_t block) {
    for (int64_t b = 0; b < kTokens * kN / block; ++b) {
      float amax = 0;
      bool finite = true;
      for (int64_t j = 0; j < block; ++j) {
        amax = std::max(amax, std::abs(x[b * block + j]));
        finite = finite && std::isfinite(x[b * block + j]);
      }
      const float scale = finite ? amax / max : std::numeric_limits<float>::quiet_NaN();
      if (finite)
        ASSERT_EQ(q.scales[b], scale) << "block " << b;
      else
        ASSERT_TRUE(std::isnan(q.scales[b])) << "block " << b;
      const float inverse = scale > 0 ? 1.0f / scale : 0.0f;
      for (int64_t j = 0; j < block; ++j) {
        const float code = std::nearbyint(x[b * block + j] * inverse);
        ASSERT_EQ(int{q.codes[b * block + j]},
                  static_cast<int>(std::isfinite(code) ? std::clamp(code, -max, max) : 0.0f))
            << "value " << b * block + j;
      }
    }
  };
  for (const std::string& target : available_targets()) {
    SCOPED_TRACE(target);
    const TargetGuard guard(target);
    Int8Activations q8;
    quantize_activations(x.data(), kTokens, kN, q8);
    expect_codes(q8, 127.0f, 32);
    for (const int64_t block : {32, 256}) {
      Int16Activations q16;
      quantize_activations(x.data(), kTokens, kN, q16, block);
      expect_codes(q16, 32767.0f, block);
    }
  }
}

// Packed products of 3 tiles (37 rows) for 40 tokens against `reference` (token t, row r at
// t * rows + r), bit for bit: tile ranges from the first, second and third tile, decode (up to 4
// tokens) and prefill token ranges from several first tokens, into a poisoned buffer of which
// nothing outside the outputs may change.
void expect_packed_products(const amx::PackedRows& packed, const Int16Activations& xq,
                            const std::vector<float>& reference) {
  const int64_t rows = packed.rows, stride = rows + 3;
  ASSERT_EQ(rows, 37);
  ASSERT_GE(xq.tokens, 20);
  for (const auto& [first_tile, tiles] : {std::pair<int64_t, int64_t>{0, 3}, {1, 2}, {2, 1}})
    for (const auto& [first, tokens] : {std::pair<int64_t, int64_t>{0, xq.tokens},
                                        {3, 17},
                                        {5, 4},
                                        {2, 3},
                                        {7, 2},
                                        {xq.tokens - 1, 1}}) {
      SCOPED_TRACE(std::to_string(tokens) + " tokens from " + std::to_string(first) +
                   ", tiles from " + std::to_string(first_tile));
      std::vector<float> y((tokens + 2) * stride, std::numeric_limits<float>::quiet_NaN());
      amx::packed_products(packed, first_tile, tiles, xq, first, tokens, y.data() + stride, stride);
      const int64_t r0 = 16 * first_tile, count = std::min(rows, 16 * (first_tile + tiles)) - r0;
      for (size_t i = 0; i < y.size(); ++i) {
        const int64_t t = static_cast<int64_t>(i) / stride - 1,
                      r = static_cast<int64_t>(i) % stride;
        if (t < 0 || t >= tokens || r >= count) {
          ASSERT_TRUE(std::isnan(y[i])) << "wrote outside the outputs at " << i;
          continue;
        }
        ASSERT_EQ(y[i], reference[(first + t) * rows + r0 + r]) << "token " << t << " row " << r;
      }
    }
}

// The packed rows of the blocks-of-32 types (amx_products.h) against their definition, computed
// here from the GGUF block layout (each code checked against dequantize()): exact integer block
// sums, then per block fma(float(I), d * s, acc) and fma(m, X * s, acc), in float32 and block
// order. Decode (vectors, up to 4 tokens) and prefill (tiles) must both give these bits, for a
// partial last tile, tile ranges that start past the first, partial token tiles and the largest
// magnitudes, and write nothing outside their outputs.
TEST(WeightKernels, PackedRowsMatchTheirDefinition) {
  if (!amx::available()) GTEST_SKIP() << "no AMX-INT8 on this CPU";
  constexpr int64_t kRows = 37, kColumns = 288, kTokens = 40;
  for (const DType type : {DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0})
    for (const bool extreme : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(type)) + (extreme ? " extreme" : " random"));
      std::mt19937 rng(41);
      std::vector<std::byte> weights = random_rows(type, kRows, kColumns, rng);
      const DTypeInfo& info = dtype_info(type);
      const int64_t row_bytes = storage_bytes(type, kColumns), blocks = kColumns / 32;
      std::vector<float> x = outlier_activations(rng, kTokens, kColumns);
      if (extreme) {
        // Every code at its largest magnitude (Q8_0 -128, the others their top code, fifth bits
        // set), every activation code +-32767.
        for (int64_t b = 0; b < kRows * blocks; ++b) {
          std::byte* block = weights.data() + b * info.block_bytes;
          const int64_t head = type == DType::Q4_1 || type == DType::Q5_1 ? 4 : 2;
          std::memset(block + head, type == DType::Q8_0 ? 0x80 : 0xFF, info.block_bytes - head);
        }
        for (size_t i = 0; i < x.size(); ++i) x[i] = (i * 7919) % 3 == 0 ? -1.0f : 1.0f;
      }
      const TargetGuard guard("amx");
      Int16Activations xq;
      quantize_activations(x.data(), kTokens, kColumns, xq, 32);
      ASSERT_TRUE(xq.has_tile_bytes());
      const amx::PackedRows packed =
          amx::pack_rows(type, weights.data(), row_bytes, kRows, kColumns);
      // The codes c (w = d c + m) of row r's block b, from the GGUF layout.
      const auto codes = [&](int64_t r, int64_t b, float& d, float& m) {
        const auto* p =
            reinterpret_cast<const uint8_t*>(weights.data() + r * row_bytes + b * info.block_bytes);
        uint16_t bits[2];
        std::memcpy(bits, p, 4);
        d = fp16_to_float(bits[0]);
        m = 0;
        std::vector<int> c(32);
        if (type == DType::Q8_0) {
          for (int j = 0; j < 32; ++j) c[j] = static_cast<int8_t>(p[2 + j]);
        } else {
          const bool has_min = type == DType::Q4_1 || type == DType::Q5_1;
          const bool fifth = type == DType::Q5_0 || type == DType::Q5_1;
          if (has_min) m = fp16_to_float(bits[1]);
          const uint8_t* qs = p + (has_min ? 4 : 2) + (fifth ? 4 : 0);
          uint32_t qh = 0;
          if (fifth) std::memcpy(&qh, p + (has_min ? 4 : 2), 4);
          const int offset = type == DType::Q4_0 ? 8 : (type == DType::Q5_0 ? 16 : 0);
          for (int j = 0; j < 16; ++j) {
            c[j] = (qs[j] & 15) + (fifth ? 16 * static_cast<int>((qh >> j) & 1) : 0) - offset;
            c[16 + j] =
                (qs[j] >> 4) + (fifth ? 16 * static_cast<int>((qh >> (16 + j)) & 1) : 0) - offset;
          }
        }
        return c;
      };
      std::vector<float> reference(kTokens * kRows);
      for (int64_t r = 0; r < kRows; ++r) {
        std::vector<float> w(kColumns);
        dequantize(type, {weights.data() + r * row_bytes, static_cast<size_t>(row_bytes)}, w);
        for (int64_t b = 0; b < blocks; ++b) {
          float d, m;
          const std::vector<int> c = codes(r, b, d, m);
          for (int j = 0; j < 32; ++j) ASSERT_EQ(w[b * 32 + j], d * c[j] + m) << "code " << j;
        }
        for (int64_t t = 0; t < kTokens; ++t) {
          float acc = 0;
          for (int64_t b = 0; b < blocks; ++b) {
            float d, m;
            const std::vector<int> c = codes(r, b, d, m);
            int64_t sum = 0, code_sum = 0;
            for (int j = 0; j < 32; ++j) {
              const int64_t code = xq.codes[t * kColumns + b * 32 + j];
              sum += c[j] * code;
              code_sum += code;
            }
            const float s = xq.scales[t * blocks + b];
            acc = std::fma(static_cast<float>(sum), d * s, acc);
            if (type == DType::Q4_1 || type == DType::Q5_1)
              acc = std::fma(m, static_cast<float>(code_sum) * s, acc);
          }
          reference[t * kRows + r] = acc;
        }
      }
      expect_packed_products(packed, xq, reference);
    }
}

// Packed rows refused with a clear error: a type they do not take, rows that are not whole blocks,
// activations without their tile bytes, and tiles or tokens out of range.
TEST(WeightKernels, PackedRowsRefuseBadInput) {
  std::mt19937 rng(47);
  const std::vector<std::byte> q5k = random_rows(DType::Q5_K, 2, 256, rng);
  EXPECT_NE(test_support::error_of([&] {
              amx::pack_rows(DType::Q5_K, q5k.data(), storage_bytes(DType::Q5_K, 256), 2, 256);
            }).find("no packed rows for Q5_K"),
            std::string::npos);
  const std::vector<std::byte> q4k = random_rows(DType::Q4_K, 2, 512, rng);
  EXPECT_NE(test_support::error_of([&] {
              amx::pack_rows(DType::Q4_K, q4k.data(), storage_bytes(DType::Q4_K, 512), 2, 288);
            }).find("whole blocks of 256"),
            std::string::npos);
  const std::vector<std::byte> q8 = random_rows(DType::Q8_0, 3, 64, rng);
  EXPECT_NE(test_support::error_of([&] {
              amx::pack_rows(DType::Q8_0, q8.data(), storage_bytes(DType::Q8_0, 64), 3, 48);
            }).find("whole blocks of 32"),
            std::string::npos);
  if (!amx::available()) GTEST_SKIP() << "no AMX-INT8 on this CPU for the products' checks";
  const amx::PackedRows packed =
      amx::pack_rows(DType::Q8_0, q8.data(), storage_bytes(DType::Q8_0, 64), 3, 64);
  const std::vector<float> x = test_support::random_vector(rng, 2 * 64);
  std::vector<float> y(2 * 16);
  const TargetGuard guard("avx512vnni");  // no tile bytes
  Int16Activations plain;
  quantize_activations(x.data(), 2, 64, plain, 32);
  EXPECT_NE(test_support::error_of([&] {
              amx::packed_products(packed, 0, 1, plain, 0, 2, y.data(), 16);
            }).find("tile bytes"),
            std::string::npos);
  set_weight_kernel_target("amx");
  Int16Activations tiled;
  quantize_activations(x.data(), 2, 64, tiled, 32);
  EXPECT_NE(test_support::error_of([&] {
              amx::packed_products(packed, 0, 2, tiled, 0, 2, y.data(), 16);
            }).find("out of range"),
            std::string::npos);
  EXPECT_NE(test_support::error_of([&] {
              amx::packed_products(packed, 0, 1, tiled, 1, 2, y.data(), 16);
            }).find("out of range"),
            std::string::npos);
  // Q4_K rows take activations in blocks of 256.
  const amx::PackedRows super =
      amx::pack_rows(DType::Q4_K, q4k.data(), storage_bytes(DType::Q4_K, 512), 2, 512);
  const std::vector<float> x512 = test_support::random_vector(rng, 512);
  Int16Activations blocks_of_32;
  quantize_activations(x512.data(), 1, 512, blocks_of_32, 32);
  EXPECT_NE(test_support::error_of([&] {
              amx::packed_products(super, 0, 1, blocks_of_32, 0, 1, y.data(), 16);
            }).find("blocks of 256"),
            std::string::npos);
}

// Packed Q4_K and Q6_K rows (amx_products.h) against the stored rows on the same CPU, which both
// follow the exact-totals definition: the same bits in decode (vectors, up to 4 tokens) and prefill
// (tiles, blocks in slices), for a partial last tile, tile ranges that start past the first,
// partial token tiles, random weights and the largest magnitudes (Q4_K: scales, mins and codes at
// their top; Q6_K: codes 0, that is -32, and scales -128; activation codes +-32767), with poisoned
// outputs around.
TEST(WeightKernels, PackedSuperBlockRowsEqualTheStoredRows) {
  if (!amx::available()) GTEST_SKIP() << "no AMX-INT8 on this CPU";
  // 200 tokens: the tiles take the 9 blocks in two slices (as many as keep 512 KB of activation
  // bytes in L2, 5 blocks of 200 tokens).
  constexpr int64_t kRows = 37, kColumns = 2304, kTokens = 200;
  for (const DType type : {DType::Q4_K, DType::Q6_K})
    for (const bool extreme : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(type)) + (extreme ? " extreme" : " random"));
      std::mt19937 rng(53);
      std::vector<std::byte> weights = random_rows(type, kRows, kColumns, rng);
      const int64_t row_bytes = storage_bytes(type, kColumns);
      std::vector<float> x = outlier_activations(rng, kTokens, kColumns);
      if (extreme) {
        const DTypeInfo& info = dtype_info(type);
        for (int64_t b = 0; b < kRows * kColumns / info.block_elements; ++b) {
          std::byte* block = weights.data() + b * info.block_bytes;
          if (type == DType::Q6_K) {
            std::memset(block, 0, 192);          // codes 0: q - 32 = -32
            std::memset(block + 192, 0x80, 16);  // scales -128
          } else {
            std::memset(block + 4, 0xFF, info.block_bytes - 4);  // scales, mins 63; codes 15
          }
        }
        for (size_t i = 0; i < x.size(); ++i) x[i] = (i * 7919) % 3 == 0 ? -1.0f : 1.0f;
      }
      const TargetGuard guard("amx");
      Int16Activations xq;
      quantize_activations(x.data(), kTokens, kColumns, xq, 256);
      ASSERT_TRUE(xq.has_tile_bytes());
      const amx::PackedRows packed =
          amx::pack_rows(type, weights.data(), row_bytes, kRows, kColumns);
      // The stored rows, one token at a time (their decode kernel).
      std::vector<float> reference(kTokens * kRows);
      for (int64_t t = 0; t < kTokens; ++t)
        dot_rows_tokens_int16(type, weights.data(), row_bytes, kRows, kColumns, xq, t, 1,
                              reference.data() + t * kRows, kRows);
      expect_packed_products(packed, xq, reference);
    }
}

// The int16 products against float64: for every block type and target, equal to the dequantized
// row times the rounded activations up to float32 sums (their only other rounding), and to the
// exact product within what the rounding can move it (half a step of each block's scale per
// value, times |w|). Tokens in a chunk get the bits of one token alone; outputs land at their
// stride in a poisoned buffer and nowhere else.
TEST(WeightKernels, Int16ProductsMatchFloat64OfTheRoundedActivations) {
  const GgufFile file(kQuants);
  for (const char* type : kBlockTypes) {
    SCOPED_TRACE(type);
    const TensorRef& tensor = file.tensor(std::string("q.") + type);
    const int64_t n = tensor.row_size();
    constexpr int64_t kTokens = 7;
    std::mt19937 rng(17);
    const std::vector<float> x = outlier_activations(rng, kTokens, n);
    Int16Activations xq;
    quantize_activations(x.data(), kTokens, n, xq, int16_activation_block(tensor.dtype));
    for (const std::string& target : available_targets()) {
      SCOPED_TRACE(target);
      const TargetGuard guard(target);
      for (int64_t r = 0; r < tensor.rows(); ++r) {
        std::vector<float> w(static_cast<size_t>(n));
        dequantize(tensor.dtype, tensor.row(r), w);
        const std::byte* row = tensor.row(r).data();
        std::vector<float> y(kTokens * 2, std::numeric_limits<float>::quiet_NaN());
        dot_row_tokens_int16(tensor.dtype, row, n, xq, 0, kTokens, y.data(), 2);
        for (int64_t t = 0; t < kTokens; ++t) {
          double rounded = 0, exact = 0, magnitude = 0, rounding_bound = 0;
          for (int64_t i = 0; i < n; ++i) {
            const double scale = xq.scales[(t * n + i) / xq.block];
            const double xr = static_cast<double>(xq.codes[t * n + i]) * scale;
            rounded += double{w[i]} * xr;
            exact += double{w[i]} * x[t * n + i];
            magnitude += std::abs(double{w[i]} * xr);
            rounding_bound += std::abs(double{w[i]}) * 0.5 * scale;
          }
          const float got = y[t * 2];
          EXPECT_NEAR(got, rounded, 2e-6 * magnitude) << "row " << r << " token " << t;
          EXPECT_NEAR(got, exact, rounding_bound + 2e-6 * magnitude)
              << "row " << r << " token " << t;
          EXPECT_TRUE(std::isnan(y[t * 2 + 1])) << "wrote outside its stride";
          for (int64_t chunk = 1; chunk <= kTokens - t; ++chunk) {
            std::vector<float> part(static_cast<size_t>(chunk),
                                    std::numeric_limits<float>::quiet_NaN());
            dot_row_tokens_int16(tensor.dtype, row, n, xq, t, chunk, part.data(), 1);
            EXPECT_EQ(part[0], got) << "row " << r << " token " << t << " in a chunk of " << chunk;
          }
        }
      }
    }
  }
}

// AVX-512 without VNNI sums the 16-bit products with vpmaddwd, with VNNI with vpdpwssd: the same
// int32 sums, then the same float arithmetic, so the same bits.
TEST(WeightKernels, Int16ProductsAgreeWithAndWithoutVnni) {
  const std::vector<std::string> targets = available_targets();
  if (std::find(targets.begin(), targets.end(), "avx512vnni") == targets.end())
    GTEST_SKIP() << "no AVX-512 VNNI on this CPU";
  const GgufFile file(kQuants);
  for (const char* type : kBlockTypes) {
    SCOPED_TRACE(type);
    const TensorRef& tensor = file.tensor(std::string("q.") + type);
    const int64_t n = tensor.row_size(), rows = tensor.rows();
    const int64_t row_bytes = static_cast<int64_t>(tensor.row(0).size());
    std::mt19937 rng(23);
    const std::vector<float> x = outlier_activations(rng, 5, n);
    Int16Activations xq;
    quantize_activations(x.data(), 5, n, xq, int16_activation_block(tensor.dtype));
    std::vector<float> y[2];
    for (int i = 0; i < 2; ++i) {
      const TargetGuard guard(i == 0 ? "avx512" : "avx512vnni");
      y[i].assign(5 * rows, std::numeric_limits<float>::quiet_NaN());
      dot_rows_tokens_int16(tensor.dtype, tensor.row(0).data(), row_bytes, rows, n, xq, 0, 5,
                            y[i].data(), rows);
    }
    for (size_t i = 0; i < y[0].size(); ++i) {
      ASSERT_TRUE(std::isfinite(y[0][i])) << i;
      EXPECT_EQ(y[0][i], y[1][i]) << i;
    }
  }
}

// Long rows of random blocks (2304 values: many blocks per row, several K super-blocks; and 2336,
// an odd number of blocks of 32, whose last one the AVX-512 kernel pairs with nothing), 9 tokens
// over 5 rows in one call, and the 5 rows for one token at a time (decode: four rows at once, then
// one): each output has the bits of its one-row, one-token call, and is the dequantized row times
// the rounded activations up to float32 sums.
TEST(WeightKernels, Int16RowRangesEqualSingleRowsOnLongRows) {
  constexpr int64_t kRows = 5, kTokens = 9;
  for (const DType type : {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1,
                           DType::Q4_K, DType::Q5_K, DType::Q6_K})
    for (const int64_t columns : {int64_t{2304}, int64_t{2336}}) {
      if (columns % dtype_info(type).block_elements != 0) continue;
      SCOPED_TRACE(std::string(dtype_name(type)) + " x " + std::to_string(columns));
      std::mt19937 rng(29);
      const std::vector<std::byte> weights = random_rows(type, kRows, columns, rng);
      const int64_t row_bytes = storage_bytes(type, columns);
      const std::vector<float> x = outlier_activations(rng, kTokens, columns);
      Int16Activations xq;
      quantize_activations(x.data(), kTokens, columns, xq, int16_activation_block(type));
      for (const std::string& target : available_targets()) {
        SCOPED_TRACE(target);
        const TargetGuard guard(target);
        std::vector<float> all(kTokens * kRows, std::numeric_limits<float>::quiet_NaN());
        dot_rows_tokens_int16(type, weights.data(), row_bytes, kRows, columns, xq, 0, kTokens,
                              all.data(), kRows);
        std::vector<float> decoded(kTokens * kRows, std::numeric_limits<float>::quiet_NaN());
        for (int64_t t = 0; t < kTokens; ++t)
          dot_rows_tokens_int16(type, weights.data(), row_bytes, kRows, columns, xq, t, 1,
                                decoded.data() + t * kRows, kRows);
        for (int64_t r = 0; r < kRows; ++r) {
          std::vector<float> w(columns);
          dequantize(type,
                     std::span<const std::byte>(weights.data() + r * row_bytes,
                                                static_cast<size_t>(row_bytes)),
                     w);
          for (int64_t t = 0; t < kTokens; ++t) {
            float one = std::numeric_limits<float>::quiet_NaN();
            dot_row_tokens_int16(type, weights.data() + r * row_bytes, columns, xq, t, 1, &one, 1);
            ASSERT_TRUE(std::isfinite(one)) << r << " " << t;
            EXPECT_EQ(all[t * kRows + r], one) << r << " " << t;
            EXPECT_EQ(decoded[t * kRows + r], one) << r << " " << t << " decoded";
            double rounded = 0, magnitude = 0;
            for (int64_t i = 0; i < columns; ++i) {
              const double xr = static_cast<double>(xq.codes[t * columns + i]) *
                                xq.scales[(t * columns + i) / xq.block];
              rounded += double{w[i]} * xr;
              magnitude += std::abs(double{w[i]} * xr);
            }
            EXPECT_NEAR(one, rounded, 2e-6 * magnitude) << r << " " << t;
          }
        }
      }
    }
}

// A non-finite activation poisons its token's outputs for every block type (Q8_0, which has no
// offsets, included) and leaves the other tokens alone; so for the int8 products.
TEST(WeightKernels, NonFiniteActivationsPoisonTheirTokenOnly) {
  const GgufFile file(kQuants);
  for (const char* type : kBlockTypes) {
    SCOPED_TRACE(type);
    const TensorRef& tensor = file.tensor(std::string("q.") + type);
    const int64_t n = tensor.row_size();
    for (const float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      std::mt19937 rng(31);
      std::vector<float> x = test_support::random_vector(rng, static_cast<size_t>(2 * n));
      x[n + 40] = bad;  // token 1
      Int16Activations x16;
      quantize_activations(x.data(), 2, n, x16, int16_activation_block(tensor.dtype));
      Int8Activations x8;
      quantize_activations(x.data(), 2, n, x8);
      for (const std::string& target : available_targets()) {
        SCOPED_TRACE(target);
        const TargetGuard guard(target);
        float y16[2], y8[2];
        dot_row_tokens_int16(tensor.dtype, tensor.row(0).data(), n, x16, 0, 2, y16, 1);
        dot_row_tokens_int8(tensor.dtype, tensor.row(0).data(), n, x8, 0, 2, y8, 1);
        EXPECT_TRUE(std::isfinite(y16[0]));
        EXPECT_TRUE(std::isfinite(y8[0]));
        EXPECT_FALSE(std::isfinite(y16[1]));
        EXPECT_FALSE(std::isfinite(y8[1]));
      }
    }
  }
}

// linear_forward with the int16 numerics: two products of one input (one block type, one float
// type) over a chunk of 9 tokens. The block weights give each token the bits of that token alone
// and of the int16 kernel (bias added): the stored-layout row kernel, or where the tile products
// run the packed rows' (amx_products.h); the float weights give what exact numerics give (sgemm for
// a chunk of this size, so only the same call is compared).
TEST(WeightKernels, Int16LinearForwardChunksEqualSingleTokens) {
  constexpr int64_t kIn = 512, kOut = 40, kTokens = 9;
  std::mt19937 rng(37);
  const std::vector<std::byte> q4 = random_rows(DType::Q4_1, kOut, kIn, rng);
  const std::vector<std::byte> f16 = random_rows(DType::F16, kOut, kIn, rng);
  Linear block, half;
  block.weight = {"q4_1", DType::Q4_1, {kOut, kIn}, q4};
  block.bias = test_support::random_vector(rng, kOut);
  half.weight = {"f16", DType::F16, {kOut, kIn}, f16};
  const std::vector<float> x = outlier_activations(rng, kTokens, kIn);
  std::vector<float> y_block(kTokens * kOut), y_half(kTokens * kOut);
  const LinearProduct both[] = {{&block, y_block}, {&half, y_half}};
  linear_forward(both, x, kTokens, ProductRounding::QuantizedActivations16);
  std::vector<float> exact_chunk(kTokens * kOut);
  linear_forward(half, x, kTokens, exact_chunk, ProductRounding::Fastest);
  EXPECT_EQ(y_half, exact_chunk);
  Int16Activations xq;
  quantize_activations(x.data(), kTokens, kIn, xq);
  const bool packed = amx::enabled();
  const amx::PackedRows packed_rows =
      packed ? amx::pack_rows(DType::Q4_1, q4.data(), storage_bytes(DType::Q4_1, kIn), kOut, kIn)
             : amx::PackedRows{};
  for (int64_t t = 0; t < kTokens; ++t) {
    std::vector<float> one_block(kOut), one_half(kOut), exact_half(kOut);
    const std::span<const float> xt(x.data() + t * kIn, kIn);
    const LinearProduct one[] = {{&block, one_block}, {&half, one_half}};
    linear_forward(one, xt, 1, ProductRounding::QuantizedActivations16);
    linear_forward(half, xt, 1, exact_half, ProductRounding::Fastest);
    std::vector<float> kernel(kOut, std::numeric_limits<float>::quiet_NaN());
    if (packed)
      amx::packed_products(packed_rows, 0, packed_rows.tiles(), xq, t, 1, kernel.data(), kOut);
    else
      dot_rows_tokens_int16(DType::Q4_1, q4.data(), storage_bytes(DType::Q4_1, kIn), kOut, kIn, xq,
                            t, 1, kernel.data(), kOut);
    for (int64_t o = 0; o < kOut; ++o) {
      EXPECT_EQ(y_block[t * kOut + o], one_block[o]) << t << " " << o;
      EXPECT_EQ(one_half[o], exact_half[o]) << t << " " << o;
      EXPECT_EQ(one_block[o], kernel[o] + block.bias[o]) << t << " " << o;
    }
  }
}

// The numerics names: int16 is the 16-bit mode, and an unknown name lists the three.
TEST(WeightKernels, NumericsNames) {
  EXPECT_EQ(numerics_rounding("exact"), ProductRounding::Fastest);
  EXPECT_EQ(numerics_rounding("int8"), ProductRounding::QuantizedActivations);
  EXPECT_EQ(numerics_rounding("int16"), ProductRounding::QuantizedActivations16);
  EXPECT_EQ(test_support::error_of([] { numerics_rounding("int4"); }),
            "unknown numerics 'int4' (exact, int8 or int16)");
}

}  // namespace
}  // namespace visikv

// The weight kernels (model/weight_kernels.h) for every stored type and every instruction set this
// CPU can run: dot products against a float64 reference over the `gguf` package's dequantized
// values, and a chunk of tokens equal bit for bit to one token at a time.
#include <gtest/gtest.h>

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
#include "visikv/model/matmul.h"
#include "visikv/model/weight_kernels.h"

namespace visikv {
namespace {

const std::filesystem::path kQuants =
    std::filesystem::path(VISIKV_FIXTURES) / "formats" / "quants.gguf";

// The instruction sets to test: each one this CPU supports, from the portable path up.
std::vector<std::string> available_targets() {
  std::vector<std::string> names;
  for (const char* name : {"generic", "avx2", "avx512", "avx512vnni"}) {
    try {
      set_weight_kernel_target(name);
      names.push_back(name);
    } catch (const Error&) {
    }
  }
  set_weight_kernel_target("native");
  return names;
}

struct TargetGuard {
  explicit TargetGuard(const std::string& name) { set_weight_kernel_target(name); }
  ~TargetGuard() { set_weight_kernel_target("native"); }
};

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
    }
  }
  EXPECT_EQ(test_support::error_of([] { set_weight_kernel_target("sse9"); }),
            "unknown SIMD target 'sse9' (expected native, avx512vnni, avx512, avx2 or generic)");
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

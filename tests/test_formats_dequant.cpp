// Dequantization of every supported type against the `gguf` Python package's numpy dequantizers
// (fixtures written by scripts/make_format_fixtures.py).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/formats/dequantize.h"
#include "visikv/formats/gguf.h"

namespace visikv {
namespace {

const std::filesystem::path kFixtures = std::filesystem::path(VISIKV_FIXTURES) / "formats";

std::vector<float> read_f32_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "missing fixture " << path << "; run scripts/make_format_fixtures.py";
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<float> values(bytes.size() / sizeof(float));
  std::memcpy(values.data(), bytes.data(), values.size() * sizeof(float));
  return values;
}

// Distance in units in the last place between two finite floats of the same sign convention.
int64_t ulp_distance(float a, float b) {
  auto ordered = [](float x) {
    const int32_t bits = std::bit_cast<int32_t>(x);
    return bits < 0 ? int64_t{INT32_MIN} - bits : int64_t{bits};
  };
  return std::llabs(ordered(a) - ordered(b));
}

void expect_matches_reference(const GgufFile& file, const std::string& tensor_name,
                              const std::string& type_name) {
  SCOPED_TRACE(tensor_name);
  const TensorRef& tensor = file.tensor(tensor_name);
  EXPECT_EQ(dtype_name(tensor.dtype), type_name);
  const std::vector<float> expected = read_f32_file(kFixtures / (type_name + ".f32"));
  const std::vector<float> actual = to_float(tensor);
  ASSERT_EQ(actual.size(), expected.size());
  int64_t worst = 0;
  size_t worst_index = 0;
  size_t inexact = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_TRUE(std::isfinite(actual[i])) << "element " << i;
    const int64_t distance = ulp_distance(actual[i], expected[i]);
    if (distance > 0) ++inexact;
    if (distance > worst) worst = distance, worst_index = i;
  }
  EXPECT_LE(worst, 1) << "element " << worst_index << ": got " << actual[worst_index]
                      << ", the gguf package gives " << expected[worst_index];
  // Same operation order as ggml: agreement should be exact, not merely close.
  EXPECT_EQ(inexact, 0u) << inexact << " of " << actual.size() << " elements differ by 1 ulp";
}

class DequantizeReference : public ::testing::TestWithParam<const char*> {};

TEST_P(DequantizeReference, MatchesGgufPackage) {
  const GgufFile file(kFixtures / "quants.gguf");
  const std::string type = GetParam();
  const bool quantized = type.starts_with("Q");
  expect_matches_reference(file, (quantized ? "q." : "f.") + type, type);
}

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantizeReference,
                         ::testing::Values("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K",
                                           "Q6_K", "F16", "BF16", "F32"),
                         [](const auto& info) { return std::string(info.param); });

TEST(Dequantize, RowByRowEqualsWholeTensor) {
  const GgufFile file(kFixtures / "quants.gguf");
  for (const TensorRef& tensor : file.tensors()) {
    SCOPED_TRACE(tensor.describe());
    const std::vector<float> whole = to_float(tensor);
    std::vector<float> row(static_cast<size_t>(tensor.row_size()));
    for (int64_t r = 0; r < tensor.rows(); ++r) {
      dequantize(tensor.dtype, tensor.row(r), row);
      for (size_t i = 0; i < row.size(); ++i) {
        ASSERT_EQ(std::bit_cast<uint32_t>(row[i]),
                  std::bit_cast<uint32_t>(whole[static_cast<size_t>(r) * row.size() + i]));
      }
    }
  }
}

TEST(Dequantize, HandBuiltQ4_0Block) {
  // d = 0.5; byte j holds nibbles (j, 15 - j): element j = (j - 8) / 2, element j + 16 = (7 - j)
  // / 2.
  std::vector<std::byte> block(18);
  const uint16_t half = float_to_fp16(0.5f);
  std::memcpy(block.data(), &half, 2);
  for (int j = 0; j < 16; ++j) block[2 + j] = static_cast<std::byte>(j | ((15 - j) << 4));
  std::vector<float> out(32);
  dequantize(DType::Q4_0, block, out);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], (j - 8) * 0.5f);
    EXPECT_EQ(out[j + 16], (7 - j) * 0.5f);
  }
}

TEST(Dequantize, HandBuiltQ8_0Block) {
  std::vector<std::byte> block(34);
  const uint16_t half = float_to_fp16(-0.25f);
  std::memcpy(block.data(), &half, 2);
  for (int j = 0; j < 32; ++j)
    block[2 + j] = static_cast<std::byte>(static_cast<int8_t>(j * 8 - 128));
  std::vector<float> out(32);
  dequantize(DType::Q8_0, block, out);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], static_cast<float>(j * 8 - 128) * -0.25f);
}

TEST(Dequantize, RejectsWrongSizes) {
  std::vector<std::byte> bytes(40);
  std::vector<float> out(32);
  EXPECT_THROW(dequantize(DType::Q4_0, bytes, out), Error);  // 18 bytes expected
  std::vector<float> partial(31);
  EXPECT_THROW(dequantize(DType::Q8_0, std::span(bytes).first(34), partial), Error);
  std::vector<float> floats(9);
  EXPECT_THROW(dequantize(DType::F32, bytes, floats), Error);
  try {
    dequantize(DType::Q4_K, bytes, out);
    FAIL() << "expected visikv::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Q4_K"), std::string::npos) << e.what();
  }
}

TEST(Dequantize, EmptyInputIsFine) {
  std::vector<float> out;
  EXPECT_NO_THROW(dequantize(DType::Q6_K, {}, out));
  EXPECT_NO_THROW(dequantize(DType::F32, {}, out));
}

}  // namespace
}  // namespace visikv

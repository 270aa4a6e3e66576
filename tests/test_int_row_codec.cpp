// The integer row codec (kv/int_row_codec.h) against a scalar float64 reference written from
// the format's definition: every bit width, group sizes from one channel to the whole row,
// odd lengths and tails, streams that start inside a byte, and the vector decode on every SIMD
// target checked to the bit against one-code-at-a-time reads (the scores and weighted sums of
// packed rows: test_row_kernels.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/half.h"
#include "visikv/kv/int_row_codec.h"

namespace visikv {
namespace {

using test_support::random_vector;

constexpr int kAllBits[] = {2, 3, 4, 8};

// Code `index` of a little-endian bit stream, one bit at a time.
uint32_t reference_code(const std::vector<uint8_t>& stream, int bits, int64_t index) {
  uint32_t code = 0;
  for (int b = 0; b < bits; ++b) {
    const int64_t bit = index * bits + b;
    code |= uint32_t{(stream[bit / 8] >> (bit % 8)) & 1u} << b;
  }
  return code;
}

// code · scale + zero in float64: exact (a code has at most 8 bits and fp16 numbers 11, so the
// product and sum fit in 53 bits), then rounded once to float, which is what fma gives.
float reference_value(uint32_t code, uint16_t scale, uint16_t zero) {
  return static_cast<float>(static_cast<double>(code) * fp16_to_float(scale) + fp16_to_float(zero));
}

// A quantized row with its parameters as (scales..., zeros...) runs.
struct EncodedRow {
  std::vector<uint8_t> codes;
  std::vector<uint16_t> params;
  int_rows::Row row(int64_t groups) const {
    return {codes.data(), params.data(), params.data() + groups};
  }
};

EncodedRow encode(std::span<const float> values, int bits, const int_rows::RowShape& shape) {
  EncodedRow out;
  out.codes.assign(static_cast<size_t>(int_rows::packed_bytes(shape.dim, bits)), 0);
  out.params.assign(static_cast<size_t>(2 * shape.groups()), 0);
  std::vector<uint8_t> scratch(static_cast<size_t>(shape.dim));
  int_rows::encode_row(values, bits, shape, out.codes.data(), out.params.data(),
                       out.params.data() + shape.groups(), 1, scratch);
  return out;
}

// x̂ of an encoded row, from reference_code and reference_value.
std::vector<float> reference_row(const EncodedRow& encoded, int bits,
                                 const int_rows::RowShape& shape) {
  std::vector<float> out(static_cast<size_t>(shape.dim));
  for (int64_t c = 0; c < shape.dim; ++c) {
    const int64_t g = c / shape.group;
    out[c] = reference_value(reference_code(encoded.codes, bits, c), encoded.params[g],
                             encoded.params[shape.groups() + g]);
  }
  return out;
}

TEST(IntRowCodec, PackAndCodeAtRoundTripAtAnyOffsetAndLength) {
  std::mt19937 rng(1);
  for (int bits : kAllBits) {
    for (int64_t first : {0, 1, 3, 5, 8, 13}) {
      for (int64_t n : {1, 7, 8, 9, 17, 64, 67}) {
        std::vector<uint8_t> codes(static_cast<size_t>(n));
        for (uint8_t& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
        // Surrounding bits are random and must survive.
        std::vector<uint8_t> stream(
            static_cast<size_t>(int_rows::packed_bytes(first + n + 9, bits)));
        for (uint8_t& b : stream) b = static_cast<uint8_t>(rng());
        const std::vector<uint8_t> before = stream;
        int_rows::pack(codes, bits, stream, first);
        for (int64_t i = 0; i < first + n + 9; ++i) {
          const uint32_t expected =
              i >= first && i < first + n ? codes[i - first] : reference_code(before, bits, i);
          ASSERT_EQ(reference_code(stream, bits, i), expected)
              << bits << " bits, first " << first << ", n " << n << ", code " << i;
          ASSERT_EQ(int_rows::code_at(stream, bits, i), expected);
        }
      }
    }
  }
  // Tight: n codes take ceil(n·b / 8) bytes, 8 codes exactly b bytes.
  EXPECT_EQ(int_rows::packed_bytes(8, 3), 3);
  EXPECT_EQ(int_rows::packed_bytes(13, 3), 5);
  EXPECT_EQ(int_rows::packed_bytes(64, 2), 16);
}

TEST(IntRowCodec, QuantizedGroupsCoverTheirRangeWithinHalfAStep) {
  std::mt19937 rng(2);
  for (int bits : kAllBits) {
    for (int64_t n : {1, 3, 8, 31, 64}) {
      const std::vector<float> values = random_vector(rng, static_cast<size_t>(n), 3.0f);
      std::vector<uint8_t> codes(static_cast<size_t>(n));
      const int_rows::Affine affine = int_rows::quantize_group(values, bits, codes);
      const double scale = fp16_to_float(affine.scale), zero = fp16_to_float(affine.zero);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_LT(codes[i], 1u << bits);
        const double reconstructed = codes[i] * scale + zero;
        EXPECT_LE(std::abs(reconstructed - values[i]), scale / 2 * (1 + 1e-6) + 1e-7)
            << bits << " bits, n " << n << ", element " << i;
      }
    }
  }
  // A constant fp16 group is exact.
  const std::vector<float> constant(5, 1.5f);
  std::vector<uint8_t> codes(5);
  const int_rows::Affine affine = int_rows::quantize_group(constant, 3, codes);
  EXPECT_EQ(fp16_to_float(affine.scale), 0.0f);
  EXPECT_EQ(fp16_to_float(affine.zero), 1.5f);
}

// Rows of every width and group layout decode, in the scalar and the vector kernels, to the
// float64 reference's numbers exactly.
TEST(IntRowCodec, DecodeMatchesTheFloat64ReferenceBitForBit) {
  std::mt19937 rng(3);
  for (int bits : kAllBits) {
    // Odd lengths (scalar decode) and multiples of 8 (vector kernels), groups from one channel
    // (per-channel parameters) through narrow and straddling groups to the whole row.
    for (int64_t dim : {5, 13, 8, 24, 40, 64, 72}) {
      for (int64_t group : std::initializer_list<int64_t>{1, 3, 5, 8, 16, 32, 64, 72, dim}) {
        if (group > dim || dim % group != 0) continue;
        const int_rows::RowShape shape{dim, group};
        const std::vector<float> values = random_vector(rng, static_cast<size_t>(dim), 2.0f);
        const EncodedRow encoded = encode(values, bits, shape);
        const std::vector<float> expected = reference_row(encoded, bits, shape);
        std::vector<float> got(static_cast<size_t>(dim));
        int_rows::decode_row_scalar(encoded.row(shape.groups()), bits, shape, got.data());
        EXPECT_EQ(got, expected) << bits << " bits, dim " << dim << ", group " << group;
        for (const std::string& target : test_support::available_targets()) {
          const test_support::TargetGuard guard(target);
          std::fill(got.begin(), got.end(), NAN);
          int_rows::decode_row(encoded.row(shape.groups()), bits, shape, got.data());
          EXPECT_EQ(got, expected)
              << target << ": " << bits << " bits, dim " << dim << ", group " << group;
        }
      }
    }
  }
}

// Parameters as (scale, zero) pairs (the GPU layout's order) read the same numbers.
TEST(IntRowCodec, InterleavedParametersReadTheSameNumbers) {
  std::mt19937 rng(4);
  const int_rows::RowShape shape{32, 8};
  const std::vector<float> values = random_vector(rng, 32);
  std::vector<uint8_t> codes(int_rows::packed_bytes(32, 4)), scratch(32);
  std::vector<uint16_t> pairs(2 * shape.groups());
  int_rows::encode_row(values, 4, shape, codes.data(), pairs.data(), pairs.data() + 1, 2, scratch);
  const EncodedRow runs = encode(values, 4, shape);
  EXPECT_EQ(codes, runs.codes);
  std::vector<float> a(32), b(32);
  int_rows::decode_row({codes.data(), pairs.data(), pairs.data() + 1, 2}, 4, shape, a.data());
  int_rows::decode_row(runs.row(shape.groups()), 4, shape, b.data());
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace visikv

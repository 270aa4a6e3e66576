// The row kernels (kv/row_kernels.h) on every SIMD target this CPU runs, for dense float32 /
// half / bfloat16 rows and integer rows of every width and parameter layout, rows picked by a
// scattered position list: scores within float32 rounding of the float64 dot products of the
// stored numbers, a row's score independent of the block and lane it falls in, weighted sums
// equal to the bits of one vec::axpy per row and query and within rounding of float64, and
// outputs outside the asked-for entries left as they were (poisoned beforehand).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/half.h"
#include "visikv/core/vec.h"
#include "visikv/kv/int_row_codec.h"
#include "visikv/kv/row_kernels.h"

namespace visikv {
namespace {

using test_support::available_targets;
using test_support::random_vector;
using test_support::TargetGuard;

// A table of `count` stored rows, what the kernels read and the float numbers they stand for.
struct StoredRows {
  int64_t dim = 0;
  std::vector<float> f32;
  std::vector<uint16_t> halfs;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> params;
  std::vector<std::vector<float>> numbers;  // x̂ of each row, exactly
  row_kernels::DenseRows dense;
  row_kernels::IntRows ints;
  bool is_int = false;
};

StoredRows dense_rows(std::mt19937& rng, DenseFormat format, int64_t dim, int64_t count) {
  StoredRows s;
  s.dim = dim;
  for (int64_t p = 0; p < count; ++p) {
    std::vector<float> x = random_vector(rng, static_cast<size_t>(dim), 1.5f);
    for (float& v : x) {
      if (format == DenseFormat::F16) {
        s.halfs.push_back(float_to_fp16(v));
        v = fp16_to_float(s.halfs.back());
      } else if (format == DenseFormat::BF16) {
        s.halfs.push_back(float_to_bf16(v));
        v = bf16_to_float(s.halfs.back());
      } else {
        s.f32.push_back(v);
      }
    }
    s.numbers.push_back(x);
  }
  s.dense = {format,
             format == DenseFormat::F32 ? static_cast<const void*>(s.f32.data())
                                        : static_cast<const void*>(s.halfs.data()),
             dim};
  return s;
}

// Integer rows in per-token groups of `group` channels, or per-channel parameters (group 1)
// shared by token groups of `token_group` rows, laid out as the integer store keeps them.
StoredRows int_rows_of(std::mt19937& rng, int bits, int64_t dim, int64_t group, int64_t token_group,
                       int64_t count) {
  StoredRows s;
  s.dim = dim;
  s.is_int = true;
  const int_rows::RowShape shape{dim, group};
  const int64_t row_bytes = int_rows::packed_bytes(dim, bits);
  const int64_t groups = shape.groups();
  s.codes.assign(static_cast<size_t>(count * row_bytes), 0);
  s.params.assign(static_cast<size_t>((count / token_group + 1) * 2 * groups), 0);
  std::vector<uint8_t> scratch(static_cast<size_t>(dim));
  for (int64_t p = 0; p < count; ++p) {
    const std::vector<float> x = random_vector(rng, static_cast<size_t>(dim), 1.5f);
    uint16_t* scales = s.params.data() + p / token_group * 2 * groups;
    if (p % token_group == 0)
      int_rows::encode_row(x, bits, shape, s.codes.data() + p * row_bytes, scales, scales + groups,
                           1, scratch);
    else  // later rows of a token group reuse its parameters: codes on its grid
      for (int64_t c = 0; c < dim; ++c) {
        const int64_t g = c / group;
        scratch[c] = int_rows::affine_code(x[c], fp16_to_float(scales[g]),
                                           fp16_to_float(scales[groups + g]), (1 << bits) - 1);
      }
    if (p % token_group != 0)
      int_rows::pack(scratch, bits,
                     {s.codes.data() + p * row_bytes, static_cast<size_t>(row_bytes)});
  }
  s.ints.bits = bits;
  s.ints.shape = shape;
  s.ints.codes = s.codes.data();
  s.ints.row_bytes = row_bytes;
  s.ints.params = s.params.data();
  s.ints.token_group = token_group;
  s.ints.params_per_token_group = 2 * groups;
  s.ints.zero_offset = groups;
  for (int64_t p = 0; p < count; ++p) {
    std::vector<float> x(static_cast<size_t>(dim));
    int_rows::decode_row_scalar(s.ints.row(p), bits, shape, x.data());
    s.numbers.push_back(x);
  }
  return s;
}

void dot(const StoredRows& s, const PositionSet& positions, int64_t rows, const float* queries,
         int64_t count, float* scores, int64_t stride) {
  if (s.is_int)
    row_kernels::dot(s.ints, positions, rows, queries, count, scores, stride);
  else
    row_kernels::dot(s.dense, positions, rows, queries, count, scores, stride);
}

void accumulate(const StoredRows& s, const PositionSet& positions, int64_t rows,
                const float* weights, int64_t stride, int64_t count, float* out) {
  if (s.is_int)
    row_kernels::accumulate(s.ints, positions, rows, weights, stride, count, out);
  else
    row_kernels::accumulate(s.dense, positions, rows, weights, stride, count, out);
}

// Every property of the file comment, for queries of 1 to 17 heads (more than four take the tiles
// of prefill) over `rows` scattered positions of `s`.
void check_kernels(std::mt19937& rng, const StoredRows& s, const std::string& what) {
  const int64_t dim = s.dim, stored = static_cast<int64_t>(s.numbers.size());
  std::vector<int32_t> list;
  for (int64_t p = 0; p < stored; p += 1 + static_cast<int64_t>(rng() % 3))
    list.push_back(static_cast<int32_t>(p));
  const PositionSet positions = PositionSet::list(list);
  const int64_t n = positions.size();
  for (int64_t count : {1, 3, 6, 9, 17}) {
    SCOPED_TRACE(what + ", " + std::to_string(count) + " queries");
    const std::vector<float> queries = random_vector(rng, static_cast<size_t>(count * dim));
    const int64_t stride = n + 5;
    std::vector<float> scores(static_cast<size_t>(count * stride), NAN);
    dot(s, positions, n, queries.data(), count, scores.data(), stride);
    for (int64_t q = 0; q < count; ++q) {
      for (int64_t i = 0; i < n; ++i) {
        const std::vector<float>& x = s.numbers[positions[i]];
        double exact = 0, magnitude = 0;
        for (int64_t c = 0; c < dim; ++c) {
          exact += double{queries[q * dim + c]} * x[c];
          magnitude += std::abs(double{queries[q * dim + c]} * x[c]);
        }
        ASSERT_NEAR(scores[q * stride + i], exact, 1e-6 * magnitude + 1e-30) << "row " << i;
      }
      for (int64_t i = n; i < stride; ++i) ASSERT_TRUE(std::isnan(scores[q * stride + i]));
    }
    // A row alone, or as the last of a short block, scores the same bits.
    for (int64_t i = 0; i < n; i += 5) {
      const int32_t one = list[i];
      std::vector<float> alone(static_cast<size_t>(count));
      dot(s, PositionSet::list({&one, 1}), 1, queries.data(), count, alone.data(), 1);
      for (int64_t q = 0; q < count; ++q) ASSERT_EQ(alone[q], scores[q * stride + i]) << i;
      std::vector<float> prefix(static_cast<size_t>(count * (i + 1)));
      dot(s, positions, i + 1, queries.data(), count, prefix.data(), i + 1);
      for (int64_t q = 0; q < count; ++q)
        ASSERT_EQ(prefix[q * (i + 1) + i], scores[q * stride + i]);
    }
    // Each query alone (the in-place path of decode) scores the same bits as in a block or a
    // tile of many (prefill).
    for (int64_t q = 0; q < count; ++q) {
      std::vector<float> alone(static_cast<size_t>(n));
      dot(s, positions, n, queries.data() + q * dim, 1, alone.data(), n);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(alone[i], scores[q * stride + i]) << q << " " << i;
    }

    // Weighted sums: the bits of one axpy per row and query, close to float64.
    std::vector<float> weights(static_cast<size_t>(count * n));
    for (float& w : weights) w = std::uniform_real_distribution<float>(0, 1)(rng);
    const std::vector<float> start = random_vector(rng, static_cast<size_t>(count * dim));
    std::vector<float> held = start;
    accumulate(s, positions, n, weights.data(), n, count, held.data());
    std::vector<float> by_axpy = start;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t q = 0; q < count; ++q)
        vec::axpy(weights[q * n + i], s.numbers[positions[i]].data(), by_axpy.data() + q * dim,
                  dim);
    ASSERT_EQ(held, by_axpy);
    for (int64_t q = 0; q < count; ++q) {
      std::vector<float> alone(start.begin() + q * dim, start.begin() + (q + 1) * dim);
      accumulate(s, positions, n, weights.data() + q * n, n, 1, alone.data());
      ASSERT_TRUE(std::equal(alone.begin(), alone.end(), held.begin() + q * dim)) << q;
    }
    for (int64_t q = 0; q < count; ++q)
      for (int64_t c = 0; c < dim; ++c) {
        double exact = start[q * dim + c], magnitude = std::abs(exact);
        for (int64_t i = 0; i < n; ++i) {
          const double term = double{weights[q * n + i]} * s.numbers[positions[i]][c];
          exact += term;
          magnitude += std::abs(term);
        }
        ASSERT_NEAR(held[q * dim + c], exact, 1e-6 * magnitude) << "channel " << c;
      }
  }
}

TEST(RowKernels, DenseRowsOnEveryTarget) {
  std::mt19937 rng(std::random_device{}());
  for (const std::string& target : available_targets()) {
    const TargetGuard guard(target);
    for (DenseFormat format : {DenseFormat::F32, DenseFormat::F16, DenseFormat::BF16})
      for (int64_t dim : {8, 24, 64, 80, 128, 13}) {
        const StoredRows s = dense_rows(rng, format, dim, 41);
        check_kernels(rng, s,
                      target + " " + dense_format_name(format) + " dim " + std::to_string(dim));
      }
  }
}

TEST(RowKernels, IntegerRowsOnEveryTarget) {
  std::mt19937 rng(std::random_device{}());
  for (const std::string& target : available_targets()) {
    const TargetGuard guard(target);
    for (int bits : {2, 3, 4, 8})
      for (int64_t dim : {8, 24, 40, 64, 128})
        for (int64_t group : {1, 4, 8, 16, 24, 32, 64}) {
          if (group > dim || dim % group != 0) continue;
          const int64_t token_group = group == 1 ? 4 : 1;
          const StoredRows s = int_rows_of(rng, bits, dim, group, token_group, 41);
          check_kernels(rng, s,
                        target + " int" + std::to_string(bits) + " dim " + std::to_string(dim) +
                            " group " + std::to_string(group));
        }
  }
}

}  // namespace
}  // namespace visikv

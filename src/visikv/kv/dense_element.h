// How one element of a dense f32 / f16 / bf16 row is stored, read, dotted and accumulated: the
// element traits of the one dense store (kv/vector_store.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "visikv/core/half.h"
#include "visikv/core/vec.h"
#include "visikv/kv/dense_format.h"

namespace visikv {

template <DenseFormat kFormat>
struct DenseElement {
  using Type = std::conditional_t<kFormat == DenseFormat::F32, float, uint16_t>;
  static constexpr bool kBf16 = kFormat == DenseFormat::BF16;

  static Type store(float x) {
    if constexpr (kFormat == DenseFormat::F32)
      return x;
    else if constexpr (kBf16)
      return float_to_bf16(x);
    else
      return float_to_fp16(x);
  }
  static float load(Type x) {
    if constexpr (kFormat == DenseFormat::F32)
      return x;
    else if constexpr (kBf16)
      return bf16_to_float(x);
    else
      return fp16_to_float(x);
  }
  static float dot(const Type* row, const float* x, int64_t n) {
    if constexpr (kFormat == DenseFormat::F32)
      return vec::dot(row, x, n);
    else
      return vec::dot(row, kBf16, x, n);
  }
  // scores[q * stride + i] = dot(row(i), queries + q * n) (vec::dot_rows), n a multiple of 8.
  template <typename RowAt>
  static void dot_rows(const float* queries, int64_t count, int64_t rows, const RowAt& row,
                       float* scores, int64_t stride, int64_t n) {
    if constexpr (kFormat == DenseFormat::F32)
      vec::dot_rows(
          queries, count, rows, row, [](const float* p) { return vec::load8(p); }, scores, stride,
          n);
    else
      vec::dot_rows(
          queries, count, rows, row, [](const uint16_t* p) { return vec::load8(p, kBf16); }, scores,
          stride, n);
  }
  // out[q * n + c] += Σ_i weights[q * stride + i] * row(i)[c] (vec::accumulate_rows: the bits of
  // one axpy per row and query).
  template <typename RowAt>
  static void accumulate(const float* weights, int64_t stride, int64_t rows, int64_t queries,
                         const RowAt& row, float* out, int64_t n) {
    if constexpr (kFormat == DenseFormat::F32)
      vec::accumulate_rows(
          weights, stride, rows, queries, row, [](const float* p) { return vec::load8(p); },
          [](const float* p) { return *p; }, out, n);
    else
      vec::accumulate_rows(
          weights, stride, rows, queries, row,
          [](const uint16_t* p) { return vec::load8(p, kBf16); },
          [](const uint16_t* p) { return load(*p); }, out, n);
  }
  static void axpy(float a, const Type* row, float* y, int64_t n) {
    if constexpr (kFormat == DenseFormat::F32)
      vec::axpy(a, row, y, n);
    else
      vec::axpy(a, row, kBf16, y, n);
  }
};

}  // namespace visikv

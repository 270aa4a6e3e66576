// Small AVX2 vector primitives shared by the weight products and the KV caches: dot products
// and scaled accumulation against float32, half and bfloat16 rows.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "visikv/core/half.h"

namespace visikv::vec {

inline float horizontal_sum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane i of the result is horizontal_sum(v[i]) (up to the order of additions), for eight
// vectors at once: one transposed reduction instead of eight horizontal sums. The order of
// additions in a lane depends only on that lane's vector.
inline __m256 transposed_sums(const __m256 v[8]) {
  const __m256 pairs01 = _mm256_hadd_ps(v[0], v[1]), pairs23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 pairs45 = _mm256_hadd_ps(v[4], v[5]), pairs67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 quads0123 = _mm256_hadd_ps(pairs01, pairs23);  // {0,1,2,3} low, {0,1,2,3} high
  const __m256 quads4567 = _mm256_hadd_ps(pairs45, pairs67);
  return _mm256_add_ps(_mm256_permute2f128_ps(quads0123, quads4567, 0x20),
                       _mm256_permute2f128_ps(quads0123, quads4567, 0x31));
}

// Eight stored elements widened to float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p, bool bf16) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (!bf16) return _mm256_cvtph_ps(raw);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float dot(const float* w, const float* x, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
  float sum = horizontal_sum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) sum += w[i] * x[i];
  return sum;
}

// dot of a half (bf16 = false) or bfloat16 (bf16 = true) row with float32.
inline float dot(const uint16_t* w, bool bf16, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8(w + i, bf16), _mm256_loadu_ps(x + i), acc);
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) sum += (bf16 ? bf16_to_float(w[i]) : fp16_to_float(w[i])) * x[i];
  return sum;
}

// y += a * x
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void axpy(float a, const uint16_t* x, bool bf16, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i, bf16), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * (bf16 ? bf16_to_float(x[i]) : fp16_to_float(x[i]));
}

// scores[q * stride + i] = dot(row(i), x + q * n) for i < rows and q < queries, n a multiple of 8.
// Rows go eight at a time: each row's sum is one chain of fused multiply-adds over its chunks of
// eight values, reduced by transposed_sums, whose order per lane depends only on that lane's
// vector, so a row's score is the same whatever block or position it is in (a block short of
// eight rows repeats its first). One reduction serves eight rows instead of a horizontal sum each.
template <typename RowAt, typename Load8>
inline void dot_rows(const float* x, int64_t queries, int64_t rows, const RowAt& row,
                     const Load8& load8, float* scores, int64_t stride, int64_t n) {
  for (int64_t i0 = 0; i0 < rows; i0 += 8) {
    const int64_t count = rows - i0 < 8 ? rows - i0 : 8;
    decltype(row(0)) r[8];
    for (int64_t j = 0; j < 8; ++j) r[j] = row(i0 + (j < count ? j : 0));
    for (int64_t q = 0; q < queries; ++q) {
      __m256 acc[8];
      for (__m256& a : acc) a = _mm256_setzero_ps();
      for (int64_t c = 0; c < n; c += 8) {
        const __m256 xv = _mm256_loadu_ps(x + q * n + c);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(load8(r[j] + c), xv, acc[j]);
      }
      alignas(32) float sums[8];
      _mm256_store_ps(sums, transposed_sums(acc));
      for (int64_t j = 0; j < count; ++j) scores[q * stride + i0 + j] = sums[j];
    }
  }
}

// out[q * n + c] += sum over i < rows of a[q * stride + i] * row(i)[c], for q < queries and c < n,
// each output summed over i in order with one fused multiply-add per row: exactly the bits of
// `rows` calls of axpy per query. The sums of 16 channels of up to four queries stay in registers
// over all rows, so a row is read once per block of channels and the output is not loaded and
// stored per row (which bounded attention's accumulation). `row(i)` returns row i's elements;
// `load8(p)` widens eight of them and `load1(p)` one.
template <typename RowAt, typename Load8, typename Load1>
inline void accumulate_rows(const float* a, int64_t stride, int64_t rows, int64_t queries,
                            const RowAt& row, const Load8& load8, const Load1& load1, float* out,
                            int64_t n) {
  for (int64_t q0 = 0; q0 < queries; q0 += 4) {
    const int64_t qs = queries - q0 < 4 ? queries - q0 : 4;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
      __m256 acc[4][2];
      for (int64_t q = 0; q < qs; ++q)
        for (int k = 0; k < 2; ++k) acc[q][k] = _mm256_loadu_ps(out + (q0 + q) * n + c + 8 * k);
      for (int64_t i = 0; i < rows; ++i) {
        const auto* r = row(i) + c;
        const __m256 v0 = load8(r), v1 = load8(r + 8);
        for (int64_t q = 0; q < qs; ++q) {
          const __m256 w = _mm256_set1_ps(a[(q0 + q) * stride + i]);
          acc[q][0] = _mm256_fmadd_ps(w, v0, acc[q][0]);
          acc[q][1] = _mm256_fmadd_ps(w, v1, acc[q][1]);
        }
      }
      for (int64_t q = 0; q < qs; ++q)
        for (int k = 0; k < 2; ++k) _mm256_storeu_ps(out + (q0 + q) * n + c + 8 * k, acc[q][k]);
    }
    for (; c + 8 <= n; c += 8)
      for (int64_t q = 0; q < qs; ++q) {
        __m256 acc = _mm256_loadu_ps(out + (q0 + q) * n + c);
        for (int64_t i = 0; i < rows; ++i)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(a[(q0 + q) * stride + i]), load8(row(i) + c), acc);
        _mm256_storeu_ps(out + (q0 + q) * n + c, acc);
      }
    for (int64_t i = 0; i < rows && c < n; ++i)
      for (int64_t q = 0; q < qs; ++q)
        for (int64_t t = c; t < n; ++t)
          out[(q0 + q) * n + t] += a[(q0 + q) * stride + i] * load1(row(i) + t);
  }
}

}  // namespace visikv::vec

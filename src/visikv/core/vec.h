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

}  // namespace visikv::vec

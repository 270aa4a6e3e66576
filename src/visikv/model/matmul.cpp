#include "visikv/model/matmul.h"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/vec.h"
#include "visikv/formats/dequantize.h"

namespace visikv {

namespace {

// At and above this many tokens the product goes through sgemm on widened weight slabs.
constexpr int64_t kGemmMinTokens = 8;
constexpr int64_t kGemmSlabRows = 256;

inline __m256 bytes_to_floats(__m128i eight_bytes_low) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight_bytes_low));
}

// Q4_0 / Q4_1 blocks: 16 bytes of nibbles; low nibbles are elements 0..15, high ones 16..31.
template <bool kHasMin>
float dot_q4(const std::byte* row, const float* x, int64_t n) {
  constexpr int64_t kBlockBytes = kHasMin ? 20 : 18;
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  // One accumulator per quarter block: four independent FMA chains instead of one.
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  for (int64_t b = 0; b < n / 32; ++b) {
    const std::byte* block = row + b * kBlockBytes;
    uint16_t d_bits, m_bits = 0;
    std::memcpy(&d_bits, block, 2);
    if constexpr (kHasMin) std::memcpy(&m_bits, block + 2, 2);
    const float d_value = fp16_to_float(d_bits);
    const __m256 d = _mm256_set1_ps(d_value);
    const __m256 m = _mm256_set1_ps(kHasMin ? fp16_to_float(m_bits) : -8.0f * d_value);
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (kHasMin ? 4 : 2)));
    const __m128i lo = _mm_and_si128(q, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), low_mask);
    const float* xb = x + b * 32;
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int p = 0; p < 4; ++p) {
      // w = d*q + m (Q4_1) or d*(q-8) = d*q - 8d (Q4_0): the stored value, exactly as dequantized.
      const __m256 w = _mm256_fmadd_ps(d, bytes_to_floats(parts[p]), m);
      acc[p] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + 8 * p), acc[p]);
    }
  }
  return vec::horizontal_sum(
      _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

float dot_q8_0(const std::byte* row, const float* x, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  for (int64_t b = 0; b < n / 32; ++b) {
    const std::byte* block = row + b * 34;
    uint16_t d_bits;
    std::memcpy(&d_bits, block, 2);
    const __m256 d = _mm256_set1_ps(fp16_to_float(d_bits));
    const float* xb = x + b * 32;
    for (int p = 0; p < 4; ++p) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * p));
      const __m256 w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
      acc[p] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xb + 8 * p), acc[p]);
    }
  }
  return vec::horizontal_sum(
      _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

// Other block types: widen the row into a per-thread buffer, then a float dot.
float dot_widened(DType type, const std::byte* row, const float* x, int64_t n) {
  thread_local std::vector<float> widened;
  widened.resize(static_cast<size_t>(n));
  dequantize(type, {row, static_cast<size_t>(storage_bytes(type, n))}, widened);
  return vec::dot(widened.data(), x, n);
}

void widen_rows(const TensorRef& w, int64_t first_row, int64_t rows, float* out) {
  const int64_t in = w.row_size();
  for (int64_t r = 0; r < rows; ++r)
    dequantize(w.dtype, w.row(first_row + r), {out + r * in, static_cast<size_t>(in)});
}

}  // namespace

float dot_stored_row(DType type, const std::byte* row, const float* x, int64_t n) {
  switch (type) {
    case DType::F32:
      return vec::dot(reinterpret_cast<const float*>(row), x, n);
    case DType::F16:
      return vec::dot(reinterpret_cast<const uint16_t*>(row), false, x, n);
    case DType::BF16:
      return vec::dot(reinterpret_cast<const uint16_t*>(row), true, x, n);
    case DType::Q4_0:
      return dot_q4<false>(row, x, n);
    case DType::Q4_1:
      return dot_q4<true>(row, x, n);
    case DType::Q8_0:
      return dot_q8_0(row, x, n);
    default:
      return dot_widened(type, row, x, n);
  }
}

namespace {

void check_buffers(const Linear& layer, std::span<const float> x, int64_t tokens,
                   std::span<float> y) {
  require(static_cast<int64_t>(x.size()) >= tokens * layer.in_features() &&
              static_cast<int64_t>(y.size()) >= tokens * layer.out_features(),
          "linear ", layer.weight.name, ": buffers too small for ", tokens, " tokens");
}

void add_bias(const Linear& layer, int64_t tokens, std::span<float> y) {
  const int64_t out = layer.out_features();
  if (layer.bias.empty()) return;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t o = 0; o < out; ++o) y[t * out + o] += layer.bias[o];
}

// Many tokens: widen a slab of rows to float32, then sgemm.
void linear_forward_gemm(const Linear& layer, std::span<const float> x, int64_t tokens,
                         std::span<float> y) {
  const TensorRef& w = layer.weight;
  const int64_t in = layer.in_features(), out = layer.out_features();
  const int64_t row_bytes = storage_bytes(w.dtype, in);
  const int64_t slab_rows = std::min(kGemmSlabRows, out);
  std::vector<float> slab(w.dtype == DType::F32 ? 0 : static_cast<size_t>(slab_rows * in));
  for (int64_t first = 0; first < out; first += slab_rows) {
    const int64_t rows = std::min(slab_rows, out - first);
    const float* slab_data = slab.data();
    if (w.dtype == DType::F32) {
      slab_data = reinterpret_cast<const float*>(w.data.data() + first * row_bytes);
    } else {
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) widen_rows(w, first + r, 1, slab.data() + r * in);
    }
    // y[:, first:first+rows] = x · slabᵀ
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens),
                static_cast<int>(rows), static_cast<int>(in), 1.0f, x.data(), static_cast<int>(in),
                slab_data, static_cast<int>(in), 0.0f, y.data() + first, static_cast<int>(out));
  }
}

}  // namespace

void linear_forward(std::span<const LinearProduct> products, std::span<const float> x,
                    int64_t tokens, ProductRounding rounding) {
  for (const LinearProduct& p : products) check_buffers(*p.layer, x, tokens, p.y);
  if (tokens >= kGemmMinTokens && rounding == ProductRounding::Fastest) {
    for (const LinearProduct& p : products) linear_forward_gemm(*p.layer, x, tokens, p.y);
  } else {
    // Few tokens: one parallel pass over the rows of every product (one fork/join, not one per
    // matrix), each row read once for all tokens.
    int64_t total_rows = 0;
    for (const LinearProduct& p : products) total_rows += p.layer->out_features();
#pragma omp parallel for schedule(static)
    for (int64_t global_row = 0; global_row < total_rows; ++global_row) {
      size_t which = 0;
      int64_t o = global_row;
      while (o >= products[which].layer->out_features())
        o -= products[which++].layer->out_features();
      const Linear& layer = *products[which].layer;
      const int64_t in = layer.in_features(), out = layer.out_features();
      const std::byte* row = layer.weight.data.data() + o * storage_bytes(layer.weight.dtype, in);
      for (int64_t t = 0; t < tokens; ++t)
        products[which].y[t * out + o] =
            dot_stored_row(layer.weight.dtype, row, x.data() + t * in, in);
    }
  }
  for (const LinearProduct& p : products) add_bias(*p.layer, tokens, p.y);
}

void linear_forward(const Linear& layer, std::span<const float> x, int64_t tokens,
                    std::span<float> y, ProductRounding rounding) {
  const LinearProduct product{&layer, y};
  linear_forward({&product, 1}, x, tokens, rounding);
}

}  // namespace visikv

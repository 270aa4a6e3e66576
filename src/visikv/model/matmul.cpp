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
// Tokens per pass of the row kernels: 32 tokens of a 576-wide input are 74 KB, which stay in
// the core's L2 while its rows pass over them (16 to 64 measured alike on the default model).
constexpr int64_t kTokenTile = 32;

inline __m256 bytes_to_floats(__m128i eight_bytes_low) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight_bytes_low));
}

// Dot products of one stored row with up to kMaxTokens tokens at once: each block of 32 weights
// is unpacked once into four vectors of eight and multiplied into every token's accumulators (one
// per quarter block: four independent FMA chains). Per token the operations and their order do
// not depend on how many tokens share the pass, so a chunk of tokens gets bit for bit the results
// of one token at a time.
constexpr int kMaxTokens = 4;

template <int kTokens, typename UnpackBlock>
void dot_blocks_tokens(int64_t blocks, const float* x, int64_t x_stride, float* y, int64_t y_stride,
                       UnpackBlock unpack) {
  __m256 acc[kTokens][4];
  for (auto& token : acc)
    for (__m256& a : token) a = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256 w[4];
    unpack(b, w);
    for (int t = 0; t < kTokens; ++t) {
      const float* xb = x + t * x_stride + b * 32;
      for (int p = 0; p < 4; ++p)
        acc[t][p] = _mm256_fmadd_ps(w[p], _mm256_loadu_ps(xb + 8 * p), acc[t][p]);
    }
  }
  for (int t = 0; t < kTokens; ++t)
    y[t * y_stride] = vec::horizontal_sum(
        _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
}

template <typename UnpackBlock>
void dot_blocks_any_tokens(int64_t blocks, const float* x, int64_t x_stride, int64_t tokens,
                           float* y, int64_t y_stride, UnpackBlock unpack) {
  int64_t t = 0;
  for (; t + kMaxTokens <= tokens; t += kMaxTokens)
    dot_blocks_tokens<kMaxTokens>(blocks, x + t * x_stride, x_stride, y + t * y_stride, y_stride,
                                  unpack);
  switch (tokens - t) {
    case 3:
      dot_blocks_tokens<3>(blocks, x + t * x_stride, x_stride, y + t * y_stride, y_stride, unpack);
      break;
    case 2:
      dot_blocks_tokens<2>(blocks, x + t * x_stride, x_stride, y + t * y_stride, y_stride, unpack);
      break;
    case 1:
      dot_blocks_tokens<1>(blocks, x + t * x_stride, x_stride, y + t * y_stride, y_stride, unpack);
      break;
    default:
      break;
  }
}

// Q4_0 / Q4_1 blocks: 16 bytes of nibbles; low nibbles are elements 0..15, high ones 16..31.
template <bool kHasMin>
void dot_q4_tokens(const std::byte* row, const float* x, int64_t n, int64_t tokens, float* y,
                   int64_t y_stride) {
  constexpr int64_t kBlockBytes = kHasMin ? 20 : 18;
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  dot_blocks_any_tokens(n / 32, x, n, tokens, y, y_stride, [&](int64_t b, __m256* w) {
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
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    // w = d*q + m (Q4_1) or d*(q-8) = d*q - 8d (Q4_0): the stored value, exactly as dequantized.
    for (int p = 0; p < 4; ++p) w[p] = _mm256_fmadd_ps(d, bytes_to_floats(parts[p]), m);
  });
}

void dot_q8_0_tokens(const std::byte* row, const float* x, int64_t n, int64_t tokens, float* y,
                     int64_t y_stride) {
  dot_blocks_any_tokens(n / 32, x, n, tokens, y, y_stride, [&](int64_t b, __m256* w) {
    const std::byte* block = row + b * 34;
    uint16_t d_bits;
    std::memcpy(&d_bits, block, 2);
    const __m256 d = _mm256_set1_ps(fp16_to_float(d_bits));
    for (int p = 0; p < 4; ++p) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block + 2 + 8 * p));
      w[p] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
    }
  });
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
    case DType::Q4_1:
    case DType::Q8_0: {
      float y = 0;
      if (type == DType::Q8_0)
        dot_q8_0_tokens(row, x, n, 1, &y, 1);
      else if (type == DType::Q4_1)
        dot_q4_tokens<true>(row, x, n, 1, &y, 1);
      else
        dot_q4_tokens<false>(row, x, n, 1, &y, 1);
      return y;
    }
    default:
      return dot_widened(type, row, x, n);
  }
}

namespace {

// Types with a multi-token block kernel (dot_blocks_tokens).
bool has_block_kernel(DType type) {
  return type == DType::Q4_0 || type == DType::Q4_1 || type == DType::Q8_0;
}

// y[t * y_stride] = dot(row, x + t * n) for t < tokens, each bit for bit dot_stored_row's result.
void dot_stored_row_tokens(DType type, const std::byte* row, const float* x, int64_t n,
                           int64_t tokens, float* y, int64_t y_stride) {
  switch (type) {
    case DType::Q4_0:
      return dot_q4_tokens<false>(row, x, n, tokens, y, y_stride);
    case DType::Q4_1:
      return dot_q4_tokens<true>(row, x, n, tokens, y, y_stride);
    case DType::Q8_0:
      return dot_q8_0_tokens(row, x, n, tokens, y, y_stride);
    default:
      for (int64_t t = 0; t < tokens; ++t)
        y[t * y_stride] = dot_stored_row(type, row, x + t * n, n);
  }
}

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
  // sgemm only where it is both allowed and faster: for GGUF block types the multi-token block
  // kernels beat widening plus sgemm (measured on the default model: about 1.5x on 2 cores), and
  // they keep prefill bit for bit equal to decode.
  std::vector<LinearProduct> row_products;
  for (const LinearProduct& p : products) {
    if (rounding == ProductRounding::Fastest && tokens >= kGemmMinTokens &&
        !has_block_kernel(p.layer->weight.dtype))
      linear_forward_gemm(*p.layer, x, tokens, p.y);
    else
      row_products.push_back(p);
  }
  // One parallel pass over the rows of every remaining product (one fork/join, not one per
  // matrix). Tokens go in tiles small enough to stay in the core's cache while every row of the
  // thread's share passes over them; the static schedule gives a thread the same rows in every
  // tile, so no barrier is needed between tiles.
  int64_t total_rows = 0;
  for (const LinearProduct& p : row_products) total_rows += p.layer->out_features();
#pragma omp parallel
  for (int64_t first = 0; first < tokens; first += kTokenTile) {
    const int64_t count = std::min(kTokenTile, tokens - first);
#pragma omp for schedule(static) nowait
    for (int64_t global_row = 0; global_row < total_rows; ++global_row) {
      size_t which = 0;
      int64_t o = global_row;
      while (o >= row_products[which].layer->out_features())
        o -= row_products[which++].layer->out_features();
      const Linear& layer = *row_products[which].layer;
      const int64_t out = layer.out_features();
      const std::byte* row =
          layer.weight.data.data() + o * storage_bytes(layer.weight.dtype, layer.in_features());
      dot_stored_row_tokens(layer.weight.dtype, row, x.data() + first * layer.in_features(),
                            layer.in_features(), count,
                            row_products[which].y.data() + first * out + o, out);
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

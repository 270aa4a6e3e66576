#include "visikv/model/matmul.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/mapped_file.h"
#include "visikv/formats/dequantize.h"
#include "visikv/model/amx_products.h"
#include "visikv/model/weight_kernels.h"

namespace visikv {

ProductRounding numerics_rounding(std::string_view name) {
  if (name == "exact") return ProductRounding::Fastest;
  if (name == "int8") return ProductRounding::QuantizedActivations;
  if (name == "int16") return ProductRounding::QuantizedActivations16;
  fail("unknown numerics '", name, "' (exact, int8 or int16)");
}

namespace {

// At and above this many tokens the product goes through sgemm on widened weight slabs.
constexpr int64_t kGemmMinTokens = 8;
constexpr int64_t kGemmSlabRows = 256;
// Tokens per pass over the rows: 64 tokens of a 1536-wide input are 393 KB, which stay in the
// core's L2 while its rows pass over them.
constexpr int64_t kTokenTile = 64;
// With the tile products (amx_products.h) the super-block types' int16 products read the input as
// bytes, a step of 1024 values at a time (512 KB for 256 tokens), and unpacking a block of rows
// into tiles costs about as much as its products with 64 tokens: 256 tokens a pass.
constexpr int64_t kTileProductTokens = 256;
// Up to this many tokens the products go row by row (decode); above it, by blocks of rows.
constexpr int64_t kRowTokens = 4;
// Rows per call in decode: the kernel reads several rows at once (weight_kernels.cpp DotTokens).
constexpr int64_t kDecodeRowBlock = 16;
// Rows per call of the blocked product (weight_kernels.cpp BlockedRows): their widened step, 32
// rows of 1024 values, is a 128 KB panel that stays in L2 while the token groups pass over it.
constexpr int64_t kRowBlock = 32;
// Rows per call of the packed products (amx_products.h): two tiles of 16 (in decode, the vector
// kernel's two row tiles). The super-block types' tiles take up to eight (packed_tile_rows).
constexpr int64_t kPackedRowBlock = 32;
constexpr int64_t kPackedTileRowBlock = 128;

// Rows per call of a super-block type's tile products over `rows` rows: up to eight tiles of 16,
// so that each slice of the activations the kernel keeps in L2 serves eight row tiles (1536 x
// 8960 with 256 tokens: 25 against 39 ms on one core with two), in a number of calls the threads
// share evenly (Gemma 3's 640 rows: six calls of 112, not five of 128).
int64_t packed_tile_rows(int64_t rows) {
  const int64_t threads = omp_get_max_threads();
  const int64_t calls = (rows + kPackedTileRowBlock - 1) / kPackedTileRowBlock;
  const int64_t shared = (calls + threads - 1) / threads * threads;
  return std::max<int64_t>(kPackedRowBlock, (rows + 16 * shared - 1) / (16 * shared) * 16);
}

void widen_rows(const TensorRef& w, int64_t first_row, int64_t rows, float* out) {
  const int64_t in = w.row_size();
  for (int64_t r = 0; r < rows; ++r)
    dequantize(w.dtype, w.row(first_row + r), {out + r * in, static_cast<size_t>(in)});
}

// GGUF block types go through the multi-token kernels even for many tokens: they beat widening
// plus sgemm (measured on the default model: about 1.5x on 2 cores), and they keep prefill bit for
// bit equal to decode.
bool is_block_type(DType type) { return dtype_info(type).block_elements > 1; }

// The packed rows the int16 products of `layer` read where the tile products run (made on first
// use), or nullptr where they read the stored rows.
const amx::PackedRows* packed_rows(const Linear& layer) {
  if (!amx::enabled() || !amx::packs_rows(layer.weight.dtype)) return nullptr;
  DerivedWeights& derived = *layer.derived;
  std::call_once(derived.packed_once, [&] {
    // The products read only the packed copy from now on: the stored rows' pages (mapped from
    // the checkpoint) need not stay resident beside it, nor wait for the whole matrix (the
    // 30 MB tied head of the default model would otherwise sit in memory twice).
    const int64_t row_bytes = storage_bytes(layer.weight.dtype, layer.in_features());
    derived.packed = std::make_shared<const amx::PackedRows>(amx::pack_rows(
        layer.weight.dtype, layer.weight.data.data(), row_bytes, layer.out_features(),
        layer.in_features(), [&](int64_t first, int64_t count) {
          release_resident_pages(layer.weight.data.subspan(static_cast<size_t>(first * row_bytes),
                                                           static_cast<size_t>(count * row_bytes)));
        }));
  });
  return derived.packed.get();
}

}  // namespace

bool sums_independent_of_token_count(const Linear& layer, ProductRounding rounding) {
  return rounding == ProductRounding::PerToken || is_block_type(layer.weight.dtype);
}

float dot_stored_row(DType type, const std::byte* row, const float* x, int64_t n) {
  float y = 0;
  dot_row_tokens(type, row, n, x, n, 1, &y, 1);
  return y;
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
  // sgemm only where it is both allowed and faster (float weights; see is_block_type), the one
  // case sums_independent_of_token_count excludes.
  std::vector<LinearProduct> row_products;
  const bool int8 = rounding == ProductRounding::QuantizedActivations;
  const bool int16 = rounding == ProductRounding::QuantizedActivations16;
  bool any_quantized = false;
  for (const LinearProduct& p : products) {
    const bool block_type = is_block_type(p.layer->weight.dtype);
    any_quantized |= block_type && (int8 || int16);
    if (!sums_independent_of_token_count(*p.layer, rounding) && tokens >= kGemmMinTokens)
      linear_forward_gemm(*p.layer, x, tokens, p.y);
    else
      row_products.push_back(p);
  }
  // One parallel pass over the rows of every remaining product (one fork/join, not one per
  // matrix). Tokens go in tiles small enough to stay in the core's cache while every row of the
  // thread's share passes over them; the static schedule gives a thread the same rows in every
  // tile, so no barrier is needed between tiles.
  // The products share their input, so it is rounded to 8 or 16 bits once per activation block
  // the weight types take (reused buffers: nothing is allocated once they have grown to the
  // largest input).
  thread_local Int8Activations x_int8;
  thread_local Int16Activations x_int16[2];  // blocks of 32, of 256
  // The calling thread's buffers, which the parallel region below reads (its other threads have
  // their own, empty, thread_local ones).
  Int16Activations* const int16_buffers = x_int16;
  const auto int16_index = [](DType type) { return int16_activation_block(type) == 32 ? 0 : 1; };
  const auto int16_buffer = [&](DType type) -> Int16Activations& {
    return int16_buffers[int16_index(type)];
  };
  if (any_quantized) {
    const int64_t in = row_products[0].layer->in_features();
    if (int8) {
      quantize_activations(x.data(), tokens, in, x_int8);
    } else {
      bool done[2] = {false, false};
      for (const LinearProduct& p : row_products) {
        const DType type = p.layer->weight.dtype;
        if (!is_block_type(type) || std::exchange(done[int16_index(type)], true)) continue;
        quantize_activations(x.data(), tokens, in, int16_buffer(type),
                             int16_activation_block(type));
      }
    }
  }
  const Int8Activations& x8 = x_int8;
  // Where the tile products run, the int16 products of the types amx::packs_rows names read their
  // rows packed sixteen at a time (amx_products.h), made once per matrix.
  std::vector<const amx::PackedRows*> packed(row_products.size(), nullptr);
  if (int16 && any_quantized)
    for (size_t i = 0; i < row_products.size(); ++i)
      packed[i] = packed_rows(*row_products[i].layer);
  // Decode (a few tokens): one kernel call per row, measured faster on the default model's decode
  // than one call per thread's range of rows (weight_kernels.h dot_rows_tokens), 83 against 60-82
  // tokens/s. Many tokens: one call per block of rows, which the kernel runs as a cache-blocked
  // product (bit for bit the row kernel's sums). The int8 products go row by row; the int16 ones
  // take blocks of rows for one token (the kernel reads several rows at once).
  const int64_t rows_per_item =
      int8 && any_quantized
          ? 1
          : (tokens > kRowTokens ? kRowBlock : (tokens == 1 ? kDecodeRowBlock : 1));
  // Rows per item and items of each product, fixed before the parallel region (its threads only
  // look them up).
  std::vector<int64_t> item_rows(row_products.size()), items_of(row_products.size());
  int64_t total_items = 0;
  for (size_t which = 0; which < row_products.size(); ++which) {
    const Linear& layer = *row_products[which].layer;
    item_rows[which] =
        packed[which] == nullptr ? rows_per_item
        : tokens > amx::kVectorTokens && int16_activation_block(layer.weight.dtype) == 256
            ? packed_tile_rows(layer.out_features())
            : kPackedRowBlock;
    items_of[which] = (layer.out_features() + item_rows[which] - 1) / item_rows[which];
    total_items += items_of[which];
  }
  bool tile_products = false;
  for (size_t which = 0; which < row_products.size(); ++which)
    tile_products |= packed[which] != nullptr ||
                     int16_activation_block(row_products[which].layer->weight.dtype) == 256;
  const int64_t token_tile =
      int16 && any_quantized && tile_products && amx::enabled() ? kTileProductTokens : kTokenTile;
#pragma omp parallel
  for (int64_t first = 0; first < tokens; first += token_tile) {
    const int64_t count = std::min(token_tile, tokens - first);
#pragma omp for schedule(static) nowait
    for (int64_t item = 0; item < total_items; ++item) {
      size_t which = 0;
      int64_t local = item;
      for (; local >= items_of[which]; ++which) local -= items_of[which];
      const Linear& layer = *row_products[which].layer;
      const int64_t in = layer.in_features(), out = layer.out_features();
      const int64_t o = local * item_rows[which], rows = std::min(item_rows[which], out - o);
      const int64_t row_bytes = storage_bytes(layer.weight.dtype, in);
      const std::byte* row = layer.weight.data.data() + o * row_bytes;
      float* y = row_products[which].y.data() + first * out + o;
      if (packed[which] != nullptr)
        amx::packed_products(*packed[which], o / 16, (rows + 15) / 16,
                             int16_buffer(layer.weight.dtype), first, count, y, out);
      else if (any_quantized && is_block_type(layer.weight.dtype) && int8)
        dot_row_tokens_int8(layer.weight.dtype, row, in, x8, first, count, y, out);
      else if (any_quantized && is_block_type(layer.weight.dtype))
        dot_rows_tokens_int16(layer.weight.dtype, row, row_bytes, rows, in,
                              int16_buffer(layer.weight.dtype), first, count, y, out);
      else
        dot_rows_tokens(layer.weight.dtype, row, row_bytes, rows, in, x.data() + first * in, in,
                        count, y, out);
    }
  }
  for (const LinearProduct& p : products) add_bias(*p.layer, tokens, p.y);
}

void prepare_weights(const Weights& weights, ProductRounding rounding) {
  if (rounding != ProductRounding::QuantizedActivations16) return;
  std::vector<const Linear*> layers{&weights.lm_head};
  for (const LayerWeights& layer : weights.layers)
    for (const Linear* linear : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.up, &layer.down})
      layers.push_back(linear);
  for (const LayerWeights& layer : weights.layers)
    if (layer.gate) layers.push_back(&*layer.gate);
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < layers.size(); ++i) packed_rows(*layers[i]);
}

void linear_forward(const Linear& layer, std::span<const float> x, int64_t tokens,
                    std::span<float> y, ProductRounding rounding) {
  const LinearProduct product{&layer, y};
  linear_forward({&product, 1}, x, tokens, rounding);
}

}  // namespace visikv

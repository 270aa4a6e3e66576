// Products with weight matrices kept in their stored form (f32/f16/bf16 or GGUF blocks).
//
// Decode (up to four tokens): each output row is one dot product per token that unpacks the
// stored row block by block, so the weights are read once per call and never widened in memory.
// More tokens (prefill, batched decode): blocks of 32 rows go through the cache-blocked product
// of weight_kernels.h (each step of the rows widened once into an L1-resident panel), which sums
// every output exactly as the row kernel does, so prefill equals decode bit for bit. Float
// weights (f32, f16, bf16) with ProductRounding::Fastest and many tokens: sgemm on widened slabs.
// Each output element is computed by one thread in a fixed order, so results do not depend on
// the thread count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "visikv/formats/tensor.h"
#include "visikv/model/weights.h"

namespace visikv {

// dot(stored row of `elements` values, x).
float dot_stored_row(DType type, const std::byte* row, const float* x, int64_t elements);

// How a product over several tokens may round. Fastest: from a few tokens up, sgemm on widened
// weights (its blocking sums in another order than one token's dot product). PerToken: every
// output element is the dot product a one-token call computes, so a chunk of tokens gives bit
// for bit what decoding them one at a time gives (weights are still read once per chunk).
// QuantizedActivations: the "int8" numerics (llama.cpp's for quantized weights): products with
// GGUF block weights round the input to 8 bits per block of 32 and sum integer products
// (weight_kernels.h); float weights as Fastest. QuantizedActivations16: the "int16" numerics, the
// same with 16-bit activations (about 1e-5 of a block's largest value per value). Neither is
// transformers-exact: see docs/RESULTS.md for their agreement with the exact products. Both
// round each token's activations on their own, so a chunk of tokens gets one token's results.
enum class ProductRounding { Fastest, PerToken, QuantizedActivations, QuantizedActivations16 };

// The numerics modes as users name them: "exact" (float32 products, transformers-equal:
// Fastest), "int8" (QuantizedActivations) and "int16" (QuantizedActivations16). Throws
// visikv::Error naming them for another name.
ProductRounding numerics_rounding(std::string_view name);

// y[t, o] = sum_i x[t, i] * W[o, i] + bias[o] for t < tokens.
// x is {tokens, in_features}, y is {tokens, out_features}, both row-major.
void linear_forward(const Linear& layer, std::span<const float> x, int64_t tokens,
                    std::span<float> y, ProductRounding rounding = ProductRounding::Fastest);

// Whether linear_forward gives each token of a call the bits it gives that token in a call over
// any other tokens: block weights always, float weights only with ProductRounding::PerToken (the
// other roundings take many tokens through sgemm, whose sums depend on the token count).
bool sums_independent_of_token_count(const Linear& layer, ProductRounding rounding);

// Makes ahead of the first product the forms of the weights that products with `rounding` read
// instead of the stored ones (where the tile products run, the int16 products of the blocks-of-32
// types read their rows packed: amx_products.h), one thread per matrix. Products make them on first
// use otherwise; this moves that cost to loading, out of the first forward's time.
void prepare_weights(const Weights& weights, ProductRounding rounding);

// Several products of the same input (q/k/v, gate/up): one fork/join of the worker threads.
struct LinearProduct {
  const Linear* layer;
  std::span<float> y;
};
void linear_forward(std::span<const LinearProduct> products, std::span<const float> x,
                    int64_t tokens, ProductRounding rounding = ProductRounding::Fastest);

}  // namespace visikv

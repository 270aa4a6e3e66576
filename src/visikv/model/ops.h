// Elementwise pieces of the forward pass: norms, activations and rotary position embeddings,
// computed in float32 with the same formulas as Hugging Face transformers.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/model/config.h"
#include "visikv/model/weights.h"

namespace visikv {

// out[t] = norm(x[t]) for `tokens` rows of width `width`; `out` may be `x` (normalised in place).
void apply_norm(NormKind kind, const Norm& norm, double eps, std::span<const float> x,
                int64_t tokens, int64_t width, std::span<float> out);

void apply_activation(Activation activation, std::span<float> x);

// Inverse frequencies of each rotated pair (rotary_dim / 2 of them) for layers of `kind`, with
// their base and scaling (Config::local_rope for local layers that rotate differently).
std::vector<float> rope_inverse_frequencies(const Config& config,
                                            LayerKind kind = LayerKind::Global);

// Rotates the first rotary_dim coordinates of each head of `x` ({tokens, heads, head_dim}) for
// positions first_position ...
void apply_rope(const Config& config, std::span<const float> inverse_frequencies,
                std::span<float> x, int64_t tokens, int64_t heads, int64_t first_position);

}  // namespace visikv

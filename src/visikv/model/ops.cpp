#include "visikv/model/ops.h"

#include <cmath>
#include <numbers>

#include "visikv/core/error.h"
#include "visikv/core/vec.h"

namespace visikv {

void apply_norm(NormKind kind, const Norm& norm, double eps, std::span<const float> x,
                int64_t tokens, int64_t width, std::span<float> out) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* in = x.data() + t * width;
    float* o = out.data() + t * width;
    if (kind == NormKind::RMSNorm) {
      double sum_squares = 0.0;
      for (int64_t i = 0; i < width; ++i) sum_squares += static_cast<double>(in[i]) * in[i];
      const float inv = static_cast<float>(1.0 / std::sqrt(sum_squares / width + eps));
      for (int64_t i = 0; i < width; ++i) o[i] = norm.weight[i] * (in[i] * inv);
    } else {
      double sum = 0.0;
      for (int64_t i = 0; i < width; ++i) sum += in[i];
      const double mean = sum / width;
      double variance = 0.0;
      for (int64_t i = 0; i < width; ++i) variance += (in[i] - mean) * (in[i] - mean);
      const double inv = 1.0 / std::sqrt(variance / width + eps);
      for (int64_t i = 0; i < width; ++i)
        o[i] = static_cast<float>((in[i] - mean) * inv) * norm.weight[i] +
               (norm.bias.empty() ? 0.0f : norm.bias[i]);
    }
  }
}

void apply_activation(Activation activation, std::span<float> x) {
  switch (activation) {
    case Activation::SiLU:
      vec::silu(x);
      break;
    case Activation::GeluErf:
      for (float& v : x)
        v = 0.5f * v * (1.0f + std::erf(v * static_cast<float>(std::numbers::sqrt2 / 2)));
      break;
    case Activation::GeluTanh:
      vec::gelu_tanh(x);
      break;
  }
}

std::vector<float> rope_inverse_frequencies(const Config& c, LayerKind kind) {
  const bool local = kind == LayerKind::Local && c.local_rope.has_value();
  const double theta = local ? c.local_rope->theta : c.rope_theta;
  const RopeScaling& s = local ? c.local_rope->scaling : c.rope_scaling;
  // A GGUF's rope_freqs tensor scales the model's one (global) rope.
  const std::span<const float> freq_factors =
      local ? std::span<const float>() : std::span<const float>(c.rope_freq_factors);
  const int64_t pairs = c.rotary_dim / 2;
  std::vector<float> inv(pairs);
  // float32 like transformers: 1 / base ** (2i / dim)
  for (int64_t i = 0; i < pairs; ++i)
    inv[i] = 1.0f / std::pow(static_cast<float>(theta),
                             static_cast<float>(2 * i) / static_cast<float>(c.rotary_dim));
  if (!freq_factors.empty()) {
    for (int64_t i = 0; i < pairs; ++i) inv[i] /= freq_factors[i];
  } else if (s.type == RopeScaling::Type::Linear) {
    for (float& f : inv) f = static_cast<float>(f / s.factor);
  } else if (s.type == RopeScaling::Type::Llama3) {
    const double low_wavelen = s.original_max_positions / s.low_freq_factor;
    const double high_wavelen = s.original_max_positions / s.high_freq_factor;
    for (float& f : inv) {
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / s.factor);
      } else if (wavelen >= high_wavelen) {
        const double smooth = (s.original_max_positions / wavelen - s.low_freq_factor) /
                              (s.high_freq_factor - s.low_freq_factor);
        f = static_cast<float>((1 - smooth) * f / s.factor + smooth * f);
      }
    }
  }
  return inv;
}

void apply_rope(const Config& c, std::span<const float> inv, std::span<float> x, int64_t tokens,
                int64_t heads, int64_t first_position) {
  const int64_t d = c.head_dim, pairs = c.rotary_dim / 2;
  std::vector<float> cos_table(pairs), sin_table(pairs);
  for (int64_t t = 0; t < tokens; ++t) {
    const float position = static_cast<float>(first_position + t);
    for (int64_t i = 0; i < pairs; ++i) {
      const float angle = position * inv[i];
      cos_table[i] = std::cos(angle);
      sin_table[i] = std::sin(angle);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* head = x.data() + (t * heads + h) * d;
      for (int64_t i = 0; i < pairs; ++i) {
        // Half layout pairs (i, i + pairs); interleaved pairs (2i, 2i + 1).
        const int64_t a = c.rope_layout == RopeLayout::Half ? i : 2 * i;
        const int64_t b = c.rope_layout == RopeLayout::Half ? i + pairs : 2 * i + 1;
        const float x0 = head[a], x1 = head[b];
        head[a] = x0 * cos_table[i] - x1 * sin_table[i];
        head[b] = x1 * cos_table[i] + x0 * sin_table[i];
      }
    }
  }
}

}  // namespace visikv

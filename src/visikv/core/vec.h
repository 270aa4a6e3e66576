// Row functions over float vectors, vectorized once with Google Highway and chosen at run time
// for the CPU (core/vec.cpp): dot products and scaled accumulation against float32, half and
// bfloat16 rows, the interval bound of a box, and the elementwise exponentials of attention's
// softmax, the SiLU and tanh-GELU activations and the next-token log-sum-exp.
//
// Every call computes each element and each row's sum the same way whatever span holds it, so
// decode and prefill, which call them on different spans, give equal bits. Sums are taken in
// vector lanes and then across them, so their bits depend on the instruction set the process
// runs (one per process), as the weight products' do.
#pragma once

#include <cstdint>
#include <span>

namespace visikv::vec {

// Σ_i w[i] · x[i].
float dot(const float* w, const float* x, int64_t n);
// The same with w half (bf16 = false) or bfloat16 (bf16 = true) numbers.
float dot(const uint16_t* w, bool bf16, const float* x, int64_t n);

// y += a · x, one fused multiply-add per element.
void axpy(float a, const float* x, float* y, int64_t n);
void axpy(float a, const uint16_t* x, bool bf16, float* y, int64_t n);

// For a query q and a box [lo, hi] of keys: total = Σ_c max(q_c lo_c, q_c hi_c), the largest
// q·k over the box, and magnitude = Σ_c max(|q_c lo_c|, |q_c hi_c|), in float32.
struct BoxSums {
  float total, magnitude;
};
BoxSums box_sums(const float* q, const float* lo, const float* hi, int64_t n);

// The largest value (NaN if any value is NaN); -infinity for an empty row.
float max_value(std::span<const float> values);

// values[i] = exp(values[i] - shift) for every i; returns their float sum. With shift >= every
// value the results lie in [0, 1] and the sum cannot overflow.
float exp_shifted(std::span<float> values, float shift);

// log(sum_i exp(values[i])), the sum of exp(values[i] - max) taken in double; a NaN value gives
// NaN.
double log_sum_exp(std::span<const float> values);

// values[i] = values[i] / (1 + exp(-values[i])) (SiLU).
void silu(std::span<float> values);

// GELU with the tanh approximation (transformers' gelu_pytorch_tanh): 0.5 v (1 + tanh(u)), u =
// sqrt(2 / pi) (v + 0.044715 v^3), computed as v / (1 + exp(-2 u)).
void gelu_tanh(std::span<float> values);

}  // namespace visikv::vec

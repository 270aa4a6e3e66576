// Elementwise exponentials over float rows, vectorized with run-time dispatch (vec_math.cpp):
// attention's softmax, the SiLU activation and the log-sum-exp of a next-token distribution.
// Every call computes each element the same way whatever the row's length or position, so decode
// and prefill, which call them on different spans, give equal bits.
#pragma once

#include <span>

namespace visikv::vec {

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

}  // namespace visikv::vec

// Arithmetic on counts a user gives (each >= 0, up to the largest integer): past the largest
// int64 the result saturates instead of wrapping, so a huge count still compares as more than any
// limit it is checked against.
#pragma once

#include <cstdint>
#include <limits>

namespace visikv {

inline int64_t saturating_add(int64_t a, int64_t b) {
  int64_t sum = 0;
  return __builtin_add_overflow(a, b, &sum) ? std::numeric_limits<int64_t>::max() : sum;
}

inline int64_t saturating_mul(int64_t a, int64_t b) {
  int64_t product = 0;
  return __builtin_mul_overflow(a, b, &product) ? std::numeric_limits<int64_t>::max() : product;
}

}  // namespace visikv

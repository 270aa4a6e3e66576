// How one element of a dense f32 / f16 / bf16 row is stored and read back: the element traits of
// the one dense store (kv/vector_store.cpp); its rows are read in bulk by kv/row_kernels.h.
#pragma once

#include <cstdint>
#include <type_traits>

#include "visikv/core/half.h"
#include "visikv/kv/dense_format.h"

namespace visikv {

template <DenseFormat kFormat>
struct DenseElement {
  using Type = std::conditional_t<kFormat == DenseFormat::F32, float, uint16_t>;
  static constexpr bool kBf16 = kFormat == DenseFormat::BF16;

  static Type store(float x) {
    if constexpr (kFormat == DenseFormat::F32)
      return x;
    else if constexpr (kBf16)
      return float_to_bf16(x);
    else
      return float_to_fp16(x);
  }
  static float load(Type x) {
    if constexpr (kFormat == DenseFormat::F32)
      return x;
    else if constexpr (kBf16)
      return bf16_to_float(x);
    else
      return fp16_to_float(x);
  }
};

}  // namespace visikv

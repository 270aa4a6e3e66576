// Reference conversion of stored tensor data to float32, one block format at a time.
// The block layouts are those of GGUF (ggml): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
#pragma once

#include <cstddef>
#include <span>

#include "visikv/formats/tensor.h"

namespace visikv {

// Converts `out.size()` elements stored as `type` in `in` (which must hold exactly
// storage_bytes(type, out.size()) bytes) to float32.
void dequantize(DType type, std::span<const std::byte> in, std::span<float> out);

// The whole tensor as float32, in its logical (row-major, outermost-first) order.
std::vector<float> to_float(const TensorRef& tensor);

}  // namespace visikv

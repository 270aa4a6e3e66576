// Element types and non-owning tensor views shared by every file format and the model.
//
// Shapes are listed outermost first, as PyTorch prints them: a linear layer's weight is
// {out_features, in_features} and each of its rows is stored contiguously (for block-quantized
// types a row is a whole number of blocks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace visikv {

enum class DType : uint8_t { F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K };

struct DTypeInfo {
  std::string_view name;
  int64_t block_elements;  // elements per block (1 for plain floats)
  int64_t block_bytes;     // bytes per block
};

const DTypeInfo& dtype_info(DType type);
inline std::string_view dtype_name(DType type) { return dtype_info(type).name; }

// Bytes occupied by `elements` consecutive elements; throws when `elements` is not a whole
// number of blocks.
int64_t storage_bytes(DType type, int64_t elements);

struct TensorRef {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;       // outermost first
  std::span<const std::byte> data;  // exactly storage_bytes(dtype, elements()) bytes

  int64_t elements() const;
  int64_t rows() const;      // product of all but the last dimension (1 for a vector)
  int64_t row_size() const;  // last dimension
  std::span<const std::byte> row(int64_t index) const;
  std::string describe() const;  // "name [d0, d1] Q4_1"
};

// The bytes [begin, end) of a file's data section that one tensor occupies.
struct DataRange {
  uint64_t begin = 0, end = 0;
  std::string_view name;
};

// Checks that the tensors tile the data section [0, size) as the format's writers lay it out:
// the first at 0, each at the next multiple of `alignment` after the one before (1: directly
// after), no two overlapping, and after the last at most its alignment padding. A tensor missing
// or added, or a header length or count one off, leaves bytes that belong to no tensor: the
// file is rejected instead of read shifted. Throws visikv::Error starting with `file` and naming
// the bytes; `end_hint` ends the message about bytes left after the last tensor.
void require_tiled(std::vector<DataRange> ranges, uint64_t size, uint64_t alignment,
                   const std::string& file, std::string_view end_hint);

}  // namespace visikv

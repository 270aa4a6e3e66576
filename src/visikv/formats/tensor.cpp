#include "visikv/formats/tensor.h"

#include <algorithm>
#include <array>
#include <tuple>

#include "visikv/core/error.h"

namespace visikv {

namespace {
constexpr std::array<DTypeInfo, 11> kInfo = {{
    {"F32", 1, 4},
    {"F16", 1, 2},
    {"BF16", 1, 2},
    {"Q8_0", 32, 34},
    {"Q4_0", 32, 18},
    {"Q4_1", 32, 20},
    {"Q5_0", 32, 22},
    {"Q5_1", 32, 24},
    {"Q4_K", 256, 144},
    {"Q5_K", 256, 176},
    {"Q6_K", 256, 210},
}};
}  // namespace

const DTypeInfo& dtype_info(DType type) { return kInfo.at(static_cast<size_t>(type)); }

int64_t storage_bytes(DType type, int64_t elements) {
  const DTypeInfo& info = dtype_info(type);
  require(elements >= 0 && elements % info.block_elements == 0, "a run of ", elements,
          " elements is not a whole number of ", info.name, " blocks (", info.block_elements,
          " elements each)");
  return elements / info.block_elements * info.block_bytes;
}

int64_t TensorRef::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorRef::row_size() const { return shape.empty() ? 1 : shape.back(); }

int64_t TensorRef::rows() const {
  const int64_t size = row_size();
  return size == 0 ? 0 : elements() / size;
}

std::span<const std::byte> TensorRef::row(int64_t index) const {
  require(index >= 0 && index < rows(), "row ", index, " out of range for ", describe());
  const int64_t bytes = storage_bytes(dtype, row_size());
  return data.subspan(static_cast<size_t>(index * bytes), static_cast<size_t>(bytes));
}

std::string TensorRef::describe() const {
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  return str_cat(name, " [", dims, "] ", dtype_name(dtype));
}

void require_tiled(std::vector<DataRange> ranges, uint64_t size, uint64_t alignment,
                   const std::string& file, std::string_view end_hint) {
  const auto aligned = [&](uint64_t offset) {
    return (offset + alignment - 1) / alignment * alignment;
  };
  std::sort(ranges.begin(), ranges.end(), [](const DataRange& a, const DataRange& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  uint64_t covered = 0;  // bytes [0, covered) of the data section belong to tensors
  std::string_view previous = "(none)";
  for (const DataRange& range : ranges) {
    require(range.begin >= covered, file, ": the data of tensors '", previous, "' and '",
            range.name, "' overlap (bytes [", range.begin, ", ", covered, ") of the data section)");
    require(range.begin <= aligned(covered), file, ": bytes [", covered, ", ", range.begin,
            ") of the data section belong to no tensor (a gap between tensors '", previous,
            "' and '", range.name, "')");
    covered = range.end;
    previous = range.name;
  }
  require(size <= aligned(covered), file, ": bytes [", covered, ", ", size,
          ") at the end of the data section belong to no tensor (after tensor '", previous, "')",
          end_hint);
}

}  // namespace visikv

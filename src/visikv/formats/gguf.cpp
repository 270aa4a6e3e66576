#include "visikv/formats/gguf.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <limits>
#include <utility>

#include "visikv/core/error.h"

namespace visikv {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint32_t kDefaultAlignment = 32;
constexpr uint32_t kMaxDims = 4;     // GGML_MAX_DIMS
constexpr int kMaxArrayNesting = 8;  // real files nest at most once; deeper is corruption

enum class ValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// The fewest bytes one value of `type` can occupy; used to reject counts the file cannot hold
// before anything is allocated. 0 for an unknown type.
uint64_t min_value_bytes(uint32_t type) {
  switch (static_cast<ValueType>(type)) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kBool:
      return 1;
    case ValueType::kUint16:
    case ValueType::kInt16:
      return 2;
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kFloat32:
      return 4;
    case ValueType::kUint64:
    case ValueType::kInt64:
    case ValueType::kFloat64:
    case ValueType::kString:  // the uint64 length
      return 8;
    case ValueType::kArray:  // element type + count
      return 12;
  }
  return 0;
}

// A bounds-checked little-endian reader over the mapped bytes.
class Cursor {
 public:
  Cursor(std::span<const std::byte> bytes, const std::filesystem::path& path)
      : bytes_(bytes), path_(path) {}

  size_t position() const { return position_; }
  uint64_t remaining() const { return bytes_.size() - position_; }

  void need(uint64_t count, std::string_view what) const {
    if (count > remaining()) {
      fail("GGUF file ", path_, " is truncated: ", what, " at offset ", position_, " needs ", count,
           " bytes but only ", remaining(), " remain");
    }
  }

  template <typename T>
  T read(std::string_view what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, bytes_.data() + position_, sizeof(T));
    position_ += sizeof(T);
    return value;
  }

  std::string_view read_string(std::string_view what) {
    const uint64_t length = read<uint64_t>(what);
    need(length, what);
    std::string_view text(reinterpret_cast<const char*>(bytes_.data() + position_),
                          static_cast<size_t>(length));
    position_ += static_cast<size_t>(length);
    return text;
  }

 private:
  std::span<const std::byte> bytes_;
  const std::filesystem::path& path_;
  size_t position_ = 0;
};

struct TypeName {
  uint32_t id;
  std::string_view name;
};

constexpr std::array<TypeName, 34> kTypeNames = {{
    {0, "F32"},      {1, "F16"},    {2, "Q4_0"},    {3, "Q4_1"},   {4, "Q4_2"},     {5, "Q4_3"},
    {6, "Q5_0"},     {7, "Q5_1"},   {8, "Q8_0"},    {9, "Q8_1"},   {10, "Q2_K"},    {11, "Q3_K"},
    {12, "Q4_K"},    {13, "Q5_K"},  {14, "Q6_K"},   {15, "Q8_K"},  {16, "IQ2_XXS"}, {17, "IQ2_XS"},
    {18, "IQ3_XXS"}, {19, "IQ1_S"}, {20, "IQ4_NL"}, {21, "IQ3_S"}, {22, "IQ2_S"},   {23, "IQ4_XS"},
    {24, "I8"},      {25, "I16"},   {26, "I32"},    {27, "I64"},   {28, "F64"},     {29, "IQ1_M"},
    {30, "BF16"},    {34, "TQ1_0"}, {35, "TQ2_0"},  {39, "MXFP4"},
}};

class MetadataReader {
 public:
  MetadataReader(Cursor& cursor, const std::filesystem::path& path)
      : cursor_(cursor), path_(path) {}

  nlohmann::json read_value(uint32_t type, const std::string& key, int depth) {
    switch (static_cast<ValueType>(type)) {
      case ValueType::kUint8:
        return cursor_.read<uint8_t>(key);
      case ValueType::kInt8:
        return cursor_.read<int8_t>(key);
      case ValueType::kUint16:
        return cursor_.read<uint16_t>(key);
      case ValueType::kInt16:
        return cursor_.read<int16_t>(key);
      case ValueType::kUint32:
        return cursor_.read<uint32_t>(key);
      case ValueType::kInt32:
        return cursor_.read<int32_t>(key);
      case ValueType::kFloat32:
        return cursor_.read<float>(key);
      case ValueType::kBool:
        return cursor_.read<uint8_t>(key) != 0;
      case ValueType::kString:
        return std::string(cursor_.read_string(key));
      case ValueType::kArray:
        return read_array(key, depth);
      case ValueType::kUint64:
        return cursor_.read<uint64_t>(key);
      case ValueType::kInt64:
        return cursor_.read<int64_t>(key);
      case ValueType::kFloat64:
        return cursor_.read<double>(key);
    }
    fail("GGUF file ", path_, ": metadata key '", key, "' has unknown value type ", type);
  }

 private:
  nlohmann::json read_array(const std::string& key, int depth) {
    require(depth < kMaxArrayNesting, "GGUF file ", path_, ": metadata key '", key,
            "' nests arrays more than ", kMaxArrayNesting, " deep");
    const uint32_t element_type = cursor_.read<uint32_t>(key);
    const uint64_t min_bytes = min_value_bytes(element_type);
    require(min_bytes > 0, "GGUF file ", path_, ": metadata key '", key,
            "' is an array of unknown value type ", element_type);
    const uint64_t count = cursor_.read<uint64_t>(key);
    require(count <= cursor_.remaining() / min_bytes, "GGUF file ", path_, ": metadata key '", key,
            "' claims an array of ", count, " elements, more than the file can hold");
    nlohmann::json::array_t values;
    values.reserve(static_cast<size_t>(count));
    if (static_cast<ValueType>(element_type) == ValueType::kString) {
      // The tokenizer vocabulary is tens of thousands of strings: skip the generic dispatch.
      for (uint64_t i = 0; i < count; ++i)
        values.emplace_back(std::string(cursor_.read_string(key)));
    } else {
      for (uint64_t i = 0; i < count; ++i)
        values.push_back(read_value(element_type, key, depth + 1));
    }
    return nlohmann::json(std::move(values));
  }

  Cursor& cursor_;
  const std::filesystem::path& path_;
};

// Multiplies non-negative values, failing instead of overflowing int64.
int64_t checked_product(std::span<const int64_t> dims, const std::filesystem::path& path,
                        std::string_view tensor_name) {
  int64_t product = 1;
  for (int64_t d : dims) {
    if (__builtin_mul_overflow(product, d, &product)) {
      fail("GGUF file ", path, ": tensor '", tensor_name, "' has an absurd element count");
    }
  }
  return product;
}

}  // namespace

std::optional<DType> dtype_from_gguf_type(uint32_t gguf_type) {
  switch (gguf_type) {
    case 0:
      return DType::F32;
    case 1:
      return DType::F16;
    case 2:
      return DType::Q4_0;
    case 3:
      return DType::Q4_1;
    case 6:
      return DType::Q5_0;
    case 7:
      return DType::Q5_1;
    case 8:
      return DType::Q8_0;
    case 12:
      return DType::Q4_K;
    case 13:
      return DType::Q5_K;
    case 14:
      return DType::Q6_K;
    case 30:
      return DType::BF16;
    default:
      return std::nullopt;
  }
}

std::string_view gguf_type_name(uint32_t gguf_type) {
  for (const TypeName& entry : kTypeNames) {
    if (entry.id == gguf_type) return entry.name;
  }
  return "unknown";
}

GgufFile::GgufFile(const std::filesystem::path& path) : file_(path) {
  const std::filesystem::path& file_path = file_.path();
  const std::span<const std::byte> bytes = file_.bytes();
  Cursor cursor(bytes, file_path);

  require(bytes.size() >= 4, "GGUF file ", file_path, " is too short to hold the GGUF magic");
  const uint32_t magic = cursor.read<uint32_t>("magic");
  require(magic == kMagic, "GGUF file ", file_path, " has bad magic (expected \"GGUF\")");
  version_ = cursor.read<uint32_t>("version");
  require(version_ == 2 || version_ == 3, "GGUF file ", file_path, ": unsupported GGUF version ",
          version_, " (only versions 2 and 3 are read)");
  const uint64_t tensor_count = cursor.read<uint64_t>("tensor count");
  const uint64_t kv_count = cursor.read<uint64_t>("metadata count");

  // Smallest possible key/value pair: key length (8) + value type (4) + a 1-byte value.
  require(kv_count <= cursor.remaining() / 13, "GGUF file ", file_path,
          ": absurd metadata key/value count ", kv_count, " for a file of ", bytes.size(),
          " bytes");
  MetadataReader reader(cursor, file_path);
  for (uint64_t i = 0; i < kv_count; ++i) {
    std::string key(cursor.read_string("metadata key"));
    const uint32_t type = cursor.read<uint32_t>("metadata value type");
    nlohmann::json value = reader.read_value(type, key, 0);
    require(!metadata_.contains(key), "GGUF file ", file_path, ": duplicate metadata key '", key,
            "'");
    metadata_.emplace(std::move(key), std::move(value));
  }

  if (auto it = metadata_.find("general.alignment"); it != metadata_.end()) {
    const bool valid = it->is_number_integer() && it->get<int64_t>() > 0 &&
                       it->get<int64_t>() <= (int64_t{1} << 30) &&
                       std::has_single_bit(it->get<uint64_t>());
    require(valid, "GGUF file ", file_path, ": general.alignment ", it->dump(),
            " is not a positive power of two");
    alignment_ = it->get<uint32_t>();
  } else {
    alignment_ = kDefaultAlignment;
  }

  // Smallest possible tensor description: name length (8) + dim count (4) + type (4) + offset (8).
  require(tensor_count <= cursor.remaining() / 24, "GGUF file ", file_path,
          ": absurd tensor count ", tensor_count, " for a file of ", bytes.size(), " bytes");
  std::vector<uint64_t> offsets;
  tensors_.reserve(static_cast<size_t>(tensor_count));
  offsets.reserve(static_cast<size_t>(tensor_count));
  for (uint64_t i = 0; i < tensor_count; ++i) {
    TensorRef tensor;
    tensor.name = std::string(cursor.read_string("tensor name"));
    const std::string& name = tensor.name;
    const uint32_t dim_count = cursor.read<uint32_t>("tensor dimension count");
    require(dim_count <= kMaxDims, "GGUF file ", file_path, ": tensor '", name, "' has ", dim_count,
            " dimensions (at most ", kMaxDims, " allowed)");
    std::vector<int64_t> innermost_first(dim_count);
    for (uint32_t d = 0; d < dim_count; ++d) {
      const uint64_t size = cursor.read<uint64_t>("tensor dimension");
      require(size <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "GGUF file ",
              file_path, ": tensor '", name, "' dimension ", d, " is absurd (", size, ")");
      innermost_first[d] = static_cast<int64_t>(size);
    }
    const uint32_t type_id = cursor.read<uint32_t>("tensor type");
    const std::optional<DType> dtype = dtype_from_gguf_type(type_id);
    require(dtype.has_value(), "GGUF file ", file_path, ": tensor '", name,
            "' has unsupported GGUF type ", type_id, " (", gguf_type_name(type_id), ")");
    tensor.dtype = *dtype;
    const uint64_t offset = cursor.read<uint64_t>("tensor data offset");
    require(offset % alignment_ == 0, "GGUF file ", file_path, ": tensor '", name, "' data offset ",
            offset, " is not a multiple of the alignment ", alignment_);

    const DTypeInfo& info = dtype_info(tensor.dtype);
    const int64_t row_length = innermost_first.empty() ? 1 : innermost_first.front();
    require(row_length % info.block_elements == 0, "GGUF file ", file_path, ": tensor '", name,
            "' has rows of ", row_length, " elements, not a whole number of ", info.name,
            " blocks (", info.block_elements, " elements each)");
    const int64_t elements = checked_product(innermost_first, file_path, name);
    const int64_t blocks = elements / info.block_elements;
    require(blocks <= static_cast<int64_t>(bytes.size()) / info.block_bytes, "GGUF file ",
            file_path, ": tensor '", name, "' has ", elements,
            " elements, more data than the file holds");
    tensor.shape.assign(innermost_first.rbegin(), innermost_first.rend());
    require(index_.emplace(tensor.name, tensors_.size()).second, "GGUF file ", file_path,
            ": duplicate tensor name '", name, "'");
    offsets.push_back(offset);
    tensors_.push_back(std::move(tensor));
  }

  // The data section starts at the first multiple of the alignment after the descriptions.
  const uint64_t data_start = (cursor.position() + alignment_ - 1) / alignment_ * alignment_;
  require(data_start <= bytes.size() || tensors_.empty(), "GGUF file ", file_path,
          " is truncated: the tensor data section would start at offset ", data_start,
          " past the end of the file (", bytes.size(), " bytes)");
  const uint64_t data_size = data_start <= bytes.size() ? bytes.size() - data_start : 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorRef& tensor = tensors_[i];
    const uint64_t size = static_cast<uint64_t>(storage_bytes(tensor.dtype, tensor.elements()));
    require(offsets[i] <= data_size && size <= data_size - offsets[i], "GGUF file ", file_path,
            ": tensor '", tensor.name, "' data (offset ", offsets[i], ", ", size,
            " bytes) runs past the end of the file (data section holds ", data_size, " bytes)");
    tensor.data =
        bytes.subspan(static_cast<size_t>(data_start + offsets[i]), static_cast<size_t>(size));
  }

  // llama.cpp's and gguf-py's writers put each tensor at the next multiple of the alignment.
  std::vector<DataRange> ranges;
  ranges.reserve(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i)
    ranges.push_back({offsets[i], offsets[i] + tensors_[i].data.size(), tensors_[i].name});
  require_tiled(std::move(ranges), data_size, alignment_, str_cat("GGUF file ", file_path),
                str_cat("; the data section starts at file offset ", data_start,
                        ": is a tensor description missing or the tensor count wrong?"));
}

const TensorRef* GgufFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorRef& GgufFile::tensor(std::string_view name) const {
  const TensorRef* found = find(name);
  if (found == nullptr) fail("tensor '", name, "' not found in ", path());
  return *found;
}

}  // namespace visikv

#include "visikv/formats/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

#include "visikv/core/error.h"
#include "visikv/formats/json_file.h"

namespace visikv {

namespace {

// The reference implementation's MAX_HEADER_SIZE.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::optional<DType> dtype_from_safetensors(std::string_view name) {
  if (name == "F32") return DType::F32;
  if (name == "F16") return DType::F16;
  if (name == "BF16") return DType::BF16;
  return std::nullopt;
}

// Bytes per element of the dtypes the format defines that visikv does not compute with.
std::optional<int64_t> unread_dtype_bytes(std::string_view name) {
  for (const auto& [dtype, bytes] : {std::pair<std::string_view, int64_t>{"BOOL", 1},
                                     {"U8", 1},
                                     {"I8", 1},
                                     {"F8_E4M3", 1},
                                     {"F8_E5M2", 1},
                                     {"I16", 2},
                                     {"U16", 2},
                                     {"I32", 4},
                                     {"U32", 4},
                                     {"I64", 8},
                                     {"U64", 8},
                                     {"F64", 8}})
    if (name == dtype) return bytes;
  return std::nullopt;
}

// A JSON value that must be a non-negative integer that fits in int64.
std::optional<int64_t> non_negative(const nlohmann::json& value) {
  if (!value.is_number_unsigned()) return std::nullopt;
  const uint64_t v = value.get<uint64_t>();
  if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
  return static_cast<int64_t>(v);
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(path) {
  const std::filesystem::path& file_path = file_.path();
  const std::span<const std::byte> bytes = file_.bytes();
  require(bytes.size() >= 8, "safetensors file ", file_path,
          " is too short to hold the 8-byte header length");
  uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), sizeof(header_length));
  require(header_length <= bytes.size() - 8, "safetensors file ", file_path, ": header length ",
          header_length, " runs past the end of the file (", bytes.size(), " bytes)");
  require(header_length <= kMaxHeaderBytes, "safetensors file ", file_path, ": header length ",
          header_length, " exceeds the format's limit of ", kMaxHeaderBytes, " bytes");

  // As the reference `safetensors` library: the header is one JSON object, padded with spaces
  // (0x20) only. Anything else after the object (a NUL, a stray data byte when the length is off
  // by one) means the header length or the header is wrong, and with it every data offset.
  std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8),
                        static_cast<size_t>(header_length));
  const std::string header_what = str_cat("safetensors file ", file_path, " header");
  require(!text.empty() && text.front() == '{', header_what,
          ": malformed JSON header: does not start with '{'");
  const size_t padded_from = text.find_last_not_of(' ') + 1;
  if (text[padded_from - 1] != '}') {
    char byte[8];
    std::snprintf(byte, sizeof byte, "0x%02X", static_cast<unsigned char>(text[padded_from - 1]));
    fail(header_what, ": malformed JSON header: byte ", padded_from - 1, " (", byte,
         ") follows the JSON object where only space padding (0x20) may; is the header length ",
         header_length, " right?");
  }
  const nlohmann::json header = parse_json(text.substr(0, padded_from), header_what);
  require(header.is_object(), header_what, ": malformed JSON header: not a JSON object");

  const size_t data_start = static_cast<size_t>(8 + header_length);
  const int64_t data_size = static_cast<int64_t>(bytes.size() - data_start);
  std::vector<DataRange> ranges;  // every tensor's, read or not
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      require(entry.is_object(), "safetensors file ", file_path,
              ": __metadata__ is not a JSON object");
      for (const auto& [key, value] : entry.items()) {
        require(value.is_string(), "safetensors file ", file_path, ": __metadata__ entry '", key,
                "' is not a string");
      }
      metadata_ = entry;
      continue;
    }
    // A named copy: lambdas may not capture structured bindings before C++20 compilers caught up.
    const std::string& tensor_name = name;
    const auto where = [&] {
      return str_cat("safetensors file ", file_path, ": tensor '", tensor_name, "'");
    };
    require(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                entry.contains("data_offsets"),
            where(), " needs an object with dtype, shape and data_offsets");
    const nlohmann::json& dtype_json = entry["dtype"];
    require(dtype_json.is_string(), where(), " has a dtype that is not a string");
    const std::string dtype_name_text = dtype_json.get<std::string>();
    const std::optional<DType> dtype = dtype_from_safetensors(dtype_name_text);
    const std::optional<int64_t> unread_bytes = unread_dtype_bytes(dtype_name_text);
    require(dtype.has_value() || unread_bytes.has_value(), where(), " has unknown dtype '",
            dtype_name_text, "'");

    const nlohmann::json& shape_json = entry["shape"];
    require(shape_json.is_array(), where(), " has a shape that is not an array");
    TensorRef tensor;
    tensor.name = name;
    int64_t elements = 1;
    for (const nlohmann::json& dim : shape_json) {
      const std::optional<int64_t> size = non_negative(dim);
      require(size.has_value(), where(), " has an invalid shape ", shape_json.dump());
      tensor.shape.push_back(*size);
      require(!__builtin_mul_overflow(elements, *size, &elements), where(), " has an absurd shape ",
              shape_json.dump());
    }
    const int64_t element_bytes = dtype ? dtype_info(*dtype).block_bytes : *unread_bytes;
    int64_t expected_bytes = 0;
    require(!__builtin_mul_overflow(elements, element_bytes, &expected_bytes), where(),
            " has an absurd shape ", shape_json.dump());

    const nlohmann::json& offsets_json = entry["data_offsets"];
    require(offsets_json.is_array() && offsets_json.size() == 2, where(),
            " needs data_offsets [begin, end]");
    const std::optional<int64_t> begin = non_negative(offsets_json[0]);
    const std::optional<int64_t> end = non_negative(offsets_json[1]);
    require(begin && end && *begin <= *end && *end <= data_size, where(), " has data_offsets ",
            offsets_json.dump(), " outside the data section (", data_size, " bytes)");
    require(*end - *begin == expected_bytes, where(), ": shape ", shape_json.dump(), " of ",
            dtype_name_text, " needs ", expected_bytes, " bytes but data_offsets ",
            offsets_json.dump(), " span ", *end - *begin, " (size mismatch)");
    ranges.push_back({static_cast<uint64_t>(*begin), static_cast<uint64_t>(*end), name});
    if (!dtype) {
      unread_.push_back({name, dtype_name_text, std::move(tensor.shape)});
      continue;
    }
    tensor.dtype = *dtype;
    tensor.data = bytes.subspan(data_start + static_cast<size_t>(*begin),
                                static_cast<size_t>(expected_bytes));
    tensors_.push_back(std::move(tensor));
  }

  // As the reference library: the tensors tile the data section with no gap, no overlap and no
  // bytes left over (it calls this MetadataIncompleteBuffer).
  require_tiled(std::move(ranges), static_cast<uint64_t>(data_size), 1,
                str_cat("safetensors file ", file_path),
                str_cat("; is the header length ", header_length, " right?"));
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorRef& a, const TensorRef& b) {
    return a.data.data() < b.data.data() ||
           (a.data.data() == b.data.data() && a.data.size() < b.data.size());
  });
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const TensorRef* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

bool SafetensorsFile::contains(std::string_view name) const {
  return find(name) != nullptr ||
         std::any_of(unread_.begin(), unread_.end(),
                     [&](const UnreadTensor& t) { return t.name == name; });
}

const TensorRef& SafetensorsFile::tensor(std::string_view name) const {
  const TensorRef* found = find(name);
  if (found == nullptr) fail("tensor '", name, "' not found in ", path());
  return *found;
}

}  // namespace visikv

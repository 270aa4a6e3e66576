#include "visikv/formats/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>

#include "visikv/core/error.h"

namespace visikv {

namespace {

std::optional<DType> dtype_from_safetensors(std::string_view name) {
  if (name == "F32") return DType::F32;
  if (name == "F16") return DType::F16;
  if (name == "BF16") return DType::BF16;
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

  const auto* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_length);
  } catch (const nlohmann::json::exception& e) {
    fail("safetensors file ", file_path, " has a malformed JSON header: ", e.what());
  }
  require(header.is_object(), "safetensors file ", file_path,
          " has a malformed JSON header: not a JSON object");

  const size_t data_start = static_cast<size_t>(8 + header_length);
  const int64_t data_size = static_cast<int64_t>(bytes.size() - data_start);
  std::vector<std::pair<int64_t, int64_t>> ranges;  // [begin, end) of each tensor
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
    require(dtype.has_value(), where(), " has unsupported dtype '", dtype_name_text,
            "' (only F32, F16 and BF16 are read)");

    const nlohmann::json& shape_json = entry["shape"];
    require(shape_json.is_array(), where(), " has a shape that is not an array");
    TensorRef tensor;
    tensor.name = name;
    tensor.dtype = *dtype;
    int64_t elements = 1;
    for (const nlohmann::json& dim : shape_json) {
      const std::optional<int64_t> size = non_negative(dim);
      require(size.has_value(), where(), " has an invalid shape ", shape_json.dump());
      tensor.shape.push_back(*size);
      require(!__builtin_mul_overflow(elements, *size, &elements), where(), " has an absurd shape ",
              shape_json.dump());
    }
    const int64_t element_bytes = dtype_info(*dtype).block_bytes;
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
    tensor.data = bytes.subspan(data_start + static_cast<size_t>(*begin),
                                static_cast<size_t>(expected_bytes));
    tensors_.push_back(std::move(tensor));
    ranges.emplace_back(*begin, *end);
  }

  // File order, and no two tensors may share bytes.
  std::vector<size_t> order(tensors_.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
  for (size_t k = 1; k < order.size(); ++k) {
    const auto& previous = ranges[order[k - 1]];
    const auto& current = ranges[order[k]];
    require(previous.second <= current.first, "safetensors file ", file_path,
            ": the data_offsets of tensors '", tensors_[order[k - 1]].name, "' and '",
            tensors_[order[k]].name, "' overlap");
  }
  std::vector<TensorRef> sorted;
  sorted.reserve(tensors_.size());
  for (size_t i : order) sorted.push_back(std::move(tensors_[i]));
  tensors_ = std::move(sorted);
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const TensorRef* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorRef& SafetensorsFile::tensor(std::string_view name) const {
  const TensorRef* found = find(name);
  if (found == nullptr) fail("tensor '", name, "' not found in ", path());
  return *found;
}

}  // namespace visikv

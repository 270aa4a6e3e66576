// safetensors files: an 8-byte little-endian header length, a JSON header describing each tensor
// (dtype, shape, [begin, end) byte offsets into the data section), then the data section.
// Read through a memory mapping; only the float dtypes F32, F16 and BF16 are accepted.
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/core/mapped_file.h"
#include "visikv/formats/tensor.h"

namespace visikv {

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);  // throws visikv::Error
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;

  // Ordered by position in the data section (the order the writer laid them out).
  const std::vector<TensorRef>& tensors() const { return tensors_; }
  const TensorRef* find(std::string_view name) const;    // nullptr when absent
  const TensorRef& tensor(std::string_view name) const;  // throws when absent
  // The header's "__metadata__" object (string -> string), or an empty object.
  const nlohmann::json& metadata() const { return metadata_; }
  const std::filesystem::path& path() const { return file_.path(); }

 private:
  MappedFile file_;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::vector<TensorRef> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

}  // namespace visikv

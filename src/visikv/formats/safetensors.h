// safetensors files: an 8-byte little-endian header length, a JSON header describing each tensor
// (dtype, shape, [begin, end) byte offsets into the data section), then the data section.
// Read through a memory mapping. Tensors of the float dtypes F32, F16 and BF16 are read; the
// others the format defines (BOOL, integers, F64, F8) are checked like them (bounds, coverage of
// the data section) and listed by name, so that a checkpoint holding, say, a boolean causal-mask
// buffer opens and the model loader decides whether it may be ignored.
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

// A tensor of a dtype visikv does not compute with.
struct UnreadTensor {
  std::string name;
  std::string dtype;  // as the header spells it, e.g. "BOOL"
  std::vector<int64_t> shape;
};

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
  const std::vector<UnreadTensor>& unread_tensors() const { return unread_; }
  // Whether the header names this tensor, read or not.
  bool contains(std::string_view name) const;
  // The header's "__metadata__" object (string -> string), or an empty object.
  const nlohmann::json& metadata() const { return metadata_; }
  const std::filesystem::path& path() const { return file_.path(); }

 private:
  MappedFile file_;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::vector<TensorRef> tensors_;
  std::vector<UnreadTensor> unread_;
  std::map<std::string, size_t, std::less<>> index_;
};

}  // namespace visikv

// GGUF files (the llama.cpp / ggml container), versions 2 and 3, read through a memory mapping.
//
// Layout: "GGUF" magic, version, tensor count, metadata count, the metadata key/value pairs, the
// tensor descriptions (name, dims innermost first, type, offset), padding to general.alignment,
// then the data section that every tensor offset is relative to. Every count, length and offset
// is checked against the file size before it is used, so a corrupt file gives a visikv::Error.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/core/mapped_file.h"
#include "visikv/formats/tensor.h"

namespace visikv {

// The GGUF tensor type ids this project reads, mapped to DType; nullopt for any other id.
std::optional<DType> dtype_from_gguf_type(uint32_t gguf_type);
// The ggml name of a GGUF tensor type id ("Q4_1", "IQ2_XXS", ...), or "unknown".
std::string_view gguf_type_name(uint32_t gguf_type);

class GgufFile {
 public:
  explicit GgufFile(const std::filesystem::path& path);  // throws visikv::Error naming the problem
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;
  GgufFile(GgufFile&&) noexcept = default;
  GgufFile& operator=(GgufFile&&) noexcept = default;

  uint32_t version() const { return version_; }
  // Every key/value pair: strings -> json strings, integers -> json integers (unsigned types stay
  // unsigned), float32/64 -> json numbers, bools -> json booleans, arrays -> json arrays.
  const nlohmann::json& metadata() const { return metadata_; }
  // In file order; shapes outermost first (GGUF's ne[] reversed).
  const std::vector<TensorRef>& tensors() const { return tensors_; }
  const TensorRef* find(std::string_view name) const;    // nullptr when absent
  const TensorRef& tensor(std::string_view name) const;  // throws when absent
  const std::filesystem::path& path() const { return file_.path(); }
  uint32_t alignment() const { return alignment_; }

 private:
  MappedFile file_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::vector<TensorRef> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

}  // namespace visikv

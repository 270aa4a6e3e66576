// A Hugging Face model directory: config.json, the weights as model.safetensors or as shards
// listed by model.safetensors.index.json, and optionally generation_config.json and
// tokenizer.json. The shards stay memory-mapped for the life of the object.
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/formats/safetensors.h"
#include "visikv/formats/tensor.h"

namespace visikv {

class HfModelDir {
 public:
  explicit HfModelDir(const std::filesystem::path& dir);  // throws visikv::Error
  HfModelDir(const HfModelDir&) = delete;
  HfModelDir& operator=(const HfModelDir&) = delete;
  HfModelDir(HfModelDir&&) noexcept = default;
  HfModelDir& operator=(HfModelDir&&) noexcept = default;

  const nlohmann::json& config() const { return config_; }
  // generation_config.json, or null when the directory has none.
  const nlohmann::json& generation_config() const { return generation_config_; }
  // Path of tokenizer.json, or an empty path when the directory has none.
  const std::filesystem::path& tokenizer_json() const { return tokenizer_json_; }
  // Every tensor of every shard, shard by shard in file order.
  const std::vector<TensorRef>& tensors() const { return tensors_; }
  const TensorRef* find(std::string_view name) const;    // nullptr when absent
  const TensorRef& tensor(std::string_view name) const;  // throws when absent
  // Tensors of dtypes visikv does not compute with (SafetensorsFile::unread_tensors), all shards.
  const std::vector<UnreadTensor>& unread_tensors() const { return unread_; }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
  nlohmann::json config_;
  nlohmann::json generation_config_;
  std::filesystem::path tokenizer_json_;
  std::vector<SafetensorsFile> shards_;  // own the mappings the tensors point into
  std::vector<TensorRef> tensors_;
  std::vector<UnreadTensor> unread_;
  std::map<std::string, size_t, std::less<>> index_;
};

}  // namespace visikv

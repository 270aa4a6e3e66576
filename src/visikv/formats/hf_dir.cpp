#include "visikv/formats/hf_dir.h"

#include <set>
#include <utility>

#include "visikv/core/error.h"
#include "visikv/core/file_kind.h"
#include "visikv/formats/json_file.h"

namespace visikv {

namespace fs = std::filesystem;

HfModelDir::HfModelDir(const fs::path& dir) : dir_(dir) {
  require(file_kind(dir_) == FileKind::Directory, "model directory ", dir_,
          " does not exist or is not a directory");
  const fs::path config_path = dir_ / "config.json";
  require(file_kind(config_path) == FileKind::Regular, "model directory ", dir_,
          " has no config.json");
  config_ = read_json_file(config_path);
  require(config_.is_object(), "config.json in ", dir_, " is not a JSON object");

  const fs::path generation_path = dir_ / "generation_config.json";
  if (file_kind(generation_path) == FileKind::Regular) {
    generation_config_ = read_json_file(generation_path);
    require(generation_config_.is_object(), "generation_config.json in ", dir_,
            " is not a JSON object");
  }
  if (file_kind(dir_ / "tokenizer.json") == FileKind::Regular)
    tokenizer_json_ = dir_ / "tokenizer.json";

  const fs::path single_path = dir_ / "model.safetensors";
  const fs::path index_path = dir_ / "model.safetensors.index.json";
  std::map<std::string, std::string, std::less<>> weight_map;  // tensor -> shard file name
  std::map<std::string, size_t, std::less<>> shard_numbers;    // shard file name -> shards_ index
  if (file_kind(single_path) != FileKind::Missing) {
    shards_.emplace_back(single_path);
  } else {
    require(file_kind(index_path) != FileKind::Missing, "model directory ", dir_,
            " has neither model.safetensors nor model.safetensors.index.json");
    const nlohmann::json index = read_json_file(index_path);
    require(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
            "shard index ", index_path, " has no weight_map object");
    for (const auto& [tensor_name, shard_json] : index["weight_map"].items()) {
      require(shard_json.is_string(), "shard index ", index_path, ": the shard of tensor '",
              tensor_name, "' is not a string");
      const std::string shard_name = shard_json.get<std::string>();
      // Shards are plain file names next to the index; anything else could reach outside the
      // model directory.
      const fs::path shard_relative(shard_name);
      require(!shard_name.empty() && shard_relative == shard_relative.filename() &&
                  shard_name != "." && shard_name != "..",
              "shard index ", index_path, ": shard name '", shard_name, "' of tensor '",
              tensor_name, "' is not a plain file name");
      if (!shard_numbers.contains(shard_name)) {
        const fs::path shard_path = dir_ / shard_relative;
        require(file_kind(shard_path) != FileKind::Missing, "shard index ", index_path,
                " names shard '", shard_name, "' (for tensor '", tensor_name,
                "') but that file is missing");
        shard_numbers.emplace(shard_name, shards_.size());
        shards_.emplace_back(shard_path);
      }
      weight_map.emplace(tensor_name, shard_name);
    }
    require(!shards_.empty(), "shard index ", index_path, " lists no tensors");
  }

  std::set<std::string, std::less<>> names;  // read or not, each in one shard only
  const auto once = [&](const std::string& name, const SafetensorsFile& shard) {
    require(names.insert(name).second, "model directory ", dir_, ": tensor '", name,
            "' appears in more than one shard (again in ", shard.path().filename(), ")");
  };
  for (const SafetensorsFile& shard : shards_) {
    for (const TensorRef& tensor : shard.tensors()) {
      once(tensor.name, shard);
      index_.emplace(tensor.name, tensors_.size());
      tensors_.push_back(tensor);
    }
    for (const UnreadTensor& tensor : shard.unread_tensors()) {
      once(tensor.name, shard);
      unread_.push_back(tensor);
    }
  }
  // Every tensor the index promises must be in the shard it names.
  for (const auto& [tensor_name, shard_name] : weight_map) {
    const SafetensorsFile& shard = shards_[shard_numbers.at(shard_name)];
    require(shard.contains(tensor_name), "shard index in ", dir_, " lists tensor '", tensor_name,
            "' in shard '", shard_name, "' but the tensor is missing from it");
  }
}

const TensorRef* HfModelDir::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorRef& HfModelDir::tensor(std::string_view name) const {
  const TensorRef* found = find(name);
  if (found == nullptr) fail("tensor '", name, "' not found in model directory ", dir_);
  return *found;
}

}  // namespace visikv

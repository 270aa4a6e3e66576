// A loaded checkpoint: its config, its weights bound to roles, and its tokenizer. Opens a Hugging
// Face directory, a .gguf file, or "default" (the project's default model, fetched by
// scripts/setup.sh).
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "visikv/model/config.h"
#include "visikv/model/weights.h"
#include "visikv/tokenizer/tokenizer.h"

namespace visikv {

class Model {
 public:
  // `spec`: a directory with config.json, a .gguf file, or "default".
  static Model load(const std::string& spec);
  // Where "default" resolves: $VISIKV_DEFAULT_MODEL, else <source>/models/<default file>.
  static std::filesystem::path default_model_path();

  const Config& config() const { return config_; }
  const Weights& weights() const { return weights_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const std::string& source() const { return source_; }  // path it came from
  std::string format() const { return format_; }         // "gguf" or "safetensors"
  std::string describe() const;                          // multi-line summary for `visikv info`

  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  ~Model();

 private:
  Model();
  struct Files;  // the open checkpoint files whose mappings the weights point into
  std::unique_ptr<Files> files_;
  Config config_;
  Weights weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string source_;
  std::string format_;
};

}  // namespace visikv

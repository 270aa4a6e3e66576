// Bad model input: config.json with missing fields or an unknown architecture, tensors with the
// wrong shape, missing files. Each must give a visikv::Error naming the problem.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "test_support.h"
#include "visikv/core/error.h"
#include "visikv/model/config.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

namespace fs = std::filesystem;
using nlohmann::json;

json llama_config() {
  return {{"model_type", "llama"},    {"hidden_size", 64},        {"num_hidden_layers", 2},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"intermediate_size", 128},
          {"vocab_size", 100},        {"rms_norm_eps", 1e-5}};
}

TEST(Config, ReadsLlamaFields) {
  const Config c = config_from_hf(llama_config(), json());
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.group_size(), 2);
  EXPECT_EQ(c.rotary_dim, 16);
  EXPECT_EQ(c.norm, NormKind::RMSNorm);
}

TEST(Config, UnknownArchitectureListsSupportedOnes) {
  json config = llama_config();
  config["model_type"] = "mamba";
  const std::string message = error_of([&] { config_from_hf(config, json()); });
  EXPECT_NE(message.find("unsupported model_type 'mamba'"), std::string::npos) << message;
  for (const char* name : {"gpt2", "gpt_neox", "llama", "mistral", "qwen2"})
    EXPECT_NE(message.find(name), std::string::npos) << message;
}

TEST(Config, MissingAndMistypedFieldsAreNamed) {
  for (const char* field : {"hidden_size", "num_hidden_layers", "vocab_size", "model_type"}) {
    json config = llama_config();
    config.erase(field);
    const std::string message = error_of([&] { config_from_hf(config, json()); });
    EXPECT_NE(message.find(field), std::string::npos) << message;
  }
  json config = llama_config();
  config["hidden_size"] = "sixty-four";
  EXPECT_NE(error_of([&] { config_from_hf(config, json()); }).find("wrong type"),
            std::string::npos);
}

TEST(Config, InconsistentShapesAreRejected) {
  json config = llama_config();
  config["num_key_value_heads"] = 3;
  EXPECT_NE(error_of([&] { config_from_hf(config, json()); }).find("multiple"), std::string::npos);
  config = llama_config();
  config["num_hidden_layers"] = 0;
  EXPECT_NE(error_of([&] { config_from_hf(config, json()); }).find("positive"), std::string::npos);
  config = llama_config();
  config["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  EXPECT_NE(error_of([&] { config_from_hf(config, json()); }).find("yarn"), std::string::npos);
}

TEST(Config, GgufMetadataErrors) {
  EXPECT_NE(error_of([] { config_from_gguf(json::object()); }).find("general.architecture"),
            std::string::npos);
  const json unknown = {{"general.architecture", "rwkv6"}};
  EXPECT_NE(error_of([&] { config_from_gguf(unknown); }).find("rwkv6"), std::string::npos);
}

class ModelDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("visikv_model_errors_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void copy_fixture(const std::string& name) {
    fs::copy(fs::path(VISIKV_FIXTURES) / "models" / name, dir_, fs::copy_options::recursive);
  }
  fs::path dir_;
};

TEST_F(ModelDirTest, MissingPathsAreNamed) {
  EXPECT_NE(error_of([&] { Model::load((dir_ / "nowhere").string()); }).find("not found"),
            std::string::npos);
  EXPECT_NE(error_of([&] { Model::load(dir_.string()); }).find("config.json"), std::string::npos);
}

TEST_F(ModelDirTest, MissingTensorIsNamed) {
  copy_fixture("llama");
  json config = json::parse(std::ifstream(dir_ / "config.json"));
  config["num_hidden_layers"] = 3;  // the checkpoint has two
  std::ofstream(dir_ / "config.json") << config.dump();
  const std::string message = error_of([&] { Model::load(dir_.string()); });
  EXPECT_NE(message.find("model.layers.2."), std::string::npos) << message;
}

TEST_F(ModelDirTest, WrongTensorShapeIsNamed) {
  copy_fixture("llama");
  json config = json::parse(std::ifstream(dir_ / "config.json"));
  config["intermediate_size"] = 96;
  std::ofstream(dir_ / "config.json") << config.dump();
  const std::string message = error_of([&] { Model::load(dir_.string()); });
  EXPECT_NE(message.find("shape"), std::string::npos) << message;
}

TEST_F(ModelDirTest, MissingTokenizerIsNamed) {
  copy_fixture("llama");
  fs::remove(dir_ / "tokenizer.json");
  EXPECT_NE(error_of([&] { Model::load(dir_.string()); }).find("tokenizer.json"),
            std::string::npos);
}

}  // namespace
}  // namespace visikv

// safetensors files and Hugging Face model directories: fixtures written by the `safetensors`
// package (values from PyTorch), and corrupt files and directories built in a temporary directory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/formats/dequantize.h"
#include "visikv/formats/hf_dir.h"
#include "visikv/formats/safetensors.h"

namespace visikv {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = fs::path(VISIKV_FIXTURES) / "formats";

json expected_json() {
  std::ifstream in(kFixtures / "safetensors.expected.json");
  if (!in)
    throw std::runtime_error(
        "missing safetensors.expected.json; run "
        "scripts/make_format_fixtures.py");
  return json::parse(in);
}

template <typename F>
void expect_error(F&& open, std::string_view word) {
  try {
    open();
    ADD_FAILURE() << "expected a visikv::Error mentioning '" << word << "', got none";
  } catch (const Error& e) {
    EXPECT_NE(std::string_view(e.what()).find(word), std::string_view::npos)
        << "message lacks '" << word << "': " << e.what();
  }
}

// Checks each tensor of `expected` (name -> {dtype, shape, values}) against `find`'s answer.
template <typename Source>
void expect_tensors(const Source& source, const json& expected) {
  ASSERT_EQ(source.tensors().size(), expected.size());
  for (auto item = expected.begin(); item != expected.end(); ++item) {
    const std::string& name = item.key();
    const json& entry = item.value();
    SCOPED_TRACE(name);
    const TensorRef* tensor = source.find(name);
    ASSERT_NE(tensor, nullptr);
    EXPECT_EQ(dtype_name(tensor->dtype), entry["dtype"].get<std::string>());
    EXPECT_EQ(tensor->shape, entry["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ(to_float(*tensor), entry["values"].get<std::vector<float>>());
  }
}

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("visikv_st_" + std::to_string(::getpid()) + "_" +
                                        info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static void write_text(const fs::path& path, std::string_view text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
  }

  // A safetensors file from a header text and a data section of `data_bytes` bytes.
  fs::path write_safetensors(std::string_view header, size_t data_bytes,
                             const std::string& name = "test.safetensors") {
    std::string bytes(8, '\0');
    const uint64_t length = header.size();
    std::memcpy(bytes.data(), &length, 8);
    bytes += header;
    for (size_t i = 0; i < data_bytes; ++i) bytes.push_back(static_cast<char>(i * 13 + 1));
    const fs::path path = dir_ / name;
    write_text(path, bytes);
    return path;
  }

  void expect_safetensors_error(std::string_view header, size_t data_bytes, std::string_view word) {
    const fs::path path = write_safetensors(header, data_bytes);
    expect_error([&] { SafetensorsFile file(path); }, word);
  }

  fs::path dir_;
};

// ---- fixtures ----

TEST(SafetensorsFixture, ValuesMatchTorch) {
  const SafetensorsFile file(kFixtures / "floats.safetensors");
  const json expected = expected_json()["floats.safetensors"];
  expect_tensors(file, expected["tensors"]);
  EXPECT_EQ(file.metadata(), expected["metadata"]);
  EXPECT_TRUE(file.tensor("scalar_f32").shape.empty());
  EXPECT_EQ(file.tensor("scalar_f32").elements(), 1);
  expect_error([&] { (void)file.tensor("absent"); }, "not found");
  // Tensors come in data-section order.
  for (size_t i = 1; i < file.tensors().size(); ++i) {
    EXPECT_LT(file.tensors()[i - 1].data.data(), file.tensors()[i].data.data());
  }
}

TEST(SafetensorsFixture, MoveKeepsViewsValid) {
  SafetensorsFile original(kFixtures / "floats.safetensors");
  const std::vector<float> before = to_float(original.tensor("embed_bf16"));
  SafetensorsFile moved(std::move(original));
  EXPECT_EQ(to_float(moved.tensor("embed_bf16")), before);
}

TEST(HfDirFixture, ShardedDirectory) {
  HfModelDir model(kFixtures / "hf_sharded");
  EXPECT_EQ(model.config()["model_type"], "llama");
  EXPECT_EQ(model.generation_config()["eos_token_id"], 2);
  EXPECT_TRUE(model.tokenizer_json().empty());
  EXPECT_EQ(model.dir(), kFixtures / "hf_sharded");
  expect_tensors(model, expected_json()["hf_sharded"]["tensors"]);
  expect_error([&] { (void)model.tensor("lm_head.weight"); }, "not found");

  HfModelDir moved(std::move(model));
  EXPECT_EQ(moved.tensor("model.norm.weight").shape, std::vector<int64_t>{4});
  expect_tensors(moved, expected_json()["hf_sharded"]["tensors"]);
}

// ---- Hugging Face directories ----

class HfDir : public TempDirTest {
 protected:
  void copy_sharded_fixture() {
    for (const auto& entry : fs::directory_iterator(kFixtures / "hf_sharded")) {
      fs::copy_file(entry.path(), dir_ / entry.path().filename());
    }
  }
  void expect_dir_error(std::string_view word) {
    expect_error([&] { HfModelDir model(dir_); }, word);
  }
};

TEST_F(HfDir, SingleFileWithTokenizer) {
  fs::copy_file(kFixtures / "floats.safetensors", dir_ / "model.safetensors");
  write_text(dir_ / "config.json", R"({"model_type": "llama"})");
  write_text(dir_ / "tokenizer.json", "{}");
  const HfModelDir model(dir_);
  EXPECT_TRUE(model.generation_config().is_null());
  EXPECT_EQ(model.tokenizer_json(), dir_ / "tokenizer.json");
  expect_tensors(model, expected_json()["floats.safetensors"]["tensors"]);
}

TEST_F(HfDir, MissingConfig) {
  fs::copy_file(kFixtures / "floats.safetensors", dir_ / "model.safetensors");
  expect_dir_error("config.json");
}

TEST_F(HfDir, MalformedConfig) {
  copy_sharded_fixture();
  write_text(dir_ / "config.json", R"({"model_type": )");
  expect_dir_error("malformed JSON");
}

TEST_F(HfDir, NotADirectory) {
  expect_error([&] { HfModelDir model(dir_ / "nowhere"); }, "directory");
}

TEST_F(HfDir, NoWeights) {
  write_text(dir_ / "config.json", "{}");
  expect_dir_error("neither");
}

TEST_F(HfDir, IndexNamesMissingShard) {
  copy_sharded_fixture();
  fs::remove(dir_ / "model-00002-of-00002.safetensors");
  expect_dir_error("missing");
}

TEST_F(HfDir, IndexNamesTensorMissingFromShard) {
  copy_sharded_fixture();
  json index = json::parse(std::ifstream(dir_ / "model.safetensors.index.json"));
  index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors";
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  expect_dir_error("lm_head.weight");
  expect_dir_error("missing");
}

TEST_F(HfDir, IndexNamesWrongShard) {
  copy_sharded_fixture();
  json index = json::parse(std::ifstream(dir_ / "model.safetensors.index.json"));
  index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors";
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  expect_dir_error("model.norm.weight");
}

TEST_F(HfDir, ShardNameEscapingTheDirectory) {
  copy_sharded_fixture();
  json index = json::parse(std::ifstream(dir_ / "model.safetensors.index.json"));
  index["weight_map"]["model.norm.weight"] = "../model-00002-of-00002.safetensors";
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  expect_dir_error("plain file name");
}

// Found by fuzz_hf_dir: a name the system cannot even look up threw std::filesystem_error.
TEST_F(HfDir, ShardNameTooLongToLookUp) {
  copy_sharded_fixture();
  json index = json::parse(std::ifstream(dir_ / "model.safetensors.index.json"));
  index["weight_map"]["model.norm.weight"] = std::string(300, 'x') + ".safetensors";
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  expect_dir_error("cannot look up");
  expect_dir_error("File name too long");
}

TEST_F(HfDir, IndexWithoutWeightMap) {
  copy_sharded_fixture();
  write_text(dir_ / "model.safetensors.index.json", R"({"metadata": {}})");
  expect_dir_error("weight_map");
}

TEST_F(HfDir, TensorInTwoShards) {
  copy_sharded_fixture();
  fs::copy_file(dir_ / "model-00001-of-00002.safetensors", dir_ / "extra.safetensors");
  json index = json::parse(std::ifstream(dir_ / "model.safetensors.index.json"));
  index["weight_map"]["model.embed_tokens.weight"] = "extra.safetensors";
  write_text(dir_ / "model.safetensors.index.json", index.dump());
  expect_dir_error("more than one shard");
}

TEST_F(HfDir, CorruptShard) {
  copy_sharded_fixture();
  fs::resize_file(dir_ / "model-00002-of-00002.safetensors", 100);
  expect_dir_error("model-00002-of-00002.safetensors");
}

// ---- corrupt safetensors files ----

class SafetensorsCorrupt : public TempDirTest {};

constexpr std::string_view kValidHeader =
    R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
    R"("b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]}})";

TEST_F(SafetensorsCorrupt, HandBuiltValidFileOpens) {
  const SafetensorsFile file(write_safetensors(kValidHeader, 22));
  ASSERT_EQ(file.tensors().size(), 2u);
  EXPECT_EQ(file.tensors()[0].name, "a");
  EXPECT_EQ(file.tensor("b").data.size(), 6u);
  EXPECT_EQ(file.metadata()["k"], "v");
}

TEST_F(SafetensorsCorrupt, NoMetadataGivesEmptyObject) {
  const SafetensorsFile file(write_safetensors(R"({})", 0));
  EXPECT_TRUE(file.metadata().is_object());
  EXPECT_TRUE(file.metadata().empty());
  EXPECT_TRUE(file.tensors().empty());
}

TEST_F(SafetensorsCorrupt, HeaderLengthPastTheEnd) {
  std::string bytes(8, '\0');
  const uint64_t length = 1000;
  std::memcpy(bytes.data(), &length, 8);
  bytes += "{}";
  write_text(dir_ / "x.safetensors", bytes);
  expect_error([&] { SafetensorsFile file(dir_ / "x.safetensors"); }, "header length");
  const uint64_t huge = ~uint64_t{0};
  std::memcpy(bytes.data(), &huge, 8);
  write_text(dir_ / "x.safetensors", bytes);
  expect_error([&] { SafetensorsFile file(dir_ / "x.safetensors"); }, "header length");
}

TEST_F(SafetensorsCorrupt, TooShortForHeaderLength) {
  write_text(dir_ / "x.safetensors", "abc");
  expect_error([&] { SafetensorsFile file(dir_ / "x.safetensors"); }, "too short");
}

TEST_F(SafetensorsCorrupt, MalformedJsonHeader) {
  expect_safetensors_error(R"({"a":{"dtype":"F32",)", 0, "malformed JSON");
  expect_safetensors_error(R"([1, 2, 3])", 0, "malformed JSON");
  expect_safetensors_error(std::string_view("{\"a\0\":1}", 8), 0, "malformed JSON");
}

TEST_F(SafetensorsCorrupt, UnknownDtype) {
  expect_safetensors_error(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,2]}})", 2,
                           "unknown dtype 'Q4'");
  expect_safetensors_error(R"({"a":{"dtype":7,"shape":[2],"data_offsets":[0,2]}})", 2, "dtype");
}

// The format's other dtypes open as unread tensors, sized and placed like the read ones.
TEST_F(SafetensorsCorrupt, OtherDtypesAreListedUnread) {
  const SafetensorsFile file(write_safetensors(
      R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]},)"
      R"("s":{"dtype":"I64","shape":[2],"data_offsets":[3,19]},)"
      R"("w":{"dtype":"F32","shape":[1],"data_offsets":[19,23]}})",
      23));
  ASSERT_EQ(file.tensors().size(), 1u);
  EXPECT_EQ(file.tensors()[0].name, "w");
  ASSERT_EQ(file.unread_tensors().size(), 2u);
  EXPECT_EQ(file.unread_tensors()[0].name, "m");
  EXPECT_EQ(file.unread_tensors()[0].dtype, "BOOL");
  EXPECT_EQ(file.unread_tensors()[1].shape, std::vector<int64_t>{2});
  EXPECT_TRUE(file.contains("s"));
  EXPECT_FALSE(file.contains("x"));
  expect_safetensors_error(R"({"s":{"dtype":"I64","shape":[2],"data_offsets":[0,8]}})", 8,
                           "size mismatch");
}

TEST_F(SafetensorsCorrupt, MissingFields) {
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[2]}})", 8, "data_offsets");
  expect_safetensors_error(R"({"a":[1,2]})", 8, "'a'");
}

TEST_F(SafetensorsCorrupt, OffsetsOutOfRange) {
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4,
                           "data_offsets");
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 16,
                           "data_offsets");
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 16,
                           "data_offsets");
  expect_safetensors_error(
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551608,18446744073709551615]}})",
      16, "data_offsets");
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 16,
                           "data_offsets");
}

TEST_F(SafetensorsCorrupt, OverlappingOffsets) {
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                           12, "overlap");
}

TEST_F(SafetensorsCorrupt, ShapeSizeMismatch) {
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8,
                           "mismatch");
  expect_safetensors_error(R"({"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", 16,
                           "mismatch");
}

TEST_F(SafetensorsCorrupt, InvalidShape) {
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}})", 8,
                           "shape");
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,8]}})", 8,
                           "shape");
  expect_safetensors_error(
      R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8, "shape");
  expect_safetensors_error(R"({"a":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8, "shape");
}

TEST_F(SafetensorsCorrupt, BadMetadata) {
  expect_safetensors_error(R"({"__metadata__":{"k":1}})", 0, "__metadata__");
  expect_safetensors_error(R"({"__metadata__":[]})", 0, "__metadata__");
}

TEST_F(SafetensorsCorrupt, TruncatedFixtureAtEveryByte) {
  const fs::path path = dir_ / "cut.safetensors";
  fs::copy_file(kFixtures / "floats.safetensors", path);
  for (auto cut = fs::file_size(path); cut-- > 0;) {
    fs::resize_file(path, cut);
    EXPECT_THROW(SafetensorsFile{path}, Error) << "cut at " << cut;
  }
}

}  // namespace
}  // namespace visikv

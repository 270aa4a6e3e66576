// GGUF reading: the fixture written by the `gguf` package, the real default model, and corrupt
// files built byte by byte in a temporary directory (each must give a visikv::Error naming the
// problem, never a crash or an out-of-bounds read).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/formats/dequantize.h"
#include "visikv/formats/gguf.h"

namespace visikv {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = fs::path(VISIKV_FIXTURES) / "formats";

json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in)
    throw std::runtime_error("missing fixture " + path.string() +
                             "; run scripts/make_format_fixtures.py");
  return json::parse(in);
}

std::vector<std::byte> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  std::memcpy(bytes.data(), chars.data(), chars.size());
  return bytes;
}

void write_bytes(const fs::path& path, std::span<const std::byte> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// Runs `open` and expects a visikv::Error whose message contains `word`.
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

// Little-endian byte writer for hand-made GGUF files.
class Bytes {
 public:
  template <typename T>
  Bytes& put(T value) {
    const auto* p = reinterpret_cast<const std::byte*>(&value);
    data_.insert(data_.end(), p, p + sizeof(T));
    return *this;
  }
  Bytes& str(std::string_view text) {
    put<uint64_t>(text.size());
    const auto* p = reinterpret_cast<const std::byte*>(text.data());
    data_.insert(data_.end(), p, p + text.size());
    return *this;
  }
  Bytes& append(const Bytes& other) {
    data_.insert(data_.end(), other.data_.begin(), other.data_.end());
    return *this;
  }
  void pad_to(size_t alignment) {
    while (data_.size() % alignment != 0) data_.push_back(std::byte{0});
  }
  size_t size() const { return data_.size(); }
  std::vector<std::byte>& data() { return data_; }

 private:
  std::vector<std::byte> data_;
};

constexpr uint32_t kString = 8, kUint32 = 4, kArray = 9;

Bytes kv_string(std::string_view key, std::string_view value) {
  Bytes b;
  b.str(key).put<uint32_t>(kString).str(value);
  return b;
}
Bytes kv_u32(std::string_view key, uint32_t value) {
  Bytes b;
  b.str(key).put<uint32_t>(kUint32).put<uint32_t>(value);
  return b;
}

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> ne;  // innermost first, as stored
  uint32_t type = 0;
  uint64_t offset = 0;
};

struct GgufSpec {
  uint32_t magic = 0x46554747;
  uint32_t version = 3;
  std::vector<Bytes> kvs = {kv_string("general.architecture", "llama"), kv_u32("x.count", 7)};
  std::vector<TensorSpec> tensors = {{"a", {8, 2}, 0, 0}, {"b", {32}, 8, 64}};  // F32, Q8_0
  uint64_t data_bytes = 98;
  size_t alignment = 32;
  std::optional<uint64_t> tensor_count = std::nullopt;  // overrides the true counts when set
  std::optional<uint64_t> kv_count = std::nullopt;
};

std::vector<std::byte> build(const GgufSpec& spec) {
  Bytes b;
  b.put(spec.magic).put(spec.version);
  b.put<uint64_t>(spec.tensor_count.value_or(spec.tensors.size()));
  b.put<uint64_t>(spec.kv_count.value_or(spec.kvs.size()));
  for (const Bytes& kv : spec.kvs) b.append(kv);
  for (const TensorSpec& t : spec.tensors) {
    b.str(t.name).put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (uint64_t d : t.ne) b.put(d);
    b.put(t.type).put(t.offset);
  }
  b.pad_to(spec.alignment);
  for (uint64_t i = 0; i < spec.data_bytes; ++i) b.put<uint8_t>(static_cast<uint8_t>(i * 37 + 11));
  return std::move(b.data());
}

class GgufCorrupt : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("visikv_gguf_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path write(const GgufSpec& spec, const std::string& name = "test.gguf") {
    return write(build(spec), name);
  }
  fs::path write(std::span<const std::byte> bytes, const std::string& name = "test.gguf") {
    const fs::path path = dir_ / name;
    write_bytes(path, bytes);
    return path;
  }
  void expect_open_error(const GgufSpec& spec, std::string_view word) {
    const fs::path path = write(spec);
    expect_error([&] { GgufFile file(path); }, word);
  }

  fs::path dir_;
};

// ---- the fixture written by gguf.GGUFWriter ----

TEST(GgufFixture, MetadataMatchesGgufReader) {
  const GgufFile file(kFixtures / "quants.gguf");
  const json expected = read_json(kFixtures / "quants.expected.json");
  EXPECT_EQ(file.version(), expected["version"].get<uint32_t>());
  EXPECT_EQ(file.alignment(), 64u);
  EXPECT_EQ(file.metadata().size(), expected["metadata"].size());
  for (const auto& [key, value] : expected["metadata"].items()) {
    ASSERT_TRUE(file.metadata().contains(key)) << key;
    EXPECT_EQ(file.metadata()[key], value) << key << ": got " << file.metadata()[key].dump();
  }
  // Unsigned 64-bit values keep their full range; float32 values keep their exact value.
  EXPECT_EQ(file.metadata()["test.uint64"].get<uint64_t>(), 9223372036854775813ull);
  EXPECT_EQ(file.metadata()["test.float32"].get<float>(), 0.1f);
  EXPECT_EQ(file.metadata()["test.string"].get<std::string>(),
            "h\xc3\xa9llo w\xc3\xb6rld \xe2\x98\x83");
  EXPECT_EQ(file.metadata()["test.array_nested"], json::parse("[[1,2],[3],[4,5,6]]"));
}

TEST(GgufFixture, TensorsMatchGgufReader) {
  const GgufFile file(kFixtures / "quants.gguf");
  const json expected = read_json(kFixtures / "quants.expected.json")["tensors"];
  ASSERT_EQ(file.tensors().size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    const TensorRef& tensor = file.tensors()[i];
    EXPECT_EQ(tensor.name, expected[i]["name"].get<std::string>());
    EXPECT_EQ(tensor.shape, expected[i]["shape"].get<std::vector<int64_t>>()) << tensor.name;
    EXPECT_EQ(dtype_name(tensor.dtype), expected[i]["type"].get<std::string>());
    EXPECT_EQ(tensor.data.size(), expected[i]["bytes"].get<size_t>()) << tensor.name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(tensor.data.data()) % 64, 0u)
        << tensor.name << " is not at a 64-byte aligned file offset";
    EXPECT_EQ(file.find(tensor.name), &tensor);
  }
  EXPECT_EQ(file.find("no.such.tensor"), nullptr);
  expect_error([&] { (void)file.tensor("no.such.tensor"); }, "not found");
  EXPECT_EQ(file.tensor("f.F32").shape, (std::vector<int64_t>{2, 3, 4, 8}));
}

TEST(GgufFixture, MovedFileKeepsViewsValid) {
  GgufFile original(kFixtures / "quants.gguf");
  const std::vector<float> before = to_float(original.tensor("q.Q6_K"));
  GgufFile moved(std::move(original));
  EXPECT_EQ(to_float(moved.tensor("q.Q6_K")), before);
  GgufFile assigned(kFixtures / "quants.gguf");
  assigned = std::move(moved);
  EXPECT_EQ(to_float(assigned.tensor("q.Q6_K")), before);
}

TEST_F(GgufCorrupt, VersionTwoIsRead) {
  std::vector<std::byte> bytes = read_bytes(kFixtures / "quants.gguf");
  const uint32_t two = 2;
  std::memcpy(bytes.data() + 4, &two, 4);  // v2 and v3 share the little-endian layout
  const GgufFile file(write(bytes));
  EXPECT_EQ(file.version(), 2u);
  EXPECT_EQ(file.tensors().size(), 11u);
}

// ---- the default model ----

fs::path default_model_path() {
  if (const char* env = std::getenv("VISIKV_DEFAULT_GGUF"); env != nullptr && *env != '\0') {
    return env;
  }
  return fs::path(VISIKV_SOURCE_DIR) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

TEST(GgufDefaultModel, OpensWithExpectedContents) {
  const fs::path path = default_model_path();
  ASSERT_TRUE(fs::exists(path)) << "default model GGUF not found at " << path
                                << ": run scripts/setup.sh (or set VISIKV_DEFAULT_GGUF)";
  const json expected = read_json(kFixtures / "smollm2_q4_1.expected.json");
  const auto start = std::chrono::steady_clock::now();
  const GgufFile file(path);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  RecordProperty("open_seconds", std::to_string(seconds));

  EXPECT_EQ(file.version(), expected["version"].get<uint32_t>());
  EXPECT_EQ(file.tensors().size(), expected["tensor_count"].get<size_t>());
  EXPECT_EQ(file.tensors().size(), 272u);
  EXPECT_EQ(file.metadata().size(), expected["kv_count"].get<size_t>());
  EXPECT_EQ(file.metadata()["general.architecture"], "llama");
  EXPECT_EQ(file.metadata()["llama.block_count"], expected["block_count"]);
  const json& tokens = file.metadata()["tokenizer.ggml.tokens"];
  ASSERT_TRUE(tokens.is_array());
  EXPECT_EQ(tokens.size(), expected["token_count"].get<size_t>());
  EXPECT_EQ(tokens[1000], expected["token_1000"]);
  EXPECT_EQ(file.metadata()["llama.attention.layer_norm_rms_epsilon"].get<float>(), 1e-5f);

  for (const json& entry : expected["tensors"]) {
    const TensorRef& tensor = file.tensor(entry["name"].get<std::string>());
    SCOPED_TRACE(tensor.describe());
    EXPECT_EQ(tensor.shape, entry["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ(dtype_name(tensor.dtype), entry["type"].get<std::string>());
    if (!entry.contains("row")) continue;
    std::vector<float> row(static_cast<size_t>(tensor.row_size()));
    dequantize(tensor.dtype, tensor.row(entry["row"].get<int64_t>()), row);
    const auto expected_row = entry["row_values"].get<std::vector<float>>();
    ASSERT_EQ(row.size(), expected_row.size());
    for (size_t i = 0; i < row.size(); ++i) ASSERT_EQ(row[i], expected_row[i]) << "element " << i;
  }
}

// ---- corrupt files ----

TEST_F(GgufCorrupt, HandBuiltValidFileOpens) {
  const GgufFile file(write(GgufSpec{}));
  ASSERT_EQ(file.tensors().size(), 2u);
  EXPECT_EQ(file.tensor("a").shape, (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(file.tensor("b").dtype, DType::Q8_0);
  EXPECT_EQ(file.tensor("b").data.size(), 34u);
  EXPECT_EQ(file.metadata()["x.count"], 7);
}

TEST_F(GgufCorrupt, EmptyFile) {
  const fs::path path = write(std::vector<std::byte>{});
  expect_error([&] { GgufFile file(path); }, "magic");
}

TEST_F(GgufCorrupt, BadMagic) { expect_open_error({.magic = 0x46554746}, "magic"); }

TEST_F(GgufCorrupt, VersionOne) { expect_open_error({.version = 1}, "unsupported GGUF version 1"); }

TEST_F(GgufCorrupt, VersionNinetyNine) { expect_open_error({.version = 99}, "version 99"); }

TEST_F(GgufCorrupt, AbsurdTensorCount) {
  expect_open_error({.tensor_count = uint64_t{1} << 40}, "tensor count");
  expect_open_error({.tensor_count = std::numeric_limits<uint64_t>::max()}, "tensor count");
}

TEST_F(GgufCorrupt, AbsurdKeyValueCount) {
  expect_open_error({.kv_count = uint64_t{1} << 40}, "count");
  expect_open_error({.kv_count = std::numeric_limits<uint64_t>::max()}, "count");
}

TEST_F(GgufCorrupt, AbsurdStringLength) {
  Bytes key;
  key.put<uint64_t>(uint64_t{1} << 62);  // key length far past the end
  expect_open_error({.kvs = {key}}, "truncated");
  Bytes value;
  value.str("k").put<uint32_t>(kString).put<uint64_t>(std::numeric_limits<uint64_t>::max());
  expect_open_error({.kvs = {value}}, "truncated");
}

TEST_F(GgufCorrupt, AbsurdArrayCount) {
  Bytes array;
  array.str("k").put<uint32_t>(kArray).put<uint32_t>(kUint32).put<uint64_t>(uint64_t{1} << 61);
  expect_open_error({.kvs = {array}}, "array");
  Bytes strings;
  strings.str("k").put<uint32_t>(kArray).put<uint32_t>(kString).put<uint64_t>(uint64_t{1} << 40);
  expect_open_error({.kvs = {strings}}, "array");
}

TEST_F(GgufCorrupt, UnknownMetadataValueType) {
  Bytes kv;
  kv.str("k").put<uint32_t>(13).put<uint32_t>(0);
  expect_open_error({.kvs = {kv}}, "value type 13");
  Bytes array;
  array.str("k").put<uint32_t>(kArray).put<uint32_t>(77).put<uint64_t>(1);
  expect_open_error({.kvs = {array}}, "value type 77");
}

TEST_F(GgufCorrupt, DeeplyNestedArrays) {
  Bytes kv;
  kv.str("k").put<uint32_t>(kArray);
  for (int i = 0; i < 200; ++i) kv.put<uint32_t>(kArray).put<uint64_t>(1);
  kv.put<uint32_t>(kUint32).put<uint64_t>(1).put<uint32_t>(5);
  expect_open_error({.kvs = {kv}}, "nests");
}

TEST_F(GgufCorrupt, DuplicateKey) {
  expect_open_error({.kvs = {kv_u32("k", 1), kv_u32("k", 2)}}, "duplicate");
}

TEST_F(GgufCorrupt, BadAlignment) {
  expect_open_error({.kvs = {kv_u32("general.alignment", 3)}}, "alignment");
  expect_open_error({.kvs = {kv_u32("general.alignment", 0)}}, "alignment");
  expect_open_error({.kvs = {kv_string("general.alignment", "32")}}, "alignment");
}

TEST_F(GgufCorrupt, CustomAlignmentIsHonoured) {
  GgufSpec spec{.kvs = {kv_u32("general.alignment", 128)},
                .tensors = {{"a", {8, 2}, 0, 0}, {"b", {32}, 8, 128}},
                .data_bytes = 162,
                .alignment = 128};
  const GgufFile file(write(spec));
  EXPECT_EQ(file.alignment(), 128u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(file.tensor("b").data.data()) % 128, 0u);
  spec.tensors[1].offset = 64;  // aligned to 32 but not to 128
  expect_open_error(spec, "alignment");
}

TEST_F(GgufCorrupt, TensorOffsetPastTheEnd) {
  expect_open_error({.tensors = {{"a", {8, 2}, 0, 1 << 20}}}, "past the end");
  expect_open_error({.tensors = {{"a", {8, 2}, 0, uint64_t{1} << 63}}}, "past the end");
  // The last tensor overhangs the end of the data section by one byte.
  expect_open_error({.data_bytes = 97}, "past the end");
}

TEST_F(GgufCorrupt, MisalignedTensorOffset) {
  expect_open_error({.tensors = {{"a", {8, 2}, 0, 4}}}, "alignment");
}

TEST_F(GgufCorrupt, UnknownTensorType) {
  expect_open_error({.tensors = {{"a", {256}, 10, 0}}}, "unsupported GGUF type 10 (Q2_K)");
  expect_open_error({.tensors = {{"a", {32}, 1000, 0}}}, "unsupported GGUF type 1000");
  expect_open_error({.tensors = {{"a", {32}, 1000, 0}}}, "'a'");
}

TEST_F(GgufCorrupt, TooManyDimensions) {
  expect_open_error({.tensors = {{"a", {1, 1, 1, 1, 1, 1, 1, 1, 8}, 0, 0}}}, "dimensions");
}

TEST_F(GgufCorrupt, AbsurdDimensions) {
  expect_open_error({.tensors = {{"a", {uint64_t{1} << 62, 1 << 20}, 0, 0}}}, "absurd");
  expect_open_error({.tensors = {{"a", {std::numeric_limits<uint64_t>::max()}, 0, 0}}}, "absurd");
  expect_open_error({.tensors = {{"a", {uint64_t{1} << 40}, 0, 0}}}, "more data than the file");
}

TEST_F(GgufCorrupt, RowNotWholeBlocks) {
  expect_open_error({.tensors = {{"a", {48, 2}, 2, 0}}}, "blocks");  // Q4_0 rows of 48
}

TEST_F(GgufCorrupt, OverlappingTensors) {
  expect_open_error({.tensors = {{"a", {8, 2}, 0, 0}, {"b", {32}, 8, 32}}}, "overlap");
  expect_open_error({.tensors = {{"a", {8, 2}, 0, 0}, {"b", {8, 2}, 0, 0}}}, "overlap");
}

TEST_F(GgufCorrupt, DuplicateTensorName) {
  expect_open_error({.tensors = {{"a", {8, 2}, 0, 0}, {"a", {32}, 8, 64}}}, "duplicate");
}

TEST_F(GgufCorrupt, TruncatedFixtureAtEveryCut) {
  const std::vector<std::byte> bytes = read_bytes(kFixtures / "quants.gguf");
  ASSERT_GT(bytes.size(), 1000u);
  // Shrink one file step by step: far cheaper than writing thousands of files.
  const fs::path path = write(bytes, "cut.gguf");
  const size_t last_cut = (bytes.size() - 1) / 7 * 7;
  for (size_t cut = last_cut;; cut -= 7) {
    fs::resize_file(path, cut);
    try {
      GgufFile file(path);
      ADD_FAILURE() << "truncated at " << cut << " of " << bytes.size() << " bytes but opened";
    } catch (const Error&) {
    }
    if (cut == 0) break;
  }
}

TEST_F(GgufCorrupt, TruncatedHandBuiltAtEveryByte) {
  GgufSpec spec;
  Bytes array;
  array.str("arr").put<uint32_t>(kArray).put<uint32_t>(kString).put<uint64_t>(2).str("xy").str("z");
  spec.kvs.push_back(array);
  const std::vector<std::byte> bytes = build(spec);
  ASSERT_NO_THROW(GgufFile(write(bytes)));
  const fs::path path = write(bytes, "cut.gguf");
  for (size_t cut = bytes.size(); cut-- > 0;) {
    fs::resize_file(path, cut);
    EXPECT_THROW(GgufFile{path}, Error) << "cut at " << cut;
  }
}

TEST_F(GgufCorrupt, MissingFile) {
  expect_error([&] { GgufFile file(dir_ / "absent.gguf"); }, "absent.gguf");
}

}  // namespace
}  // namespace visikv

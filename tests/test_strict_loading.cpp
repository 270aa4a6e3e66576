// Strict loading: the committed mutants of tests/fixtures/mutants/ (one small edit of a good
// fixture each; see its README.md) must each fail with an error that names the file, the key or
// tensor, and the problem, where a lenient reader would compute garbage or crash.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "test_support.h"
#include "visikv/core/error.h"
#include "visikv/formats/gguf.h"
#include "visikv/formats/json_file.h"
#include "visikv/formats/safetensors.h"
#include "visikv/model/config.h"
#include "visikv/model/model.h"
#include "visikv/tokenizer/tokenizer.h"

namespace visikv {
namespace {

using namespace visikv::test_support;
namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = VISIKV_FIXTURES;
const fs::path kMutants = kFixtures / "mutants";

// Expects `action` to throw a visikv::Error whose message contains every word.
void expect_error(const std::function<void()>& action,
                  std::initializer_list<std::string_view> words) {
  const std::string message = error_of(action);
  ASSERT_NE(message, "<no error>") << "expected an error mentioning '" << *words.begin() << "'";
  for (const std::string_view word : words)
    EXPECT_NE(message.find(word), std::string::npos)
        << "message lacks '" << word << "': " << message;
}

fs::path mutant(const std::string& name) {
  const fs::path path = kMutants / name;
  EXPECT_TRUE(fs::exists(path)) << path << " missing: run tests/fixtures/mutants/make_mutants.py";
  return path;
}

void expect_load_error(const std::string& name, std::initializer_list<std::string_view> words) {
  SCOPED_TRACE(name);
  const fs::path path = mutant(name);
  expect_error([&] { Model::load(path.string()); }, words);
  // Every message names the file.
  EXPECT_NE(error_of([&] { Model::load(path.string()); }).find(name), std::string::npos);
}

// ---- every tensor bound to a role ----

TEST(UnknownTensors, GgufOutputNameBitFlip) {
  // Read leniently, the missing output.weight made the head tied to the embeddings.
  expect_load_error("llama_q8_0.output_name_bitflip.gguf",
                    {"1 of the file's 21 tensors", "match no role", "'nutput.weight' [512, 64]"});
}

TEST(UnknownTensors, GgufBlockCountBelowTheFile) {
  // block_count 1 on a two-layer file: layer 1's nine tensors are listed (the first eight).
  expect_load_error("llama_q8_0.block_count_1.gguf",
                    {"9 of the file's 21 tensors", "'blk.1.attn_k.weight'", "(1 more)"});
}

TEST(UnknownTensors, GgufRequiredBiasNameBitFlip) {
  // GPT-2's biases are required: a misspelt one is missing, not silently dropped.
  expect_load_error("gpt2.ffn_up_bias_bitflip.gguf", {"'blk.0.ffn_up.bias'", "missing"});
}

// Appends tensors to a safetensors file (F32 zeros of the given shapes), keeping it valid.
void add_tensors(const fs::path& path, const std::vector<std::pair<std::string, int64_t>>& extra,
                 const std::string& dtype = "F32", size_t element_bytes = 4) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t length;
  std::memcpy(&length, bytes.data(), 8);
  json header = json::parse(bytes.substr(8, length));
  std::string data = bytes.substr(8 + length);
  for (const auto& [name, size] : extra) {
    header[name] = {{"dtype", dtype},
                    {"shape", {size}},
                    {"data_offsets", {data.size(), data.size() + element_bytes * size}}};
    data.append(element_bytes * static_cast<size_t>(size), '\0');
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  length = text.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &length, 8);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << out << text << data;
}

class HfExtraTensors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = temp_path("visikv_strict_hf");
    fs::remove_all(dir_);
    fs::copy(kFixtures / "models" / "llama", dir_, fs::copy_options::recursive);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(HfExtraTensors, RecomputedBuffersAreAccepted) {
  // Older checkpoints store the rotary inverse frequencies; the model recomputes them.
  add_tensors(dir_ / "model.safetensors", {{"model.layers.0.self_attn.rotary_emb.inv_freq", 8},
                                           {"model.layers.1.self_attn.rotary_emb.inv_freq", 8}});
  EXPECT_NO_THROW(Model::load(dir_.string()));
}

TEST_F(HfExtraTensors, BiasTheConfigDoesNotUseIsRejected) {
  // attention_bias is false: a q_proj bias in the file would be ignored.
  add_tensors(dir_ / "model.safetensors", {{"model.layers.0.self_attn.q_proj.bias", 64}});
  expect_error([&] { Model::load(dir_.string()); },
               {"match no role", "'model.layers.0.self_attn.q_proj.bias' [64]"});
}

TEST(HfUnreadDtypes, BooleanMaskBuffersOfGptNeoxAreAccepted) {
  // Pythia checkpoints store each layer's causal mask as BOOL: a dtype visikv does not compute
  // with, checked for its place in the file and then, as a recomputed buffer, left unused.
  const fs::path dir = temp_path("visikv_strict_neox");
  fs::remove_all(dir);
  fs::copy(kFixtures / "models" / "gpt_neox_parallel", dir, fs::copy_options::recursive);
  add_tensors(dir / "model.safetensors",
              {{"gpt_neox.layers.0.attention.bias", 64}, {"gpt_neox.layers.1.attention.bias", 64}},
              "BOOL", 1);
  EXPECT_NO_THROW(Model::load(dir.string()));
  // Anything else of such a dtype is an unknown tensor, named with its dtype.
  add_tensors(dir / "model.safetensors", {{"gpt_neox.layers.0.attention.step", 2}}, "I64", 8);
  expect_error([&] { Model::load(dir.string()); },
               {"match no role", "'gpt_neox.layers.0.attention.step' [2] I64"});
  fs::remove_all(dir);
}

// ---- GGUF tensors cover the data section ----

TEST(GgufLayout, TensorCountOneShort) {
  // The data section then starts one description early and every tensor reads shifted bytes.
  const fs::path path = mutant("llama_q8_0.tensor_count_short.gguf");
  expect_error([&] { GgufFile file(path); },
               {"llama_q8_0.tensor_count_short.gguf", "bytes [114432, 149312)",
                "belong to no tensor", "tensor count"});
}

// ---- config numbers: GGUF metadata ----

TEST(GgufConfigNumbers, ContextLength) {
  expect_load_error("llama_q8_0_metadata.context_length_minus1.gguf",
                    {"'llama.context_length' = -1", "out of range"});
  expect_load_error("llama_q8_0_metadata.context_length_zero.gguf",
                    {"'llama.context_length' = 0", "out of range"});
  expect_load_error("llama_q8_0_metadata.context_length_u64max.gguf",
                    {"'llama.context_length' = 18446744073709551615", "out of range"});
}

TEST(GgufConfigNumbers, IntegerKeyStoredAsFloat) {
  expect_load_error("llama_q8_0_metadata.block_count_float.gguf",
                    {"'llama.block_count'", "expected an integer, got 2.0"});
}

TEST(GgufConfigNumbers, RopeAndNorm) {
  expect_load_error("llama_q8_0_metadata.rope_freq_base_nan.gguf",
                    {"'llama.rope.freq_base' = nan", "positive finite"});
  expect_load_error("llama_q8_0_metadata.rope_freq_base_zero.gguf",
                    {"'llama.rope.freq_base' = 0", "positive finite"});
  expect_load_error("llama_q8_0_metadata.rope_linear_factor_zero.gguf",
                    {"'llama.rope.scaling.factor' = 0", "positive finite"});
  expect_load_error("llama_q8_0_metadata.rms_epsilon_inf.gguf",
                    {"'llama.attention.layer_norm_rms_epsilon' = inf", "positive finite"});
  expect_load_error("llama_q8_0_metadata.sliding_window_negative.gguf",
                    {"'llama.attention.sliding_window' = -8", "non-negative"});
}

TEST(GgufConfigNumbers, TokenIdOutsideTheVocabulary) {
  expect_load_error("llama_q8_0_metadata.bos_token_id_512.gguf",
                    {"tokenizer.ggml.bos_token_id = 512", "outside the vocabulary of 512"});
}

TEST(GgufConfigNumbers, NanTokenScore) {
  // The metadata-only file has no tensors to bind, so the tokenizer is built directly.
  const GgufFile file(mutant("llama_q8_0_metadata.score_nan.gguf"));
  expect_error([&] { Tokenizer::from_gguf_metadata(file.metadata()); },
               {"tokenizer.ggml.scores[300] = nan", "not a finite number"});
}

// ---- config numbers: config.json and generation_config.json ----

void expect_config_error(const std::string& config, const std::string& generation,
                         std::initializer_list<std::string_view> words) {
  SCOPED_TRACE(config + " " + generation);
  const json hf = read_json_file(config.empty() ? kFixtures / "models" / "llama" / "config.json"
                                                : mutant("hf_config/" + config));
  const json gen = generation.empty() ? json() : read_json_file(mutant("hf_config/" + generation));
  expect_error([&] { config_from_hf(hf, gen, kMutants / "hf_config"); }, words);
}

TEST(HfConfigNumbers, IntegersMustBeJsonIntegers) {
  expect_config_error("hidden_size_float.config.json", "",
                      {"config.json", "'hidden_size'", "expected an integer, got 64.5"});
  expect_config_error("", "bos_token_id_float.generation_config.json",
                      {"generation_config.json", "'bos_token_id'", "expected an integer, got 1.0"});
}

TEST(HfConfigNumbers, Ranges) {
  expect_config_error("max_position_embeddings_zero.config.json", "",
                      {"'max_position_embeddings' = 0", "out of range"});
  expect_config_error("rope_theta_negative.config.json", "",
                      {"'rope_theta' = -10000", "positive finite"});
  expect_config_error("rms_norm_eps_zero.config.json", "",
                      {"'rms_norm_eps' = 0", "positive finite"});
  expect_config_error("sliding_window_negative.config.json", "",
                      {"'sliding_window' = -8", "non-negative"});
  expect_config_error("rotary_pct_above_one.config.json", "",
                      {"'rotary_pct' = 1.5", "fraction in (0, 1]"});
}

TEST(HfConfigNumbers, RopeScaling) {
  expect_config_error("rope_linear_factor_zero.config.json", "",
                      {"rope_parameters", "'factor' = 0", "positive finite"});
  expect_config_error("rope_llama3_factor_negative.config.json", "",
                      {"rope_parameters", "'factor' = -8", "positive finite"});
  expect_config_error("rope_llama3_equal_freq_factors.config.json", "",
                      {"high_freq_factor 1 must exceed low_freq_factor 1"});
}

TEST(HfConfigNumbers, TokenIdsOutsideTheVocabulary) {
  expect_config_error("eos_token_id_512.config.json", "",
                      {"config.json", "'eos_token_id' names token 512", "vocabulary of 512"});
  expect_config_error("", "eos_token_id_512.generation_config.json",
                      {"generation_config.json", "'eos_token_id' names token 512"});
}

// ---- JSON nesting bounded before parsing ----

TEST(JsonDepth, DeepGenerationConfig) {
  expect_error([] { read_json_file(mutant("hf_config/eos_token_id_deep.generation_config.json")); },
               {"eos_token_id_deep.generation_config.json", "more than 128 levels deep"});
}

TEST(JsonDepth, DeepTokenizerPreTokenizer) {
  expect_error([] { Tokenizer::from_hf_json(mutant("deep_pre_tokenizer/tokenizer.json")); },
               {"deep_pre_tokenizer", "tokenizer.json", "more than 128 levels deep"});
}

TEST(JsonDepth, FarDeeperTextFailsWithoutRecursion) {
  // 200,000 levels overflowed the stack in nlohmann's copy and in the tokenizer's builder.
  const std::string text = std::string(200'000, '[') + std::string(200'000, ']');
  expect_error([&] { parse_json(text, "deep.json"); }, {"deep.json", "128 levels"});
}

TEST(JsonDepth, BracketsInStringsDoNotCount) {
  const std::string brackets(1000, '[');
  const std::string text = R"({"a": ")" + brackets + R"(\"[", "b": [[1]]})";
  EXPECT_EQ(parse_json(text, "strings.json")["b"], json::parse("[[1]]"));
  EXPECT_EQ(parse_json(std::string(128, '[') + std::string(128, ']'), "x").dump().size(), 256u);
}

TEST(JsonDepth, MalformedAndNonRegularFiles) {
  expect_error([] { parse_json("{\"a\": ", "broken.json"); }, {"broken.json", "malformed JSON"});
  expect_error([] { read_json_file(kMutants); }, {"mutants", "not a regular file"});
}

// ---- safetensors as strict as the reference library ----

void expect_safetensors_error(const std::string& name,
                              std::initializer_list<std::string_view> words) {
  SCOPED_TRACE(name);
  const fs::path path = mutant(name);
  expect_error([&] { SafetensorsFile file(path); }, words);
  EXPECT_NE(error_of([&] { SafetensorsFile file(path); }).find(name), std::string::npos);
}

TEST(SafetensorsStrict, HeaderLengthOffByOne) {
  // +1: the header swallows the first data byte; -1: the padding space becomes data.
  expect_safetensors_error("floats.header_length_plus1.safetensors",
                           {"follows the JSON object", "header length 305"});
  expect_safetensors_error("floats.header_length_minus1.safetensors",
                           {"bytes [74, 75)", "belong to no tensor", "header length 303"});
}

TEST(SafetensorsStrict, NulAfterHeaderJson) {
  expect_safetensors_error("floats.nul_after_header.safetensors",
                           {"byte 303 (0x00) follows the JSON object", "space padding"});
}

TEST(SafetensorsStrict, GapBetweenTensors) {
  expect_safetensors_error(
      "floats.gap.safetensors",
      {"bytes [4, 8)", "belong to no tensor", "between tensors 'scalar_f32' and 'weight_f32'"});
}

TEST(SafetensorsStrict, TrailingBytesAfterLastTensor) {
  expect_safetensors_error("floats.trailing_bytes.safetensors",
                           {"bytes [74, 78)", "belong to no tensor", "after tensor 'bias_f16'"});
}

}  // namespace
}  // namespace visikv

// Tokenizer tests against oracles written by Hugging Face tokenizers/transformers (fixtures made by
// scripts/make_tokenizer_fixtures.py) and llama.cpp's vocabulary test cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "test_support.h"
#include "visikv/core/error.h"
#include "visikv/eval/text_input.h"
#include "visikv/formats/gguf.h"
#include "visikv/tokenizer/nfc.h"
#include "visikv/tokenizer/tokenizer.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

namespace fs = std::filesystem;
using nlohmann::json;

const fs::path kFixtures = fs::path(VISIKV_FIXTURES) / "tokenizer";

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path.string());
  std::stringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

fs::path shared_data_dir() { return fs::path(VISIKV_SOURCE_DIR) / ".." / "shared" / "data"; }

fs::path wikitext_path() {
  if (const char* env = std::getenv("VISIKV_WIKITEXT"); env != nullptr && *env != '\0') return env;
  return shared_data_dir() / "wikitext-103-test.txt";
}

fs::path vocab_dir() {
  if (const char* env = std::getenv("VISIKV_TOKENIZER_VOCABS"); env != nullptr && *env != '\0')
    return env;
  return shared_data_dir() / "tokenizers";
}

std::optional<fs::path> default_model_path() {
  if (const char* env = std::getenv("VISIKV_DEFAULT_MODEL"); env != nullptr && *env != '\0')
    return fs::path(env);
  const fs::path path = fs::path(VISIKV_SOURCE_DIR) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
  if (fs::exists(path)) return path;
  return std::nullopt;
}

uint64_t fnv1a64(const std::vector<int32_t>& ids) {
  uint64_t hash = 0xCBF29CE484222325ull;
  for (const int32_t id : ids) {
    const auto value = static_cast<uint32_t>(id);
    for (int shift = 0; shift < 32; shift += 8) {
      hash ^= (value >> shift) & 0xFF;
      hash *= 0x100000001B3ull;
    }
  }
  return hash;
}

// The WikiText test file cut as the fixture script does: 500 lines per chunk, each line keeping
// its '\n'.
std::vector<std::string> wikitext_chunks(std::size_t lines_per_chunk) {
  const fs::path path = wikitext_path();
  if (!fs::exists(path)) {
    ADD_FAILURE() << "WikiText-103 test text not found at " << path
                  << "; set VISIKV_WIKITEXT to wikitext-103-test.txt";
    return {};
  }
  const std::string text = read_file(path);
  std::vector<std::string> chunks;
  std::size_t pos = 0, lines = 0;
  std::string chunk;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    end = end == std::string::npos ? text.size() : end + 1;
    chunk.append(text, pos, end - pos);
    pos = end;
    if (++lines == lines_per_chunk) {
      chunks.push_back(std::move(chunk));
      chunk.clear();
      lines = 0;
    }
  }
  if (!chunk.empty()) chunks.push_back(std::move(chunk));
  return chunks;
}

Tokenizer load_gguf_tokenizer(const fs::path& path) {
  GgufFile gguf(path);
  return Tokenizer::from_gguf_metadata(gguf.metadata());
}

struct Fixture {
  json expected;
  std::optional<Tokenizer> tokenizer;
};

Fixture load_fixture(const std::string& name) {
  Fixture f;
  f.expected = json::parse(read_file(kFixtures / name / "expected.json"));
  const std::string source = f.expected["source"];
  if (source == "tokenizer.json") {
    f.tokenizer = Tokenizer::from_hf_json(kFixtures / name / "tokenizer.json");
  } else {
    const fs::path gguf = vocab_dir() / source.substr(std::string("gguf:").size());
    if (!fs::exists(gguf)) {
      ADD_FAILURE() << "test vocabulary " << gguf
                    << " not found; set VISIKV_TOKENIZER_VOCABS to the folder holding it";
      return f;
    }
    f.tokenizer = load_gguf_tokenizer(gguf);
  }
  return f;
}

std::vector<int32_t> ids_of(const json& list) { return list.get<std::vector<int32_t>>(); }

void check_strings(const Tokenizer& tok, const json& expected, const std::string& label) {
  const bool byte_level = tok.kind().find("byte-level") != std::string::npos;
  for (const json& item : expected["strings"]) {
    const std::string text = item["text"];
    SCOPED_TRACE(label + ": text '" + text + "'");
    const std::vector<int32_t> ids = tok.encode(text, false);
    EXPECT_EQ(ids, ids_of(item["ids"]));
    EXPECT_EQ(tok.encode(text, true), ids_of(item["ids_with_special"]));
    EXPECT_EQ(tok.decode(ids_of(item["ids"])), item["decoded"].get<std::string>());
    EXPECT_EQ(tok.decode(ids_of(item["ids_with_special"])),
              item["decoded_with_special"].get<std::string>());
    // Round trip (to the NFC form for tokenizers that normalize), except where an lstrip added
    // token ("<mask>") swallowed a space.
    if (byte_level && text.find("<mask>") == std::string::npos) {
      const std::string want = tok.decode(ids) == text ? text : to_nfc(text);
      EXPECT_EQ(tok.decode(ids), want);
      // Streaming: the raw bytes of the tokens concatenate to the text.
      std::string streamed;
      for (const int32_t id : ids) streamed += tok.token_bytes(id);
      EXPECT_EQ(streamed, want);
    }
  }
}

void check_wikitext(const Tokenizer& tok, const json& expected, const std::string& label) {
  const json& wiki = expected["wikitext"];
  const std::vector<std::string> chunks = wikitext_chunks(wiki["chunk_lines"].get<std::size_t>());
  if (chunks.empty()) return;
  ASSERT_EQ(chunks.size(), wiki["chunks"].size()) << label;
  // Speed is bench/bench_tokenizer's business; here only the ids count.
  std::vector<std::vector<int32_t>> encoded;
  for (const std::string& chunk : chunks) encoded.push_back(tok.encode(chunk, false));

  EXPECT_EQ(encoded[0], ids_of(wiki["first_chunk_ids"])) << label << ": first chunk";
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    const json& want = wiki["chunks"][i];
    char hash[17];
    std::snprintf(hash, sizeof hash, "%016llx",
                  static_cast<unsigned long long>(fnv1a64(encoded[i])));
    EXPECT_EQ(encoded[i].size(), want["count"].get<std::size_t>()) << label << ": chunk " << i;
    EXPECT_EQ(std::string(hash), want["fnv1a64"].get<std::string>()) << label << ": chunk " << i;
  }
}

class TokenizerOracle : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerOracle, HardStringsMatchHuggingFace) {
  Fixture f = load_fixture(GetParam());
  ASSERT_TRUE(f.tokenizer.has_value());
  EXPECT_EQ(f.tokenizer->vocab_size(), f.expected["vocab_size"].get<int32_t>());
  check_strings(*f.tokenizer, f.expected, GetParam());
}

TEST_P(TokenizerOracle, WikiTextMatchesHuggingFace) {
  Fixture f = load_fixture(GetParam());
  ASSERT_TRUE(f.tokenizer.has_value());
  check_wikitext(*f.tokenizer, f.expected, GetParam());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TokenizerOracle,
                         ::testing::Values("gpt2_trained", "qwen2_trained", "llama3_trained",
                                           "spm_legacy_trained", "spm_metaspace_trained", "smollm2",
                                           "gpt2_gguf", "llama_spm_gguf"));

TEST(TokenizerDefaultModel, GgufMetadataMatchesHuggingFace) {
  const std::optional<fs::path> model = default_model_path();
  if (!model || !fs::exists(*model)) {
    GTEST_SKIP() << "default model GGUF not present (run scripts/setup.sh or set "
                    "VISIKV_DEFAULT_MODEL); its committed tokenizer.json is tested instead";
  }
  const Tokenizer tok = load_gguf_tokenizer(*model);
  EXPECT_EQ(tok.kind(), "byte-level BPE (smollm pre-tokenizer)");
  EXPECT_FALSE(tok.adds_bos());
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_TRUE(tok.is_special(2));
  EXPECT_FALSE(tok.is_special(100));
  const json expected = json::parse(read_file(kFixtures / "smollm2" / "expected.json"));
  check_strings(tok, expected, "smollm2 GGUF");
  check_wikitext(tok, expected, "smollm2 GGUF");
}

// Gemma-3-270M's vocabulary from its GGUF (an optional model), against the tokenizer
// transformers builds from the same file: runs of spaces, newlines and tabs and HTML tags are
// user-defined tokens matched whole, spaces become "▁" without a prefix space, BOS is added.
TEST(TokenizerGemma3, GgufMetadataMatchesHuggingFace) {
  const fs::path model = gemma3_model_path();
  if (!fs::exists(model))
    GTEST_SKIP() << "Gemma-3-270M not present at " << model << " (scripts/fetch_gemma3.sh)";
  const Tokenizer tok = load_gguf_tokenizer(model);
  const json expected = json::parse(read_file(kFixtures / "gemma3" / "expected.json"));
  EXPECT_EQ(expected["source"], "gguf:gemma3-model");
  EXPECT_TRUE(tok.adds_bos());
  EXPECT_EQ(tok.bos_id(), 2);
  EXPECT_EQ(tok.vocab_size(), expected["vocab_size"].get<int32_t>());
  check_strings(tok, expected, "gemma3 GGUF");
  check_wikitext(tok, expected, "gemma3 GGUF");
}

// ---- the leading tokens of a text (eval/text_input.h) ----

// Texts for the leading-token reader: WikiText-103 test as it is (many lines), the same as one
// long line, and a long line of multi-byte characters (cuts land inside UTF-8 sequences).
std::vector<std::pair<std::string, std::string>> leading_token_texts() {
  std::vector<std::pair<std::string, std::string>> texts;
  const fs::path path = wikitext_path();
  if (!fs::exists(path)) {
    ADD_FAILURE() << "WikiText-103 test text not found at " << path;
    return texts;
  }
  std::string wikitext = read_file(path);
  texts.emplace_back("WikiText-103 test", wikitext);
  std::replace(wikitext.begin(), wikitext.end(), '\n', ' ');
  texts.emplace_back("WikiText-103 test on one line", std::move(wikitext));
  std::string wide;
  for (int i = 0; i < 20000; ++i)
    wide += "Ünïcödé 日本語の文 🦙🦙 naïve café — ½ ";
  texts.emplace_back("multi-byte line", std::move(wide));
  return texts;
}

class LeadingTokens : public ::testing::TestWithParam<std::string> {};

// The first N tokens read from a growing leading piece equal the first N tokens of the whole text,
// for budgets from one token to past the text's end.
TEST_P(LeadingTokens, EqualTheWholeTextsFirstTokens) {
  std::optional<Tokenizer> tok;
  if (GetParam() == "default") {
    const std::optional<fs::path> model = default_model_path();
    if (!model || !fs::exists(*model)) {
      ADD_FAILURE() << "the default model is missing: run scripts/setup.sh";
      return;
    }
    tok = load_gguf_tokenizer(*model);
  } else {
    tok = Tokenizer::from_hf_json(kFixtures / GetParam() / "tokenizer.json");
  }
  for (const auto& [label, text] : leading_token_texts()) {
    SCOPED_TRACE(GetParam() + ", " + label);
    const std::vector<int32_t> whole = tok->encode(text, false);
    const int64_t n = static_cast<int64_t>(whole.size());
    ASSERT_GT(n, 50000);
    for (const int64_t needed :
         {int64_t{1}, int64_t{7}, kLeadingTokensMargin, kLeadingTokensMargin + 1, int64_t{500},
          int64_t{4096}, int64_t{30000}, n - 1, n, n + 1}) {
      const std::vector<int32_t> leading = leading_tokens(*tok, text, needed);
      ASSERT_EQ(static_cast<int64_t>(leading.size()), std::min(needed, n)) << needed;
      EXPECT_TRUE(std::equal(leading.begin(), leading.end(), whole.begin()))
          << "the first " << needed << " tokens differ from the whole text's";
    }
    // The rule the reader rests on, at cuts anywhere (in a word, in a character, between lines):
    // a piece's tokens that kLeadingTokensMargin more tokens follow are the whole text's.
    for (size_t cut = 1; cut < 32768; cut += 257) {
      const std::vector<int32_t> piece = tok->encode(std::string_view(text).substr(0, cut), false);
      const int64_t kept = static_cast<int64_t>(piece.size()) - kLeadingTokensMargin;
      if (kept <= 0) continue;
      EXPECT_TRUE(std::equal(piece.begin(), piece.begin() + kept, whole.begin()))
          << "a cut at byte " << cut << " changes tokens more than " << kLeadingTokensMargin
          << " tokens before it";
    }
  }
  EXPECT_TRUE(leading_tokens(*tok, "some text", 0).empty());
  EXPECT_NE(error_of([&] { leading_tokens(*tok, "some text", -1); }).find("negative"),
            std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, LeadingTokens,
                         ::testing::Values("default", "spm_legacy_trained", "spm_metaspace_trained",
                                           "qwen2_trained"));

// llama.cpp's vocabulary test: cases separated by "__ggml_vocab_test__" lines, one line of ids
// (as Hugging Face tokenizers produced them, without special tokens) per case.
void check_llama_cpp_vocab_cases(const std::string& name) {
  const fs::path gguf = vocab_dir() / name;
  ASSERT_TRUE(fs::exists(gguf)) << gguf << " not found; set VISIKV_TOKENIZER_VOCABS";
  const Tokenizer tok = load_gguf_tokenizer(gguf);
  const std::string inp = read_file(gguf.string() + ".inp");
  const std::string out = read_file(gguf.string() + ".out");

  // Each case is the lines before its separator line, joined with '\n'.
  std::vector<std::string> cases;
  std::vector<std::string> pending;
  std::istringstream input(inp);
  for (std::string line; std::getline(input, line);) {
    if (line != "__ggml_vocab_test__") {
      pending.push_back(line);
      continue;
    }
    std::string text;
    for (std::size_t k = 0; k < pending.size(); ++k) text += (k ? "\n" : "") + pending[k];
    cases.push_back(text);
    pending.clear();
  }
  std::vector<std::vector<int32_t>> expected;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream numbers(line);
    std::vector<int32_t> ids;
    for (int32_t id; numbers >> id;) ids.push_back(id);
    expected.push_back(std::move(ids));
  }
  ASSERT_EQ(cases.size(), expected.size()) << name;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(tok.encode(cases[i], false), expected[i])
        << name << " case " << i << ": '" << cases[i] << "'";
  }
}

TEST(TokenizerLlamaCppVocab, Gpt2) { check_llama_cpp_vocab_cases("ggml-vocab-gpt-2.gguf"); }
TEST(TokenizerLlamaCppVocab, LlamaSpm) { check_llama_cpp_vocab_cases("ggml-vocab-llama-spm.gguf"); }

TEST(TokenizerLlamaCppVocab, LlamaSpmSpecialsAndStreaming) {
  const fs::path gguf = vocab_dir() / "ggml-vocab-llama-spm.gguf";
  ASSERT_TRUE(fs::exists(gguf)) << gguf << " not found; set VISIKV_TOKENIZER_VOCABS";
  const Tokenizer tok = load_gguf_tokenizer(gguf);
  EXPECT_EQ(tok.kind(), "SentencePiece BPE (scores, byte fallback)");
  EXPECT_TRUE(tok.adds_bos());
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_TRUE(tok.is_special(1));
  EXPECT_TRUE(tok.is_special(2));
  EXPECT_FALSE(tok.is_special(15043));
  EXPECT_EQ(tok.encode("Hello world"), (std::vector<int32_t>{1, 15043, 3186}));
  // "▁Hello" streams as " Hello"; byte tokens stream as their raw bytes.
  EXPECT_EQ(tok.token_bytes(15043), " Hello");
  EXPECT_EQ(tok.token_bytes(13), "\n");  // <0x0A>
  const std::vector<int32_t> llama = tok.encode(" this is 🦙.cpp", false);
  std::string streamed;
  for (const int32_t id : llama) streamed += tok.token_bytes(id);
  EXPECT_EQ(streamed, "  this is 🦙.cpp");  // the leading-space rule adds one space
  EXPECT_EQ(tok.decode(llama), " this is 🦙.cpp");
}

// GPT-NeoX's vocabulary has no tokenizer.ggml.pre: llama.cpp's "default" regexes apply.
TEST(TokenizerLlamaCppVocab, GptNeoxDefaultPreTokenizer) {
  const fs::path gguf = vocab_dir() / "ggml-vocab-gpt-neox.gguf";
  ASSERT_TRUE(fs::exists(gguf)) << gguf << " not found; set VISIKV_TOKENIZER_VOCABS";
  const Tokenizer tok = load_gguf_tokenizer(gguf);
  EXPECT_EQ(tok.kind(), "byte-level BPE (default pre-tokenizer)");
  EXPECT_FALSE(tok.adds_bos());
  EXPECT_EQ(tok.encode("Hello world"), (std::vector<int32_t>{12092, 1533}));
  EXPECT_TRUE(tok.is_special(0));  // <|endoftext|>
  const std::string text = "Mixed: 12345, naïve 🦙 <|endoftext|>\n\n  done";
  const std::vector<int32_t> ids = tok.encode(text);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 0), ids.end());
  EXPECT_EQ(tok.decode(ids), text);
}

TEST(Tokenizer, ConcurrentEncodingAgrees) {
  const Tokenizer tok = Tokenizer::from_hf_json(kFixtures / "gpt2_trained" / "tokenizer.json");
  const std::string text = "The quick brown fox jumps over the lazy dog 1234 times. ";
  const std::vector<int32_t> want = tok.encode(text);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      bool same = true;
      for (int i = 0; i < 200; ++i) same = same && tok.encode(text) == want;
      ok[t] = same;
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < 4; ++t) EXPECT_TRUE(ok[t]) << "thread " << t;
}

// Text that is not valid UTF-8 is still tokenized without losing a byte: byte-level BPE maps
// every byte, SentencePiece-style BPE falls back to byte tokens. Decoding gives valid UTF-8.
TEST(Tokenizer, ArbitraryBytesSurvive) {
  const Tokenizer byte_level =
      Tokenizer::from_hf_json(kFixtures / "gpt2_trained" / "tokenizer.json");
  const Tokenizer spm =
      Tokenizer::from_hf_json(kFixtures / "spm_legacy_trained" / "tokenizer.json");
  std::mt19937 rng(1234);
  for (int round = 0; round < 300; ++round) {
    std::string bytes(rng() % 64, '\0');
    for (char& b : bytes) {
      // Mostly ASCII and UTF-8 lead/continuation bytes, so that sequences are often almost valid.
      const unsigned pick = rng() % 4;
      b = static_cast<char>(pick == 0   ? 0x20 + rng() % 0x5F
                            : pick == 1 ? 0x80 + rng() % 0x40
                                        : rng() % 256);
    }
    SCOPED_TRACE("round " + std::to_string(round));
    const std::vector<int32_t> ids = byte_level.encode(bytes, false);
    std::string streamed;
    for (const int32_t id : ids) streamed += byte_level.token_bytes(id);
    EXPECT_EQ(streamed, bytes);
    EXPECT_EQ(byte_level.decode(ids), utf8_lossy(bytes));

    if (bytes.find("\xE2\x96\x81") != std::string::npos || bytes.find("<s>") != std::string::npos ||
        bytes.find("</s>") != std::string::npos || bytes.find("<unk>") != std::string::npos)
      continue;
    const std::vector<int32_t> spm_ids = spm.encode(bytes, false);
    streamed.clear();
    for (const int32_t id : spm_ids) streamed += spm.token_bytes(id);
    EXPECT_EQ(streamed, bytes.empty() ? "" : " " + bytes);
    EXPECT_TRUE(is_valid_utf8(spm.decode(spm_ids)));
  }
}

// NFC against Python's unicodedata on strings dense in combining marks, Hangul jamo and
// composition exclusions.
TEST(TokenizerNfc, MatchesUnicodedata) {
  const json cases = json::parse(read_file(kFixtures / "nfc_cases.json"));
  ASSERT_FALSE(cases["cases"].empty());
  for (const json& item : cases["cases"]) {
    const std::string text = item["text"];
    EXPECT_EQ(to_nfc(text), item["nfc"].get<std::string>()) << "text '" << text << "'";
  }
  EXPECT_EQ(to_nfc("plain ASCII"), "plain ASCII");
  EXPECT_EQ(to_nfc("bad \xFF\xC3 e\xCC\x81"), "bad \xFF\xC3 \xC3\xA9");  // bytes kept
}

TEST(Tokenizer, OutOfRangeIdIsAnError) {
  const Tokenizer tok = Tokenizer::from_hf_json(kFixtures / "gpt2_trained" / "tokenizer.json");
  const std::vector<int32_t> bad{5, tok.vocab_size()};
  EXPECT_THROW(tok.decode(bad), Error);
  EXPECT_THROW(tok.token_bytes(-1), Error);
  EXPECT_FALSE(tok.is_special(-3));
}

// ---- bad input ----

json small_bpe() {
  return json::parse(R"({
    "added_tokens": [],
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "post_processor": null,
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "Ġ": 3},
              "merges": ["a b"]}
  })");
}

TEST(TokenizerBadInput, SmallHandWrittenJsonWorks) {
  const Tokenizer tok = Tokenizer::from_hf_json_value(small_bpe(), "small");
  EXPECT_EQ(tok.encode("ab a b"), (std::vector<int32_t>{2, 3, 0, 3, 1}));
  json pairs = small_bpe();
  pairs["model"]["merges"] = json::parse(R"([["a", "b"]])");
  EXPECT_EQ(Tokenizer::from_hf_json_value(pairs, "pairs").encode("ab"), std::vector<int32_t>{2});
}

TEST(TokenizerBadInput, MalformedJson) {
  const fs::path path = fs::temp_directory_path() / "visikv_test_bad_tokenizer.json";
  std::ofstream(path) << "{\"model\": {\"type\": \"BPE\", \"vocab\": {";
  const std::string message = error_of([&] { Tokenizer::from_hf_json(path); });
  EXPECT_NE(message.find("malformed JSON"), std::string::npos) << message;
  EXPECT_NE(message.find(path.filename().string()), std::string::npos) << message;
  fs::remove(path);
  EXPECT_NE(
      error_of([] { Tokenizer::from_hf_json("/nonexistent/tokenizer.json"); }).find("cannot open"),
      std::string::npos);
}

TEST(TokenizerBadInput, MissingModel) {
  json j = small_bpe();
  j.erase("model");
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("missing 'model'"),
            std::string::npos);
  EXPECT_NE(error_of([] { Tokenizer::from_hf_json_value(json::array(), "x"); }).find("object"),
            std::string::npos);
}

TEST(TokenizerBadInput, UnsupportedConstructsAreNamed) {
  json j = small_bpe();
  j["pre_tokenizer"] = json::parse(R"({"type": "UnicodeScripts"})");
  EXPECT_NE(error_of([&] {
              Tokenizer::from_hf_json_value(j, "x");
            }).find("unsupported pre_tokenizer type 'UnicodeScripts'"),
            std::string::npos);
  j = small_bpe();
  j["normalizer"] = json::parse(R"({"type": "NFKC"})");
  EXPECT_NE(error_of([&] {
              Tokenizer::from_hf_json_value(j, "x");
            }).find("unsupported normalizer type 'NFKC'"),
            std::string::npos);
  j = small_bpe();
  j["decoder"] = json::parse(R"({"type": "WordPiece"})");
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("'WordPiece'"),
            std::string::npos);
  j = small_bpe();
  j["model"]["type"] = "Unigram";
  EXPECT_NE(error_of([&] {
              Tokenizer::from_hf_json_value(j, "x");
            }).find("unsupported model type 'Unigram'"),
            std::string::npos);
  j = small_bpe();
  j["pre_tokenizer"] = json::parse(R"({"type": "Split", "pattern": {"Regex": "(unclosed"},
                                       "behavior": "Isolated", "invert": false})");
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("(unclosed"),
            std::string::npos);
}

TEST(TokenizerBadInput, MergesNamingUnknownTokens) {
  json j = small_bpe();
  j["model"]["merges"] = json::parse(R"(["a c"])");
  const std::string message = error_of([&] { Tokenizer::from_hf_json_value(j, "x"); });
  EXPECT_NE(message.find("'c' is not in the vocabulary"), std::string::npos) << message;
  j["model"]["merges"] = json::parse(R"(["b a"])");  // "ba" is not a token
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("merged token 'ba'"),
            std::string::npos);
  j["model"]["merges"] = json::parse(R"(["abc"])");
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("'abc'"),
            std::string::npos);
  j["model"]["merges"] = json::parse(R"([[1, 2]])");
  EXPECT_THROW(Tokenizer::from_hf_json_value(j, "x"), Error);
}

TEST(TokenizerBadInput, BadVocabularyAndIds) {
  json j = small_bpe();
  j["model"]["vocab"]["x"] = -4;
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("out-of-range"),
            std::string::npos);
  j = small_bpe();
  j["model"]["vocab"] = json::array();
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("vocab"),
            std::string::npos);
  j = small_bpe();
  j["model"]["unk_token"] = "<unk>";
  EXPECT_NE(error_of([&] { Tokenizer::from_hf_json_value(j, "x"); }).find("unk_token '<unk>'"),
            std::string::npos);
}

json small_gguf(const std::string& model) {
  json md = json::object();
  md["tokenizer.ggml.model"] = model;
  md["tokenizer.ggml.tokens"] = json::array({"a", "b", "ab"});
  md["tokenizer.ggml.merges"] = json::array({"a b"});
  md["tokenizer.ggml.pre"] = "gpt-2";
  return md;
}

TEST(TokenizerBadInput, GgufMetadata) {
  EXPECT_EQ(Tokenizer::from_gguf_metadata(small_gguf("gpt2")).encode("abab"),
            (std::vector<int32_t>{2, 2}));
  json md = small_gguf("bert");
  EXPECT_NE(error_of([&] {
              Tokenizer::from_gguf_metadata(md);
            }).find("unsupported GGUF tokenizer.ggml.model 'bert'"),
            std::string::npos);
  md = small_gguf("gpt2");
  md["tokenizer.ggml.pre"] = "martian";
  EXPECT_NE(error_of([&] { Tokenizer::from_gguf_metadata(md); }).find("'martian'"),
            std::string::npos);
  md = small_gguf("gpt2");
  md["tokenizer.ggml.merges"] = json::array({"a z"});
  EXPECT_NE(error_of([&] { Tokenizer::from_gguf_metadata(md); }).find("'z'"), std::string::npos);
  md = small_gguf("gpt2");
  md["tokenizer.ggml.bos_token_id"] = 99;
  EXPECT_NE(error_of([&] { Tokenizer::from_gguf_metadata(md); }).find("bos_token_id"),
            std::string::npos);
  md = small_gguf("gpt2");
  md["tokenizer.ggml.token_type"] = json::array({1, 1});
  EXPECT_NE(error_of([&] { Tokenizer::from_gguf_metadata(md); }).find("token_type"),
            std::string::npos);
  md = small_gguf("gpt2");
  md.erase("tokenizer.ggml.tokens");
  EXPECT_NE(error_of([&] { Tokenizer::from_gguf_metadata(md); }).find("tokenizer.ggml.tokens"),
            std::string::npos);
  md = small_gguf("llama");
  md["tokenizer.ggml.scores"] = json::array({0.0, 1.0});
  EXPECT_NE(error_of([&] { Tokenizer::from_gguf_metadata(md); }).find("scores"), std::string::npos);
  EXPECT_THROW(Tokenizer::from_gguf_metadata(json::object()), Error);
}

}  // namespace
}  // namespace visikv

// Encoding arbitrary bytes with the committed tokenizers (byte-level BPE of SmolLM2, GPT-2,
// Llama-3 and Qwen2 style; SentencePiece BPE from tokenizer.json and from GGUF metadata). The
// first input byte picks the tokenizer and whether special tokens are added. Every id must be in
// the vocabulary and decode; for byte-level BPE without a normalizer, decoding valid UTF-8 must
// give the text back when the vocabulary has a token for each of its bytes (SmolLM2's lacks a
// few control and invalid-UTF-8 bytes, and Hugging Face tokenizers drops those, as visikv does).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "fuzz_support.h"
#include "visikv/formats/gguf.h"
#include "visikv/tokenizer/byte_level.h"
#include "visikv/tokenizer/tokenizer.h"

using namespace visikv;
using namespace visikv::fuzz;

namespace {

struct Subject {
  Tokenizer tokenizer;
  bool round_trips;  // decode(encode(text)) == text for valid UTF-8 input
};

std::vector<Subject>& subjects() {
  static std::vector<Subject> all = [] {
    const std::filesystem::path dir = fixtures() / "tokenizer";
    std::vector<Subject> made;
    made.push_back({Tokenizer::from_hf_json(dir / "smollm2" / "tokenizer.json"), true});
    for (const char* name : {"gpt2_trained", "llama3_trained", "qwen2_trained"})
      made.push_back({Tokenizer::from_hf_json(dir / name / "tokenizer.json"), false});
    for (const char* name : {"spm_legacy_trained", "spm_metaspace_trained"})
      made.push_back({Tokenizer::from_hf_json(dir / name / "tokenizer.json"), false});
    const GgufFile gguf(fixtures() / "models_gguf" / "llama.gguf");
    made.push_back({Tokenizer::from_gguf_metadata(gguf.metadata()), false});
    return made;
  }();
  return all;
}

bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t length = c < 0x80           ? 1
                    : (c >> 5) == 0x6  ? 2
                    : (c >> 4) == 0xE  ? 3
                    : (c >> 3) == 0x1E ? 4
                                       : 0;
    if (length == 0 || i + length > s.size()) return false;
    uint32_t code = length == 1 ? c : c & (0x7F >> length);
    for (size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(s[i + k]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3F);
    }
    const uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < smallest[length] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF))
      return false;
    i += length;
  }
  return true;
}

bool every_byte_has_a_token(const Tokenizer& tokenizer, std::string_view text) {
  for (char c : text)
    if (!tokenizer.token_id(byte_level_char(static_cast<unsigned char>(c)))) return false;
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  std::vector<Subject>& all = subjects();
  Subject& subject = all[data[0] % all.size()];
  const bool add_special = (data[0] / all.size()) % 2 == 1;
  const std::string_view text = as_text(data + 1, size - 1);
  std::vector<int32_t> ids;
  bool encoded = false;
  expect_clean([&] {
    ids = subject.tokenizer.encode(text, add_special);
    encoded = true;
  });
  if (!encoded) return 0;
  for (int32_t id : ids) {
    if (id < 0 || id >= subject.tokenizer.vocab_size()) {
      std::fprintf(stderr, "encode returned id %d outside the vocabulary of %lld\n", id,
                   static_cast<long long>(subject.tokenizer.vocab_size()));
      std::abort();
    }
  }
  const std::string decoded = subject.tokenizer.decode(ids);
  if (subject.round_trips && !add_special && valid_utf8(text) &&
      every_byte_has_a_token(subject.tokenizer, text) && decoded != text) {
    std::fprintf(stderr, "decode(encode(text)) differs from the text\n");
    std::abort();
  }
  return 0;
}

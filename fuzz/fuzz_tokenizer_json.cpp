// tokenizer.json (first part of the input) and tokenizer_config.json (optional second part):
// building the tokenizer, then encoding and decoding a text with special tokens, numbers, and
// non-ASCII characters. Every id encode returns must decode.
#include <cstddef>
#include <cstdint>

#include "fuzz_support.h"
#include "visikv/tokenizer/tokenizer.h"

using namespace visikv;
using namespace visikv::fuzz;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ScratchDir dir;
  const std::vector<std::string_view> parts = split_parts(as_text(data, size), 2);
  dir.write("tokenizer.json", parts[0]);
  if (parts.size() > 1)
    dir.write("tokenizer_config.json", parts[1]);
  else
    dir.remove("tokenizer_config.json");
  std::vector<int32_t> ids;
  std::optional<Tokenizer> tokenizer;
  expect_clean([&] {
    tokenizer.emplace(Tokenizer::from_hf_json(dir.path() / "tokenizer.json"));
    ids = tokenizer->encode(
        "Hello  world!\n\n  It's 2026: <s></s><|endoftext|> naïve 日本語 🙂", true);
  });
  // Ids the tokenizer produced are its own: decoding them must not fail.
  if (tokenizer) (void)tokenizer->decode(ids);
  return 0;
}

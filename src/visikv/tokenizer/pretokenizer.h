// Pre-tokenization: cutting normalized text into the words that BPE encodes one at a time. The
// steps mirror Hugging Face tokenizer.json pre-tokenizers (Split, ByteLevel, Digits, Metaspace,
// ...); llama.cpp's GGUF `tokenizer.ggml.pre` names map onto the same steps (a regex sequence
// with "isolated" splits followed by the byte-level mapping).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/tokenizer/regex.h"

namespace visikv {

struct PreToken {
  std::string text;
  // Whether this word starts at offset 0 of the text passed to encode (Metaspace's "first"
  // prepend scheme only adds the "▁" there).
  bool at_text_start = false;
};

// What a split does with the parts of a word the pattern matched (Hugging Face's
// SplitDelimiterBehavior).
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

enum class PrependScheme { kAlways, kFirst, kNever };

// The regexes of the common byte-level BPE families, as written in their tokenizer.json files.
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// The split regexes llama.cpp applies, in order, for a GGUF `tokenizer.ggml.pre` value, and
// whether that pre-tokenizer ignores merges for words already in the vocabulary (Llama-3).
// Throws visikv::Error for a name it does not know.
struct LlamaCppPre {
  std::vector<std::string> patterns;
  bool ignore_merges = false;
  bool adds_bos = false;  // llama.cpp's default for add_bos when the GGUF does not say
};
LlamaCppPre llama_cpp_pre(std::string_view pre);

class PreTokenizer {
 public:
  using Step = std::function<void(std::vector<PreToken>&)>;

  static Step split(std::shared_ptr<const Regex> pattern, SplitBehavior behavior, bool invert);
  // The GPT-2 regex split (when use_regex) and then each byte shown as its byte-level character.
  static Step byte_level(bool add_prefix_space, bool use_regex);
  static Step digits(bool individual);
  static Step metaspace(std::string replacement, PrependScheme scheme, bool split);

  void add(Step step) { steps_.push_back(std::move(step)); }
  std::vector<PreToken> run(std::string text, bool at_text_start) const;

 private:
  std::vector<Step> steps_;
};

}  // namespace visikv

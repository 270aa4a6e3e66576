// Turning token strings back into text, as the decoders of Hugging Face tokenizer.json: a chain
// of steps over the list of token strings (ByteLevel, Replace, ByteFallback, Fuse, Strip,
// Metaspace), joined at the end.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "visikv/tokenizer/pretokenizer.h"
#include "visikv/tokenizer/regex.h"

namespace visikv {

class Decoder {
 public:
  // `streaming`: decoding a single token for incremental output, where position-dependent rules
  // (strip the first space, Metaspace on the first token) are skipped and byte tokens stay raw
  // bytes instead of becoming U+FFFD.
  using Step = std::function<void(std::vector<std::string>& tokens, bool streaming)>;

  static Step byte_level();
  static Step replace(std::string literal, std::string content);
  static Step replace_regex(std::shared_ptr<const Regex> pattern, std::string content);
  static Step byte_fallback();
  static Step fuse();
  static Step strip(std::string content, std::size_t start, std::size_t stop);
  static Step metaspace(std::string replacement, PrependScheme scheme);

  void add(Step step) { steps_.push_back(std::move(step)); }
  bool empty() const { return steps_.empty(); }

  // The text of a whole id sequence (valid UTF-8).
  std::string decode(std::vector<std::string> tokens) const;
  // The raw bytes one token contributes to a stream (possibly part of a UTF-8 sequence).
  std::string token_bytes(std::string token) const;

 private:
  std::vector<Step> steps_;
};

}  // namespace visikv

// Text normalizers of Hugging Face tokenizer.json (and the Llama-2 style space handling GGUF
// SentencePiece vocabularies need): a sequence of in-place rewrites of one text segment.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "visikv/tokenizer/regex.h"

namespace visikv {

class Normalizer {
 public:
  using Step = std::function<void(std::string&)>;

  static Step prepend(std::string prefix);  // only to non-empty text, as Hugging Face does
  static Step replace(std::string literal, std::string content);
  static Step replace_regex(std::shared_ptr<const Regex> pattern, std::string content);
  static Step strip(bool left, bool right);  // Unicode whitespace
  static Step nfc();                         // Unicode Normalization Form C

  void add(Step step) { steps_.push_back(std::move(step)); }
  void normalize(std::string& text) const {
    for (const Step& step : steps_) step(text);
  }

 private:
  std::vector<Step> steps_;
};

// Replaces every non-overlapping occurrence of `literal` (non-empty) in `text`.
std::string replace_all(const std::string& text, const std::string& literal,
                        const std::string& content);

}  // namespace visikv

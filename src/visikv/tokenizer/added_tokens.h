// Added tokens (special tokens such as "<|im_start|>" and user-added words): Hugging Face and
// llama.cpp find them in the raw text before normalization and pre-tokenization, so they are
// never split by the regexes or BPE.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace visikv {

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool single_word = false;  // only matches when not inside a word
  bool lstrip = false;       // swallows the whitespace before it
  bool rstrip = false;       // swallows the whitespace after it
  bool normalized = false;   // matched in the normalized text instead of the raw text
  bool special = false;
};

struct TextSegment {
  std::string_view text;
  int32_t token = -1;      // the added token's id, or -1 for plain text
  std::size_t offset = 0;  // byte offset of `text` in the string given to split()
};

class AddedTokenMatcher {
 public:
  AddedTokenMatcher() = default;
  explicit AddedTokenMatcher(std::vector<AddedToken> tokens);

  bool empty() const { return tokens_.empty(); }
  // Cuts `text` into plain and added-token segments, choosing the leftmost, then longest, match
  // (Hugging Face's rule). Empty plain segments are left out.
  std::vector<TextSegment> split(std::string_view text) const;

 private:
  std::vector<AddedToken> tokens_;
  // Candidate tokens by first byte, longest first.
  std::array<std::vector<uint32_t>, 256> by_first_byte_;
};

}  // namespace visikv

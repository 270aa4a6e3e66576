#include "visikv/tokenizer/added_tokens.h"

#include <algorithm>

#include "visikv/tokenizer/regex.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {

namespace {

bool is_word_char(std::string_view text, std::size_t begin, std::size_t end) {
  static const Regex word(R"(^[\p{L}\p{N}_]$)");
  return !word.find_all(text.substr(begin, end - begin)).empty();
}

// Start of the character that ends just before `pos`.
std::size_t previous_char_start(std::string_view text, std::size_t pos) {
  std::size_t start = pos - 1;
  while (start > 0 && pos - start < 4 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80)
    --start;
  return start;
}

bool whitespace_at(std::string_view text, std::size_t pos, std::size_t* length) {
  const Utf8Char c = next_utf8_char(text, pos);
  *length = c.length;
  return c.valid && is_unicode_whitespace(c.code);
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(std::vector<AddedToken> tokens) {
  for (AddedToken& token : tokens) {
    if (!token.content.empty()) tokens_.push_back(std::move(token));
  }
  for (uint32_t i = 0; i < tokens_.size(); ++i) {
    by_first_byte_[static_cast<unsigned char>(tokens_[i].content[0])].push_back(i);
  }
  for (auto& candidates : by_first_byte_) {
    std::stable_sort(candidates.begin(), candidates.end(), [&](uint32_t a, uint32_t b) {
      return tokens_[a].content.size() > tokens_[b].content.size();
    });
  }
}

std::vector<TextSegment> AddedTokenMatcher::split(std::string_view text) const {
  std::vector<TextSegment> segments;
  std::size_t plain_start = 0;
  std::size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* found = nullptr;
    for (uint32_t index : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
      const AddedToken& token = tokens_[index];
      if (text.substr(pos).starts_with(token.content)) {
        found = &token;
        break;
      }
    }
    std::size_t start = pos;
    std::size_t stop = found ? pos + found->content.size() : pos;
    if (found && found->single_word) {
      const bool word_before =
          start > 0 && is_word_char(text, previous_char_start(text, start), start);
      const bool word_after =
          stop < text.size() && is_word_char(text, stop, stop + next_utf8_char(text, stop).length);
      if (word_before || word_after) found = nullptr;
    }
    if (found == nullptr) {
      ++pos;
      continue;
    }
    if (found->lstrip) {
      while (start > plain_start) {
        const std::size_t prev = previous_char_start(text, start);
        std::size_t length = 0;
        if (!whitespace_at(text, prev, &length) || prev + length != start) break;
        start = prev;
      }
    }
    if (found->rstrip) {
      std::size_t length = 0;
      while (stop < text.size() && whitespace_at(text, stop, &length)) stop += length;
    }
    if (start > plain_start) {
      segments.push_back({text.substr(plain_start, start - plain_start), -1, plain_start});
    }
    segments.push_back({text.substr(start, stop - start), found->id, start});
    plain_start = pos = stop;
  }
  if (plain_start < text.size()) {
    segments.push_back({text.substr(plain_start), -1, plain_start});
  }
  return segments;
}

}  // namespace visikv

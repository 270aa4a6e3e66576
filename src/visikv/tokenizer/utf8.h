// UTF-8 helpers shared by the tokenizers. Input text may hold invalid UTF-8; every function here
// treats an invalid byte as a one-byte "character" instead of failing, so no byte is ever lost.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace visikv {

struct Utf8Char {
  char32_t code = 0;   // U+FFFD for an invalid sequence
  std::size_t length;  // bytes consumed, at least 1 (when pos < text.size())
  bool valid = false;
};

// The character starting at byte `pos` (which must be < text.size()).
Utf8Char next_utf8_char(std::string_view text, std::size_t pos);

void append_utf8(std::string& out, char32_t code);
std::string utf8_encode(char32_t code);
bool is_valid_utf8(std::string_view text);

// Unicode White_Space (what Rust's char::is_whitespace and Hugging Face's strip rules use).
bool is_unicode_whitespace(char32_t code);

// How many leading bytes of streamed text end on a character boundary: all but an unfinished
// UTF-8 sequence at the end, whose next bytes may still come (a byte-level BPE token can end in
// the middle of a character). Invalid bytes count as finished.
std::size_t finished_utf8_prefix(std::string_view bytes);

// Like Rust's String::from_utf8_lossy (what Hugging Face decoders return): every maximal invalid
// subsequence becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

}  // namespace visikv

#include "visikv/tokenizer/nfc.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "visikv/core/error.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {

namespace {

// NFC of text that is valid UTF-8.
void append_nfc(std::string_view valid, std::string& out) {
  if (valid.empty()) return;
  utf8proc_uint8_t* mapped = nullptr;
  const utf8proc_ssize_t length =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(valid.data()),
                   static_cast<utf8proc_ssize_t>(valid.size()), &mapped,
                   static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  const std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owner(mapped, &std::free);
  require(length >= 0, "NFC normalization failed: ", utf8proc_errmsg(length));
  out.append(reinterpret_cast<const char*>(mapped), static_cast<std::size_t>(length));
}

}  // namespace

std::string to_nfc(std::string_view text) {
  // Everything below U+0300 (lead bytes below 0xCC) is already in NFC and never composes.
  if (std::all_of(text.begin(), text.end(),
                  [](char c) { return static_cast<unsigned char>(c) < 0xCC; })) {
    return std::string(text);
  }
  std::string out;
  out.reserve(text.size());
  std::size_t run_start = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    const Utf8Char c = next_utf8_char(text, pos);
    if (!c.valid) {
      // utf8proc only takes valid UTF-8: normalize the valid run, keep the bad bytes.
      append_nfc(text.substr(run_start, pos - run_start), out);
      out.append(text.substr(pos, c.length));
      run_start = pos + c.length;
    }
    pos += c.length;
  }
  append_nfc(text.substr(run_start), out);
  return out;
}

}  // namespace visikv

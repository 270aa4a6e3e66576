// The GPT-2 byte <-> unicode map of byte-level BPE: every byte is shown as one printable
// character (printable Latin-1 bytes as themselves, the others as U+0100 onwards), so that
// vocabularies and merges can be stored as text.
#pragma once

#include <string>
#include <string_view>

namespace visikv {

// The UTF-8 text of the character that stands for `byte`.
const std::string& byte_level_char(unsigned char byte);

// Each byte of `bytes` replaced by its character.
std::string to_byte_level(std::string_view bytes);

// The inverse: appends the bytes the characters of `text` stand for. Returns false (and appends
// nothing) when some character is not in the map, e.g. an added token such as "<|im_start|>" is
// fine but "héllo" with a raw 'é' is not.
bool from_byte_level(std::string_view text, std::string& out);

}  // namespace visikv

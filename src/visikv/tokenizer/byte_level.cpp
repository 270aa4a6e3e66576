#include "visikv/tokenizer/byte_level.h"

#include <array>
#include <unordered_map>

#include "visikv/tokenizer/utf8.h"

namespace visikv {

namespace {

struct ByteLevelMap {
  std::array<std::string, 256> byte_to_text;
  std::unordered_map<char32_t, unsigned char> code_to_byte;

  ByteLevelMap() {
    // The bytes GPT-2 keeps as themselves: '!'..'~', '¡'..'¬', '®'..'ÿ'.
    const auto kept = [](int b) {
      return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    char32_t next_code = 0x100;
    for (int b = 0; b < 256; ++b) {
      const char32_t code = kept(b) ? static_cast<char32_t>(b) : next_code++;
      byte_to_text[b] = utf8_encode(code);
      code_to_byte[code] = static_cast<unsigned char>(b);
    }
  }
};

const ByteLevelMap& byte_level_map() {
  static const ByteLevelMap map;
  return map;
}

}  // namespace

const std::string& byte_level_char(unsigned char byte) {
  return byte_level_map().byte_to_text[byte];
}

std::string to_byte_level(std::string_view bytes) {
  const ByteLevelMap& map = byte_level_map();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const char byte : bytes) out += map.byte_to_text[static_cast<unsigned char>(byte)];
  return out;
}

bool from_byte_level(std::string_view text, std::string& out) {
  const ByteLevelMap& map = byte_level_map();
  const std::size_t start = out.size();
  for (std::size_t pos = 0; pos < text.size();) {
    const Utf8Char c = next_utf8_char(text, pos);
    const auto it = c.valid ? map.code_to_byte.find(c.code) : map.code_to_byte.end();
    if (it == map.code_to_byte.end()) {
      out.resize(start);
      return false;
    }
    out += static_cast<char>(it->second);
    pos += c.length;
  }
  return true;
}

}  // namespace visikv

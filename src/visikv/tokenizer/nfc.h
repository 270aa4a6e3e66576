// Unicode Normalization Form C, the "NFC" normalizer of tokenizer.json files such as Qwen2's
// (computed by utf8proc).
#pragma once

#include <string>
#include <string_view>

namespace visikv {

// The NFC form of `text`. Bytes that are not valid UTF-8 are kept as they are and block
// composition across them.
std::string to_nfc(std::string_view text);

}  // namespace visikv

#include "visikv/tokenizer/decoder.h"

#include <optional>

#include "visikv/tokenizer/byte_level.h"
#include "visikv/tokenizer/normalizer.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {

namespace {

// "<0xAB>" -> 0xAB, as Hugging Face's ByteFallback decoder recognizes byte tokens.
std::optional<unsigned char> byte_token_value(const std::string& token) {
  if (token.size() != 6 || token.compare(0, 3, "<0x") != 0 || token[5] != '>') return std::nullopt;
  int value = 0;
  for (int i = 3; i < 5; ++i) {
    const char c = token[i];
    int digit = -1;
    if (c >= '0' && c <= '9') digit = c - '0';
    if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
    if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
    if (digit < 0) return std::nullopt;
    value = value * 16 + digit;
  }
  return static_cast<unsigned char>(value);
}

std::string join(const std::vector<std::string>& tokens) {
  std::string out;
  for (const std::string& token : tokens) out += token;
  return out;
}

}  // namespace

Decoder::Step Decoder::byte_level() {
  return [](std::vector<std::string>& tokens, bool streaming) {
    std::string bytes;
    for (const std::string& token : tokens) {
      // Tokens with characters outside the byte map (e.g. some added tokens) are kept as is.
      if (!from_byte_level(token, bytes)) bytes += token;
    }
    tokens.assign(1, streaming ? std::move(bytes) : utf8_lossy(bytes));
  };
}

Decoder::Step Decoder::replace(std::string literal, std::string content) {
  return [literal = std::move(literal), content = std::move(content)](
             std::vector<std::string>& tokens, bool) {
    for (std::string& token : tokens) token = replace_all(token, literal, content);
  };
}

Decoder::Step Decoder::replace_regex(std::shared_ptr<const Regex> pattern, std::string content) {
  return [pattern = std::move(pattern), content = std::move(content)](
             std::vector<std::string>& tokens, bool) {
    for (std::string& token : tokens) {
      std::string out;
      std::size_t from = 0;
      for (const MatchRange& m : pattern->find_all(token)) {
        out.append(token, from, m.begin - from);
        out += content;
        from = m.end;
      }
      out.append(token, from, std::string::npos);
      token = std::move(out);
    }
  };
}

Decoder::Step Decoder::byte_fallback() {
  return [](std::vector<std::string>& tokens, bool streaming) {
    std::vector<std::string> out;
    std::string pending;  // bytes of consecutive byte tokens
    const auto flush = [&] {
      if (pending.empty()) return;
      if (streaming || is_valid_utf8(pending)) {
        out.push_back(pending);
      } else {
        // Hugging Face writes one U+FFFD per byte of an invalid run.
        for (std::size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (std::string& token : tokens) {
      if (const std::optional<unsigned char> byte = byte_token_value(token)) {
        pending += static_cast<char>(*byte);
        continue;
      }
      flush();
      out.push_back(std::move(token));
    }
    flush();
    tokens = std::move(out);
  };
}

Decoder::Step Decoder::fuse() {
  return [](std::vector<std::string>& tokens, bool) { tokens.assign(1, join(tokens)); };
}

Decoder::Step Decoder::strip(std::string content, std::size_t start, std::size_t stop) {
  return [content = std::move(content), start, stop](std::vector<std::string>& tokens,
                                                     bool streaming) {
    if (streaming || content.empty()) return;
    for (std::string& token : tokens) {
      std::size_t begin = 0, end = token.size();
      for (std::size_t i = 0; i < start && token.compare(begin, content.size(), content) == 0 &&
                              begin + content.size() <= end;
           ++i) {
        begin += content.size();
      }
      for (std::size_t i = 0; i < stop && end >= begin + content.size() &&
                              token.compare(end - content.size(), content.size(), content) == 0;
           ++i) {
        end -= content.size();
      }
      token = token.substr(begin, end - begin);
    }
  };
}

Decoder::Step Decoder::metaspace(std::string replacement, PrependScheme scheme) {
  return [replacement = std::move(replacement), scheme](std::vector<std::string>& tokens,
                                                        bool streaming) {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      // The first token loses every "▁" (not only a leading one), exactly as Hugging Face.
      const bool drop = !streaming && i == 0 && scheme != PrependScheme::kNever;
      tokens[i] = replace_all(tokens[i], replacement, drop ? "" : " ");
    }
  };
}

std::string Decoder::decode(std::vector<std::string> tokens) const {
  if (steps_.empty()) {
    // Hugging Face joins with spaces when a tokenizer has no decoder.
    std::string out;
    for (std::size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  for (const Step& step : steps_) step(tokens, false);
  return join(tokens);
}

std::string Decoder::token_bytes(std::string token) const {
  std::vector<std::string> tokens{std::move(token)};
  for (const Step& step : steps_) step(tokens, true);
  return join(tokens);
}

}  // namespace visikv

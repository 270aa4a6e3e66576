#include "visikv/tokenizer/normalizer.h"

#include "visikv/tokenizer/nfc.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {

std::string replace_all(const std::string& text, const std::string& literal,
                        const std::string& content) {
  if (literal.empty()) return text;
  std::string out;
  out.reserve(text.size());
  std::size_t from = 0;
  for (std::size_t at = text.find(literal); at != std::string::npos;
       at = text.find(literal, from)) {
    out.append(text, from, at - from);
    out += content;
    from = at + literal.size();
  }
  out.append(text, from, std::string::npos);
  return out;
}

Normalizer::Step Normalizer::prepend(std::string prefix) {
  return [prefix = std::move(prefix)](std::string& text) {
    if (!text.empty()) text.insert(0, prefix);
  };
}

Normalizer::Step Normalizer::replace(std::string literal, std::string content) {
  return [literal = std::move(literal), content = std::move(content)](std::string& text) {
    if (text.find(literal) != std::string::npos) text = replace_all(text, literal, content);
  };
}

Normalizer::Step Normalizer::replace_regex(std::shared_ptr<const Regex> pattern,
                                           std::string content) {
  return [pattern = std::move(pattern), content = std::move(content)](std::string& text) {
    const std::vector<MatchRange> matches = pattern->find_all(text);
    if (matches.empty()) return;
    std::string out;
    std::size_t from = 0;
    for (const MatchRange& m : matches) {
      out.append(text, from, m.begin - from);
      out += content;
      from = m.end;
    }
    out.append(text, from, std::string::npos);
    text = std::move(out);
  };
}

Normalizer::Step Normalizer::strip(bool left, bool right) {
  return [left, right](std::string& text) {
    std::size_t begin = 0, end = text.size();
    if (left) {
      while (begin < end) {
        const Utf8Char c = next_utf8_char(text, begin);
        if (!c.valid || !is_unicode_whitespace(c.code)) break;
        begin += c.length;
      }
    }
    if (right) {
      // Walk forward remembering where the trailing run of whitespace starts.
      std::size_t run_start = end;
      for (std::size_t pos = begin; pos < end;) {
        const Utf8Char c = next_utf8_char(text, pos);
        const bool space = c.valid && is_unicode_whitespace(c.code);
        if (space && run_start == end) run_start = pos;
        if (!space) run_start = end;
        pos += c.length;
      }
      end = run_start;
    }
    text = text.substr(begin, end - begin);
  };
}

Normalizer::Step Normalizer::nfc() {
  return [](std::string& text) { text = to_nfc(text); };
}

}  // namespace visikv

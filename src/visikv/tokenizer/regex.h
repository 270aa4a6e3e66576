// A compiled PCRE2 pattern in UTF + UCP mode (so \s, \p{L}, \w are Unicode-aware, as in the
// Oniguruma/fancy-regex engines Hugging Face tokenizers and llama.cpp use), JIT-compiled when the
// platform allows. Invalid UTF-8 in the subject never matches a pattern character instead of
// being an error, so arbitrary bytes can be tokenized.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace visikv {

struct MatchRange {
  std::size_t begin;
  std::size_t end;
};

class Regex {
 public:
  // `literal` compiles the pattern as plain text. Throws visikv::Error naming the pattern when it
  // does not compile.
  explicit Regex(std::string pattern, bool literal = false);
  ~Regex();
  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Every non-overlapping, non-empty match from left to right.
  std::vector<MatchRange> find_all(std::string_view subject) const;
  const std::string& pattern() const { return pattern_; }

 private:
  struct Code;
  std::string pattern_;
  std::unique_ptr<Code> code_;
};

}  // namespace visikv

#define PCRE2_CODE_UNIT_WIDTH 8
#include "visikv/tokenizer/regex.h"

#include <pcre2.h>

#include "visikv/core/error.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {

namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof buffer);
  return reinterpret_cast<const char*>(buffer);
}

struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

}  // namespace

struct Regex::Code {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Code() { pcre2_code_free(code); }
};

Regex::Regex(std::string pattern, bool literal) : pattern_(std::move(pattern)) {
  uint32_t options = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF;
  if (literal) options = PCRE2_UTF | PCRE2_LITERAL | PCRE2_MATCH_INVALID_UTF;
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  code_ = std::make_unique<Code>();
  code_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern_.data()), pattern_.size(),
                              options, &error_code, &error_offset, nullptr);
  require(code_->code != nullptr, "cannot compile regex '", pattern_, "' at offset ", error_offset,
          ": ", pcre2_message(error_code));
  code_->jit = pcre2_jit_compile(code_->code, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() = default;
Regex::Regex(Regex&&) noexcept = default;
Regex& Regex::operator=(Regex&&) noexcept = default;

std::vector<MatchRange> Regex::find_all(std::string_view subject) const {
  std::vector<MatchRange> matches;
  const std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
      pcre2_match_data_create_from_pattern(code_->code, nullptr));
  require(data != nullptr, "out of memory matching regex '", pattern_, "'");
  const auto* text = reinterpret_cast<PCRE2_SPTR>(subject.data());
  std::size_t start = 0;
  while (start < subject.size()) {
    int rc = code_->jit
                 ? pcre2_jit_match(code_->code, text, subject.size(), start, 0, data.get(), nullptr)
                 : PCRE2_ERROR_JIT_BADOPTION;
    // The interpreter is the fallback when JIT is unavailable or runs out of its stack.
    if (rc == PCRE2_ERROR_JIT_BADOPTION || rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      rc = pcre2_match(code_->code, text, subject.size(), start, 0, data.get(), nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    require(rc >= 0, "regex '", pattern_, "' failed: ", pcre2_message(rc));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
    const std::size_t begin = ovector[0], end = ovector[1];
    if (end > begin) {
      matches.push_back({begin, end});
      start = end;
    } else {
      // An empty match: step over one character so the scan always moves forward.
      start = begin + next_utf8_char(subject, begin).length;
    }
  }
  return matches;
}

}  // namespace visikv

// Text a command reads. A text file is checked before it is read: a regular file (not a
// directory, a device such as /dev/zero or a pipe) of at most kMaxTextFileBytes. A command that
// needs only the first N tokens tokenizes a leading piece of the text, never the whole of a
// large file.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/core/mapped_file.h"
#include "visikv/tokenizer/tokenizer.h"

namespace visikv {

// The largest text file read (1 GiB): a whole-file tokenization of more is minutes of work and
// gigabytes of token ids, and no evaluation text is that large.
inline constexpr uint64_t kMaxTextFileBytes = uint64_t{1} << 30;

// A text file mapped read-only: pages come from disk only as the text is used, so reading its
// first tokens reads only its start. Throws visikv::Error naming the path when it is missing, a
// directory, not a regular file, or larger than kMaxTextFileBytes.
class TextFile {
 public:
  explicit TextFile(const std::filesystem::path& path);
  std::string_view text() const;
  const std::filesystem::path& path() const { return file_.path(); }

 private:
  MappedFile file_;
};

// The whole file, checked as TextFile checks it.
std::string read_text_file(const std::filesystem::path& path);

// Tokens a piece of text must hold after the ones taken from it: the last pre-token (or two,
// where a pattern looks ahead) at the cut can tokenize differently once more text follows.
inline constexpr int64_t kLeadingTokensMargin = 64;

// The first `needed` tokens of tokenizer.encode(text, false) (all of them when there are fewer),
// computed from a leading piece of the text: ~16 bytes per token wanted, doubled until the piece,
// cut at a UTF-8 character boundary, holds needed + kLeadingTokensMargin tokens (or is the whole
// text). Only tokens that many tokens before the cut are kept.
std::vector<int32_t> leading_tokens(const Tokenizer& tokenizer, std::string_view text,
                                    int64_t needed);

// The tokens of a text file without special tokens: the first `needed` (leading_tokens), or all
// of them when `needed` is empty.
std::vector<int32_t> text_file_tokens(const Tokenizer& tokenizer, const std::filesystem::path& path,
                                      std::optional<int64_t> needed);

}  // namespace visikv

#include "visikv/eval/text_input.h"

#include <algorithm>
#include <limits>
#include <system_error>

#include "visikv/core/error.h"

namespace visikv {

namespace {

// Checks what `path` is before it is opened: opening a directory succeeds and reads as empty,
// and a device such as /dev/zero never ends.
const std::filesystem::path& checked_text_path(const std::filesystem::path& path) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  require(
      std::filesystem::exists(status) || (error && error != std::errc::no_such_file_or_directory),
      "cannot read text file ", path, " (no such file)");
  require(!error, "cannot read text file ", path, ": ", error.message());
  require(!std::filesystem::is_directory(status), "text file ", path,
          " is a directory, not a file");
  require(std::filesystem::is_regular_file(status), "text file ", path,
          " is not a regular file (a device, pipe or socket cannot be read as a text)");
  const uintmax_t size = std::filesystem::file_size(path, error);
  require(!error, "cannot read text file ", path, ": ", error.message());
  require(size <= kMaxTextFileBytes, "text file ", path, " holds ", size,
          " bytes, more than the limit of ", kMaxTextFileBytes, " bytes (1 GiB) for a text");
  return path;
}

// The largest cut <= `at` that starts a UTF-8 character (never inside a multi-byte sequence,
// which the tokenizer would see as invalid bytes). Looks back at most three continuation bytes,
// the most a character has.
size_t character_boundary(std::string_view text, size_t at) {
  for (size_t back = 0; back <= 3 && back < at; ++back) {
    if ((static_cast<unsigned char>(text[at - back]) & 0xC0) != 0x80) return at - back;
  }
  return at;  // not UTF-8 here: any cut will do
}

}  // namespace

TextFile::TextFile(const std::filesystem::path& path) : file_(checked_text_path(path)) {
  // The file may have grown since it was checked.
  require(file_.size() <= kMaxTextFileBytes, "text file ", path, " holds ", file_.size(),
          " bytes, more than the limit of ", kMaxTextFileBytes, " bytes (1 GiB) for a text");
}

std::string_view TextFile::text() const {
  return {reinterpret_cast<const char*>(file_.bytes().data()), file_.size()};
}

std::string read_text_file(const std::filesystem::path& path) {
  return std::string(TextFile(path).text());
}

std::vector<int32_t> leading_tokens(const Tokenizer& tokenizer, std::string_view text,
                                    int64_t needed) {
  require(needed >= 0, "a negative token count (", needed, ") was asked of a text");
  if (needed == 0) return {};
  constexpr int64_t kBytesPerToken = 16;
  // A user's count may be anything up to the largest integer: the piece never exceeds the text.
  const int64_t limit = std::numeric_limits<int64_t>::max() / kBytesPerToken - kLeadingTokensMargin;
  const int64_t wanted = std::min(needed, limit) + kLeadingTokensMargin;
  size_t piece = static_cast<size_t>(std::min<uint64_t>(wanted * kBytesPerToken, text.size()));
  std::vector<int32_t> tokens;
  while (true) {
    if (piece >= text.size()) {
      tokens = tokenizer.encode(text, false);
      break;
    }
    tokens = tokenizer.encode(text.substr(0, character_boundary(text, piece)), false);
    if (static_cast<int64_t>(tokens.size()) >= wanted) break;
    piece = std::min(text.size(), piece * 2);
  }
  if (static_cast<int64_t>(tokens.size()) > needed) tokens.resize(static_cast<size_t>(needed));
  return tokens;
}

std::vector<int32_t> text_file_tokens(const Tokenizer& tokenizer, const std::filesystem::path& path,
                                      std::optional<int64_t> needed) {
  const TextFile file(path);
  if (needed) return leading_tokens(tokenizer, file.text(), *needed);
  return tokenizer.encode(file.text(), false);
}

}  // namespace visikv

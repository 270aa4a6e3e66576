// The subword model that turns one pre-tokenized word into token ids (BPE by merge ranks, or
// SentencePiece-style BPE by token scores).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace visikv {

class WordModel {
 public:
  virtual ~WordModel() = default;
  // Appends the ids of `word` to `ids`. Must be safe to call from several threads at once.
  virtual void encode(std::string_view word, std::vector<int32_t>& ids) const = 0;
};

}  // namespace visikv

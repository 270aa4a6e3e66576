// SentencePiece-style BPE by token scores, as llama.cpp's llm_tokenizer_spm (GGUF
// tokenizer.ggml.model = "llama"): start from the characters of the (already "▁"-escaped) text,
// repeatedly merge the adjacent pair whose concatenation is the vocabulary token with the highest
// score (leftmost on ties), and emit symbols that are not tokens as <0xXX> byte tokens.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "visikv/tokenizer/vocab.h"
#include "visikv/tokenizer/word_cache.h"
#include "visikv/tokenizer/word_model.h"

namespace visikv {

class SpmModel : public WordModel {
 public:
  // `scores[id]` is the score of token id; `vocab` holds the tokens merging may produce (not the
  // control or byte tokens); `byte_ids[b]` is the <0xXX> token of byte b, or -1.
  SpmModel(TokenIndex vocab, std::vector<float> scores, std::array<int32_t, 256> byte_ids,
           std::optional<int32_t> unk_id);

  void encode(std::string_view text, std::vector<int32_t>& ids) const override;

 private:
  void encode_word(std::string_view word, std::vector<int32_t>& ids) const;

  TokenIndex vocab_;
  std::vector<float> scores_;
  std::array<int32_t, 256> byte_ids_;  // <0xXX> tokens, -1 when absent
  std::optional<int32_t> unk_id_;
  // True when no token holds "▁" right after another character: then no merge can cross the
  // start of a "▁word", the text can be encoded word by word, and words can be cached.
  bool split_at_word_starts_ = false;
  WordCache cache_;
};

}  // namespace visikv

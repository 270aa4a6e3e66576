// Byte-pair encoding by merge ranks, as Hugging Face's BPE model: a word starts as its characters
// (each looked up in the vocabulary, with byte fallback or <unk> for unknown ones) and the
// lowest-ranked adjacent pair is merged until no pair has a merge. A priority queue keeps this
// O(n log n) per word, and words seen before come from a cache.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "visikv/tokenizer/vocab.h"
#include "visikv/tokenizer/word_cache.h"
#include "visikv/tokenizer/word_model.h"

namespace visikv {

struct BpeOptions {
  bool byte_fallback = false;  // unknown characters become their <0xXX> byte tokens
  bool ignore_merges = false;  // a word that is itself a token is taken whole (Llama-3)
  bool fuse_unk = false;       // consecutive unknown characters become one <unk>
  std::optional<int32_t> unk_id;
  std::string continuing_subword_prefix;  // e.g. "##" for non-initial characters
  std::string end_of_word_suffix;         // e.g. "</w>" for the final character
};

class BpeModel : public WordModel {
 public:
  // Throws visikv::Error when a merge names a token (or makes one) that is not in `vocab`.
  BpeModel(TokenIndex vocab, const std::vector<std::pair<std::string, std::string>>& merges,
           BpeOptions options);

  void encode(std::string_view word, std::vector<int32_t>& ids) const override;

 private:
  struct Merge {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  void encode_uncached(std::string_view word, std::vector<int32_t>& ids) const;

  TokenIndex vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_ids_;  // <0xXX> tokens, -1 when absent
  BpeOptions options_;

  WordCache cache_;
};

}  // namespace visikv

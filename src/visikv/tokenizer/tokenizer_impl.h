// The parts a Tokenizer is assembled from; filled by from_hf_json.cpp and from_gguf.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "visikv/tokenizer/added_tokens.h"
#include "visikv/tokenizer/decoder.h"
#include "visikv/tokenizer/normalizer.h"
#include "visikv/tokenizer/pretokenizer.h"
#include "visikv/tokenizer/vocab.h"
#include "visikv/tokenizer/word_model.h"

namespace visikv {

struct TokenizerImpl {
  std::vector<std::string> id_to_token;  // every id below vocab_size (gaps hold "")
  TokenIndex token_to_id;                // model vocabulary and added tokens
  std::vector<uint8_t> special;          // per id

  // Added tokens found in the raw text, then (after normalization) the "normalized" ones.
  AddedTokenMatcher raw_added;
  AddedTokenMatcher normalized_added;
  Normalizer normalizer;
  PreTokenizer pre_tokenizer;
  std::unique_ptr<WordModel> model;
  Decoder decoder;

  // add_special: ids around the encoded text.
  std::vector<int32_t> prefix_ids;
  std::vector<int32_t> suffix_ids;

  std::optional<int32_t> bos_id;
  std::optional<int32_t> eos_id;
  std::string kind;
  std::optional<std::string> chat_template;
};

}  // namespace visikv

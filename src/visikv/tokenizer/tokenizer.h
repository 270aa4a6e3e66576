// Text <-> token ids for the models visikv runs: byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM2
// families) and SentencePiece-style BPE with byte fallback (Llama-2 family), built either from a
// Hugging Face tokenizer.json or from the tokenizer.ggml.* metadata of a GGUF file. Encoding
// matches Hugging Face tokenizers id for id on the supported constructs; anything else is
// rejected with a visikv::Error naming the construct.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace visikv {

struct TokenizerImpl;

// A token id key of GGUF metadata (tokenizer.ggml.bos_token_id, ...): nullopt when absent or
// llama.cpp's "none" (-1, written as uint32 0xFFFFFFFF); throws visikv::Error starting with
// `where` and naming the key when it is not an integer or not below `vocab_size`.
std::optional<int32_t> gguf_token_id(const nlohmann::json& metadata, const std::string& key,
                                     int64_t vocab_size, const std::string& where);

class Tokenizer {
 public:
  static Tokenizer from_hf_json(const std::filesystem::path& tokenizer_json);
  // Also accepts the parsed contents of a tokenizer.json; `source` names it in error messages.
  static Tokenizer from_hf_json_value(const nlohmann::json& tokenizer, const std::string& source);
  // `metadata`: the GGUF key/value pairs (tokenizer.ggml.model, .tokens, .merges, ...).
  static Tokenizer from_gguf_metadata(const nlohmann::json& metadata);

  // add_special: apply the model's rule for special tokens (BOS for Llama/SPM models, per the
  // tokenizer.json post_processor or GGUF tokenizer.ggml.add_bos_token; nothing for GPT-2).
  // Special tokens written in the text (e.g. "<|im_start|>") are always recognized.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const;
  // Like Hugging Face decode(skip_special_tokens=False). Throws for an id outside the vocabulary.
  std::string decode(std::span<const int32_t> ids) const;
  // Raw bytes this token contributes when streaming (may be a partial UTF-8 sequence).
  std::string token_bytes(int32_t id) const;
  // The token's text as stored in the vocabulary (e.g. "Ġthe", "▁the", "<0x0A>").
  const std::string& token_text(int32_t id) const;
  std::optional<int32_t> token_id(std::string_view text) const;

  int32_t vocab_size() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  bool adds_bos() const;
  std::string kind() const;           // e.g. "byte-level BPE (llama3 pre-tokenizer)"
  bool is_special(int32_t id) const;  // control / special added tokens
  // The model's chat template source (tokenizer/chat_template.h renders it): GGUF
  // tokenizer.chat_template, or beside a tokenizer.json what chat_template_from_hf_dir finds.
  const std::optional<std::string>& chat_template() const;

 private:
  explicit Tokenizer(std::shared_ptr<const TokenizerImpl> impl);
  std::shared_ptr<const TokenizerImpl> impl_;
};

}  // namespace visikv

#include "visikv/tokenizer/tokenizer.h"

#include <algorithm>

#include "visikv/core/error.h"
#include "visikv/tokenizer/tokenizer_impl.h"

namespace visikv {

Tokenizer::Tokenizer(std::shared_ptr<const TokenizerImpl> impl) : impl_(std::move(impl)) {}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  const TokenizerImpl& t = *impl_;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special) ids.insert(ids.end(), t.prefix_ids.begin(), t.prefix_ids.end());
  for (const TextSegment& raw : t.raw_added.split(text)) {
    if (raw.token >= 0) {
      ids.push_back(raw.token);
      continue;
    }
    std::string normalized(raw.text);
    t.normalizer.normalize(normalized);
    for (const TextSegment& segment : t.normalized_added.split(normalized)) {
      if (segment.token >= 0) {
        ids.push_back(segment.token);
        continue;
      }
      const bool at_text_start = raw.offset == 0 && segment.offset == 0;
      for (const PreToken& word : t.pre_tokenizer.run(std::string(segment.text), at_text_start)) {
        t.model->encode(word.text, ids);
      }
    }
  }
  if (add_special) ids.insert(ids.end(), t.suffix_ids.begin(), t.suffix_ids.end());
  return ids;
}

const std::string& Tokenizer::token_text(int32_t id) const {
  require(id >= 0 && id < vocab_size(), "token id ", id, " is outside the vocabulary of ",
          vocab_size(), " tokens");
  return impl_->id_to_token[static_cast<std::size_t>(id)];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view text) const {
  return find_token(impl_->token_to_id, text);
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) tokens.push_back(token_text(id));
  return impl_->decoder.decode(std::move(tokens));
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const std::string& text = token_text(id);
  if (is_special(id)) return text;
  return impl_->decoder.token_bytes(text);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos_id; }
bool Tokenizer::adds_bos() const {
  return impl_->bos_id && std::find(impl_->prefix_ids.begin(), impl_->prefix_ids.end(),
                                    *impl_->bos_id) != impl_->prefix_ids.end();
}
std::string Tokenizer::kind() const { return impl_->kind; }
const std::optional<std::string>& Tokenizer::chat_template() const { return impl_->chat_template; }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->special[static_cast<std::size_t>(id)] != 0;
}

}  // namespace visikv

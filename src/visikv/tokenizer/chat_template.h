// Chat templates: a model's Jinja template (formats/jinja.h) rendered as Hugging Face transformers'
// apply_chat_template(conversation, tokenize=False, ...) renders it, so that a conversation
// becomes the same prompt text the model was trained on.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "visikv/formats/jinja.h"

namespace visikv {

class Tokenizer;

class ChatTemplate {
 public:
  // Throws visikv::Error naming line and column when the template does not parse.
  static ChatTemplate parse(std::string_view source);
  // The tokenizer's template; throws visikv::Error when the model has none.
  static ChatTemplate from_tokenizer(const Tokenizer& tokenizer);

  // `messages`: a non-empty array of message objects ({"role", "content", ...}); keys whose value
  // is null are dropped and reasoning under "thinking"/"reasoning" is also given as
  // "reasoning_content" (and the reverse), as transformers does. `tools`: an array of JSON
  // schemas, or null (templates see `tools` as none then). `variables`: more names for the
  // template (bos_token, eos_token, date_string, enable_thinking, ...); they may not be named
  // messages, tools, documents or add_generation_prompt.
  std::string render(
      const nlohmann::ordered_json& messages, bool add_generation_prompt,
      const nlohmann::ordered_json& tools = nullptr,
      const nlohmann::ordered_json& variables = nlohmann::ordered_json::object()) const;

 private:
  explicit ChatTemplate(jinja::Template compiled) : template_(std::move(compiled)) {}
  jinja::Template template_;
};

// The special-token names transformers passes to every template (its special_tokens_map):
// bos_token and eos_token as the tokenizer knows them.
nlohmann::ordered_json chat_template_special_tokens(const Tokenizer& tokenizer);

// The template a GGUF file carries (metadata key tokenizer.chat_template), if any.
std::optional<std::string> chat_template_from_gguf(const nlohmann::json& metadata);

// The template of a Hugging Face model directory, as transformers 5 finds it: chat_template.jinja,
// else chat_template.json ({"chat_template": ...}), else tokenizer_config.json's chat_template (a
// string, or a list of {name, template} of which "default" is used).
std::optional<std::string> chat_template_from_hf_dir(const std::filesystem::path& dir);

}  // namespace visikv

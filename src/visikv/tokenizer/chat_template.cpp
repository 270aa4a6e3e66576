#include "visikv/tokenizer/chat_template.h"

#include <fstream>
#include <iterator>

#include "visikv/core/error.h"
#include "visikv/core/file_kind.h"
#include "visikv/formats/json_file.h"
#include "visikv/tokenizer/tokenizer.h"

namespace visikv {

namespace {

// Names transformers gives a message's reasoning; templates read the first.
constexpr std::string_view kReasoningFields[] = {"reasoning_content", "thinking", "reasoning"};

nlohmann::ordered_json normalize_message(const nlohmann::ordered_json& message, size_t index) {
  require(message.is_object(), "chat message ", index, " is not a JSON object");
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for (const auto& [key, value] : message.items())
    if (!value.is_null()) out[key] = value;
  // transformers' _alias_reasoning_fields: {"thinking": r, **message, "reasoning_content": r}.
  for (const std::string_view field : kReasoningFields) {
    const auto it = out.find(std::string(field));
    if (it == out.end()) continue;
    const nlohmann::ordered_json reasoning = *it;
    nlohmann::ordered_json aliased = nlohmann::ordered_json::object();
    aliased["thinking"] = reasoning;
    for (const auto& [key, value] : out.items()) aliased[key] = value;
    aliased["reasoning_content"] = reasoning;
    return aliased;
  }
  return out;
}

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "cannot open ", path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  require(!in.bad(), "cannot read ", path);
  return text;
}

}  // namespace

ChatTemplate ChatTemplate::parse(std::string_view source) {
  try {
    return ChatTemplate(jinja::Template::parse(source));
  } catch (const Error& e) {
    fail("chat template: ", e.what());
  }
}

ChatTemplate ChatTemplate::from_tokenizer(const Tokenizer& tokenizer) {
  const auto& source = tokenizer.chat_template();
  require(source.has_value(),
          "this model has no chat template (no tokenizer.chat_template in its GGUF metadata, no "
          "chat_template.jinja, chat_template.json or tokenizer_config.json chat_template)");
  return parse(*source);
}

std::string ChatTemplate::render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                 const nlohmann::ordered_json& tools,
                                 const nlohmann::ordered_json& variables) const {
  require(messages.is_array(), "chat messages must be a JSON array");
  require(!messages.empty(), "cannot apply a chat template to an empty conversation");
  require(tools.is_null() || tools.is_array(), "chat tools must be a JSON array or null");
  require(variables.is_object(), "chat template variables must be a JSON object");
  nlohmann::ordered_json context = variables;
  for (const char* reserved : {"messages", "tools", "documents", "add_generation_prompt"})
    require(!context.contains(reserved), "chat template variable '", reserved,
            "' is set by the renderer and cannot be passed");
  nlohmann::ordered_json normalized = nlohmann::ordered_json::array();
  for (size_t k = 0; k < messages.size(); ++k)
    normalized.push_back(normalize_message(messages[k], k));
  context["messages"] = std::move(normalized);
  context["tools"] = tools;
  context["documents"] = nullptr;
  context["add_generation_prompt"] = add_generation_prompt;
  try {
    return template_.render(context);
  } catch (const Error& e) {
    fail("chat template: ", e.what());
  }
}

nlohmann::ordered_json chat_template_special_tokens(const Tokenizer& tokenizer) {
  nlohmann::ordered_json tokens = nlohmann::ordered_json::object();
  if (const auto bos = tokenizer.bos_id()) tokens["bos_token"] = tokenizer.token_text(*bos);
  if (const auto eos = tokenizer.eos_id()) tokens["eos_token"] = tokenizer.token_text(*eos);
  return tokens;
}

std::optional<std::string> chat_template_from_gguf(const nlohmann::json& metadata) {
  const auto it = metadata.find("tokenizer.chat_template");
  if (it == metadata.end()) return std::nullopt;
  require(it->is_string(), "GGUF metadata tokenizer.chat_template is not a string");
  return it->get<std::string>();
}

std::optional<std::string> chat_template_from_hf_dir(const std::filesystem::path& dir) {
  const auto jinja_file = dir / "chat_template.jinja";
  if (file_kind(jinja_file) != FileKind::Missing) return read_text_file(jinja_file);
  const auto json_file = dir / "chat_template.json";
  if (file_kind(json_file) != FileKind::Missing) {
    const nlohmann::json parsed = read_json_file(json_file);
    require(parsed.is_object() && parsed.contains("chat_template") &&
                parsed["chat_template"].is_string(),
            json_file, ": expected an object with a string \"chat_template\"");
    return parsed["chat_template"].get<std::string>();
  }
  const auto config_file = dir / "tokenizer_config.json";
  if (file_kind(config_file) == FileKind::Missing) return std::nullopt;
  const nlohmann::json config = read_json_file(config_file);
  require(config.is_object(), config_file, " is not a JSON object");
  const auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  require(it->is_array(), config_file,
          ": chat_template is neither a string nor a list of templates");
  for (const auto& entry : *it) {
    require(entry.is_object() && entry.contains("name") && entry["name"].is_string() &&
                entry.contains("template") && entry["template"].is_string(),
            config_file,
            ": each chat_template entry must be {\"name\": string, \"template\": string}");
    if (entry["name"] == "default") return entry["template"].get<std::string>();
  }
  fail(config_file, ": chat_template lists several templates and none is named \"default\"");
}

}  // namespace visikv

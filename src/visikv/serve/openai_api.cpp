#include "visikv/serve/openai_api.h"

#include <atomic>
#include <chrono>
#include <string_view>

#include "visikv/attention/selector_spec.h"
#include "visikv/core/error.h"
#include "visikv/formats/json_file.h"
#include "visikv/kv/codec_spec.h"

namespace visikv {

namespace {

using json = nlohmann::json;

[[noreturn]] void bad(const std::string& param, const std::string& message) {
  throw RequestError{.status = 400, .message = message, .param = param};
}

// A field of the body: absent or null gives nothing; a present one must have the right type.
const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

int64_t integer_field(const json& body, const char* name, int64_t fallback, int64_t min,
                      int64_t max) {
  const json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_number_integer()) bad(name, str_cat("'", name, "' must be an integer"));
  const int64_t value = v->get<int64_t>();
  if (value < min || value > max)
    bad(name, str_cat("'", name, "' must be in [", min, ", ", max, "], not ", value));
  return value;
}

double number_field(const json& body, const char* name, double fallback, double min, double max) {
  const json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_number()) bad(name, str_cat("'", name, "' must be a number"));
  const double value = v->get<double>();
  if (!(value >= min && value <= max))
    bad(name, str_cat("'", name, "' must be in [", min, ", ", max, "], not ", value));
  return value;
}

bool bool_field(const json& body, const char* name, bool fallback) {
  const json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) bad(name, str_cat("'", name, "' must be a boolean"));
  return v->get<bool>();
}

std::vector<std::string> stop_strings(const json& body) {
  const json* v = field(body, "stop");
  if (v == nullptr) return {};
  if (v->is_string()) return {v->get<std::string>()};
  if (!v->is_array() || v->size() > 4)
    bad("stop", "'stop' must be a string or an array of at most 4 strings");
  std::vector<std::string> out;
  for (const json& s : *v) {
    if (!s.is_string()) bad("stop", "'stop' must be a string or an array of at most 4 strings");
    out.push_back(s.get<std::string>());
  }
  return out;
}

// The per-request cache and selector choice: {"visikv": {"keys", "values", "selector"}}.
void apply_extension(const json& body, SequenceRequest& request) {
  const json* ext = field(body, "visikv");
  if (ext == nullptr) return;
  if (!ext->is_object()) bad("visikv", "'visikv' must be an object");
  for (const auto& [key, value] : ext->items()) {
    const std::string param = "visikv." + key;
    if (!value.is_string()) bad(param, str_cat("'", param, "' must be a string"));
    const std::string text = value.get<std::string>();
    try {
      if (key == "keys")
        request.keys = parse_key_codec_spec(text);
      else if (key == "values")
        request.values = parse_value_codec_spec(text);
      else if (key == "selector")
        request.selector = parse_selector_spec(text);
      else
        bad(param, str_cat("unknown field '", param, "' (keys, values, selector)"));
    } catch (const Error& e) {
      bad(param, str_cat("'", param, "': ", e.what()));
    }
  }
}

std::vector<int32_t> prompt_tokens(const json& body, const Model& model) {
  const json* prompt = field(body, "prompt");
  if (prompt == nullptr) bad("prompt", "'prompt' is required");
  if (prompt->is_string()) return model.tokenizer().encode(prompt->get<std::string>(), true);
  // An array of token ids (a single prompt); several prompts at once are not served.
  if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number_integer()) {
    std::vector<int32_t> ids;
    for (const json& id : *prompt) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
          id.get<int64_t>() >= model.config().vocab_size)
        bad("prompt",
            str_cat("'prompt' token ids must be integers in [0, ", model.config().vocab_size, ")"));
      ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
    return ids;
  }
  if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string())
    return model.tokenizer().encode((*prompt)[0].get<std::string>(), true);
  bad("prompt", "'prompt' must be a string, a one-string array or an array of token ids");
}

std::string chat_prompt(const json& body, std::string_view text, const ChatRenderer& render_chat) {
  const json* messages = field(body, "messages");
  if (messages == nullptr || !messages->is_array() || messages->empty())
    bad("messages", "'messages' must be a non-empty array");
  for (const json& m : *messages) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      bad("messages", "every message must be an object with a string 'role'");
    if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null() &&
        !m["content"].is_array())
      bad("messages", "a message's 'content' must be a string or an array of parts");
  }
  if (!render_chat)
    bad("messages", "this model has no chat template: use /v1/completions with a prompt");
  const json* tools = field(body, "tools");
  if (tools != nullptr && !tools->is_array()) bad("tools", "'tools' must be an array");
  try {
    // Read again in the client's key order (the depth was bounded by the first read).
    const auto ordered = nlohmann::ordered_json::parse(text);
    return render_chat(ordered["messages"], tools ? ordered["tools"] : nlohmann::ordered_json());
  } catch (const Error& e) {
    bad("messages", str_cat("the chat template failed: ", e.what()));
  }
}

}  // namespace

json error_body(const RequestError& error) {
  return {{"error",
           {{"message", error.message},
            {"type", error.type},
            {"param", error.param.empty() ? json(nullptr) : json(error.param)},
            {"code", error.code.empty() ? json(nullptr) : json(error.code)}}}};
}

ParsedRequest parse_request(Endpoint endpoint, const std::string& text, const Model& model,
                            const RequestDefaults& defaults, const ChatRenderer& render_chat) {
  json body;
  try {
    body = parse_json(text, "the request body");
  } catch (const Error& e) {
    bad("", e.what());
  }
  if (!body.is_object()) bad("", "the request body must be a JSON object");
  if (const json* m = field(body, "model")) {
    if (!m->is_string()) bad("model", "'model' must be a string");
    if (m->get<std::string>() != defaults.model_id)
      throw RequestError{
          .status = 404,
          .message = str_cat("model '", m->get<std::string>(),
                             "' does not exist (this server serves '", defaults.model_id, "')"),
          .param = "model",
          .code = "model_not_found"};
  }
  if (integer_field(body, "n", 1, 1, 1) != 1) bad("n", "'n' must be 1");
  if (const json* v = field(body, "logprobs");
      v != nullptr && !(v->is_boolean() && !v->get<bool>()))
    bad("logprobs", "'logprobs' is not supported");
  if (bool_field(body, "echo", false)) bad("echo", "'echo' is not supported");

  ParsedRequest out;
  SequenceRequest& r = out.sequence;
  r.keys = defaults.keys;
  r.values = defaults.values;
  r.selector = defaults.selector;
  r.prompt = endpoint == Endpoint::Completions
                 ? prompt_tokens(body, model)
                 : model.tokenizer().encode(chat_prompt(body, text, render_chat), false);
  if (r.prompt.empty()) bad("prompt", "the prompt has no tokens");
  const int64_t context = model.config().max_positions;
  const int64_t prompt_length = static_cast<int64_t>(r.prompt.size());
  const int64_t room = context > 0 ? context - prompt_length : defaults.max_tokens_limit;
  if (room < 1)
    throw RequestError{.status = 400,
                       .message = str_cat("the prompt has ", prompt_length,
                                          " tokens; the model's context is ", context),
                       .param = "messages",
                       .code = "context_length_exceeded"};
  // Unset, a completion gets OpenAI's 16 tokens and a chat what the context leaves.
  const int64_t fallback =
      endpoint == Endpoint::Completions ? 16 : std::min(room, defaults.max_tokens_limit);
  const char* max_name =
      field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  r.max_tokens = integer_field(body, max_name, fallback, 1, defaults.max_tokens_limit);
  if (r.max_tokens > room)
    throw RequestError{
        .status = 400,
        .message = str_cat("the prompt has ", prompt_length, " tokens and ", max_name, " is ",
                           r.max_tokens, "; the model's context is ", context),
        .param = max_name,
        .code = "context_length_exceeded"};
  r.sampling.temperature = number_field(body, "temperature", 1.0, 0.0, 2.0);
  r.sampling.top_p = number_field(body, "top_p", 1.0, 0.0, 1.0);
  if (r.sampling.top_p == 0) bad("top_p", "'top_p' must be > 0");
  r.sampling.top_k = integer_field(body, "top_k", 0, 0, model.config().vocab_size);
  static std::atomic<uint64_t> unseeded{0x9E3779B97F4A7C15ULL};
  const json* seed = field(body, "seed");
  if (seed != nullptr && !seed->is_number_integer()) bad("seed", "'seed' must be an integer");
  r.sampling.seed = seed != nullptr
                        ? static_cast<uint64_t>(seed->get<int64_t>())
                        : unseeded.fetch_add(static_cast<uint64_t>(
                              std::chrono::steady_clock::now().time_since_epoch().count()));
  r.stop = stop_strings(body);
  apply_extension(body, r);
  out.stream = bool_field(body, "stream", false);
  return out;
}

json response_body(Endpoint endpoint, const std::string& id, int64_t created,
                   const std::string& model_id, const std::string& text,
                   const std::string& finish_reason, int64_t prompt_tokens,
                   int64_t completion_tokens) {
  json choice = {{"index", 0}, {"finish_reason", finish_reason}, {"logprobs", nullptr}};
  if (endpoint == Endpoint::Completions)
    choice["text"] = text;
  else
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  return {{"id", id},
          {"object", endpoint == Endpoint::Completions ? "text_completion" : "chat.completion"},
          {"created", created},
          {"model", model_id},
          {"choices", json::array({choice})},
          {"usage",
           {{"prompt_tokens", prompt_tokens},
            {"completion_tokens", completion_tokens},
            {"total_tokens", prompt_tokens + completion_tokens}}}};
}

json stream_chunk(Endpoint endpoint, const std::string& id, int64_t created,
                  const std::string& model_id, const std::string& text,
                  const std::string& finish_reason, bool first) {
  json choice = {{"index", 0},
                 {"finish_reason", finish_reason.empty() ? json(nullptr) : json(finish_reason)},
                 {"logprobs", nullptr}};
  if (endpoint == Endpoint::Completions) {
    choice["text"] = text;
  } else {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!text.empty() || (first && finish_reason.empty())) delta["content"] = text;
    choice["delta"] = delta;
  }
  return {
      {"id", id},
      {"object", endpoint == Endpoint::Completions ? "text_completion" : "chat.completion.chunk"},
      {"created", created},
      {"model", model_id},
      {"choices", json::array({choice})}};
}

}  // namespace visikv

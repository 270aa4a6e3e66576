// The OpenAI API's request and response bodies, as `visikv serve` speaks them: requests are
// checked field by field into a SequenceRequest (a wrong type, range or unknown model is a
// RequestError that becomes a 4xx error body); responses and stream chunks are built here.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "visikv/model/model.h"
#include "visikv/serve/scheduler.h"

namespace visikv {

// A client's mistake: HTTP status, OpenAI error type, the offending parameter (or empty).
struct RequestError {
  int status = 400;
  std::string message;
  std::string param;
  std::string type = "invalid_request_error";
  std::string code;
};

// {"error": {"message", "type", "param", "code"}}.
nlohmann::json error_body(const RequestError& error);

enum class Endpoint { Completions, ChatCompletions };

// What the server fills in where a request is silent, and the limits it enforces.
struct RequestDefaults {
  std::string model_id;  // the one model served, as /v1/models names it
  KeyCodecSpec keys;
  ValueCodecSpec values;
  SelectorSpec selector;
  int64_t max_tokens_limit = 4096;  // per request
};

// Renders a chat's messages (the request's "messages" array, already checked to be a non-empty
// array of objects) and its "tools" (null when absent) into the prompt text, through the model's
// chat template. Both keep the request's key order, which a template's tojson prints.
using ChatRenderer = std::function<std::string(const nlohmann::ordered_json& messages,
                                               const nlohmann::ordered_json& tools)>;

struct ParsedRequest {
  SequenceRequest sequence;
  bool stream = false;
};

// Throws RequestError. `render_chat` is used for chat completions (empty: the model has none).
ParsedRequest parse_request(Endpoint endpoint, const std::string& body, const Model& model,
                            const RequestDefaults& defaults, const ChatRenderer& render_chat);

// A whole response, or one stream chunk ("data: ..." payload) carrying `text`; `finish_reason`
// empty while the stream goes on.
nlohmann::json response_body(Endpoint endpoint, const std::string& id, int64_t created,
                             const std::string& model_id, const std::string& text,
                             const std::string& finish_reason, int64_t prompt_tokens,
                             int64_t completion_tokens);
nlohmann::json stream_chunk(Endpoint endpoint, const std::string& id, int64_t created,
                            const std::string& model_id, const std::string& text,
                            const std::string& finish_reason, bool first);

}  // namespace visikv

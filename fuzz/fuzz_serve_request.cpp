// Request bodies of `visikv serve` (serve/openai_api.h): any bytes a client sends to
// /v1/completions or /v1/chat/completions are either a request the scheduler can run (prompt
// tokens in the vocabulary, within the context, codecs that fit the model) or a RequestError with
// a 4xx status, never a crash or another exception. Chats go through a real chat template.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "fuzz_support.h"
#include "visikv/model/model.h"
#include "visikv/serve/openai_api.h"
#include "visikv/tokenizer/chat_template.h"

using namespace visikv;

namespace {

struct Setup {
  Model model = Model::load(std::string(VISIKV_FIXTURES) + "/models/llama");
  RequestDefaults defaults{.model_id = "llama", .max_tokens_limit = 64};
  ChatRenderer render_chat;

  Setup() {
    std::ifstream file(std::string(VISIKV_FIXTURES) + "/chat_templates/templates/smollm2.jinja");
    std::stringstream source;
    source << file.rdbuf();
    auto chat = std::make_shared<const ChatTemplate>(ChatTemplate::parse(source.str()));
    render_chat = [chat](const nlohmann::ordered_json& messages,
                         const nlohmann::ordered_json& tools) {
      return chat->render(messages, true, tools);
    };
  }
};

void check(const ParsedRequest& r, const Setup& s) {
  const Config& c = s.model.config();
  bool ok =
      !r.sequence.prompt.empty() && r.sequence.max_tokens >= 1 &&
      static_cast<int64_t>(r.sequence.prompt.size()) + r.sequence.max_tokens <= c.max_positions;
  for (int32_t id : r.sequence.prompt) ok = ok && id >= 0 && id < c.vocab_size;
  if (!ok) {
    std::fprintf(stderr, "accepted a request the scheduler cannot run\n");
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Setup setup;
  const std::string body(reinterpret_cast<const char*>(data), size);
  for (Endpoint endpoint : {Endpoint::Completions, Endpoint::ChatCompletions}) {
    try {
      check(parse_request(endpoint, body, setup.model, setup.defaults, setup.render_chat), setup);
    } catch (const RequestError& e) {
      if (e.status < 400 || e.status >= 500 || e.message.empty()) {
        std::fprintf(stderr, "a request error with status %d and message '%s'\n", e.status,
                     e.message.c_str());
        std::abort();
      }
    }
  }
  return 0;
}

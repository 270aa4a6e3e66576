#include <pthread.h>
#include <signal.h>

#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/model/matmul.h"
#include "visikv/model/model.h"
#include "visikv/serve/server.h"
#include "visikv/tokenizer/chat_template.h"

namespace visikv::cli {

namespace {
struct ServeFlags {
  // numerics: int16 by default, as generate's (cmd_generate.cpp).
  std::string model, host = "127.0.0.1", keys = "f32", values = "f32", selector = "dense", model_id,
                     numerics = "int16";
  int port = 8080;
  int64_t max_sequences = 8, max_tokens = 4096, max_body_bytes = 1 << 20;
};
}  // namespace

void add_serve_command(CLI::App& app) {
  auto flags = std::make_shared<ServeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--host", flags->host, "address to listen on (default 127.0.0.1)");
  cmd->add_option("--port", flags->port, "port (default 8080; 0 = any free port)")
      ->check(CLI::Range(0, 65535));
  cmd->add_option("--keys", flags->keys, "default key cache codec (docs/CACHE_SPECS.md)");
  cmd->add_option("--values", flags->values, "default value cache codec");
  cmd->add_option("--selector", flags->selector,
                  "default attention support (docs/SELECTOR_SPECS.md)");
  add_numerics_option(*cmd, flags->numerics);
  cmd->add_option("--model-id", flags->model_id,
                  "the model's name in the API (default: the file or directory name)");
  cmd->add_option("--max-sequences", flags->max_sequences,
                  "sequences generated at once; more requests wait (default 8)")
      ->check(CLI::Range(int64_t{1}, int64_t{1024}));
  cmd->add_option("--max-tokens", flags->max_tokens,
                  "new tokens per request at most (default 4096)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  cmd->add_option("--max-body-bytes", flags->max_body_bytes,
                  "largest request body accepted (default 1 MiB)")
      ->check(CLI::Range(int64_t{1024}, int64_t{1} << 30));
  cmd->callback([flags] {
    apply_global_options();
    ServeOptions options;
    options.host = flags->host;
    options.port = flags->port;
    options.max_sequences = flags->max_sequences;
    options.max_body_bytes = flags->max_body_bytes;
    options.rounding = numerics_rounding(flags->numerics);
    RequestDefaults& d = options.defaults;
    d.keys = parse_flag("--keys", flags->keys, parse_key_codec_spec);
    d.values = parse_flag("--values", flags->values, parse_value_codec_spec);
    d.selector = parse_flag("--selector", flags->selector, parse_selector_spec);
    d.max_tokens_limit = flags->max_tokens;
    // SIGINT and SIGTERM are taken by a thread of their own (below), so every thread started
    // from here on leaves them blocked.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    const Model model = Model::load(flags->model);
    d.model_id = !flags->model_id.empty()
                     ? flags->model_id
                     : std::filesystem::path(model.source()).filename().string();
    // Chats are rendered with the model's own template, as transformers renders them; a model
    // without one serves completions only.
    ChatRenderer render_chat;
    if (model.tokenizer().chat_template()) {
      auto chat =
          std::make_shared<const ChatTemplate>(ChatTemplate::from_tokenizer(model.tokenizer()));
      auto special = chat_template_special_tokens(model.tokenizer());
      render_chat = [chat, special](const nlohmann::ordered_json& messages,
                                    const nlohmann::ordered_json& tools) {
        return chat->render(messages, true, tools, special);
      };
    }
    Server server(model, options, render_chat);
    const int port = server.bind();
    std::cerr << "visikv serve: " << d.model_id << " on http://" << flags->host << ":" << port
              << " (keys " << flags->keys << ", values " << flags->values << ", attention "
              << flags->selector << "; up to " << flags->max_sequences << " sequences at once"
              << (render_chat ? "" : "; no chat template: completions only") << ")" << std::endl;
    std::thread stopper([&] {
      int signal = 0;
      sigwait(&signals, &signal);
      std::cerr << "visikv serve: stopping" << std::endl;
      server.stop();
    });
    server.run();
    // run() also returns when the socket fails; the stopper then still waits for its signal.
    pthread_kill(stopper.native_handle(), SIGTERM);
    stopper.join();
  });
}

}  // namespace visikv::cli

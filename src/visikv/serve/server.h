// `visikv serve`: an OpenAI-compatible HTTP server over one model (cpp-httplib). Endpoints:
// /v1/models, /v1/completions, /v1/chat/completions (both with "stream": true as server-sent
// events), /health and /metrics (Prometheus text). Requests run as sequences of one Scheduler,
// several at once; a client that goes away mid-stream cancels its sequence.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "visikv/model/matmul.h"
#include "visikv/model/model.h"
#include "visikv/serve/openai_api.h"

namespace visikv {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (bind() returns it)
  RequestDefaults defaults;
  int64_t max_sequences = 8;         // run at once; the rest queue
  int64_t max_body_bytes = 1 << 20;  // request bodies beyond are refused (413)
  int http_threads = 64;             // connections served at once
  // How the weight products round (model/matmul.h); `visikv serve` sets its --numerics.
  ProductRounding rounding = ProductRounding::Fastest;
};

class Server {
 public:
  Server(const Model& model, ServeOptions options, ChatRenderer render_chat);
  ~Server();

  // Binds the address; returns the port. Throws visikv::Error naming the address on failure.
  int bind();
  // Serves until stop() (from another thread or a signal handler's thread).
  void run();
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace visikv

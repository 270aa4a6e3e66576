#include "visikv/serve/server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <numeric>
#include <sstream>

#include "visikv/core/error.h"
#include "visikv/serve/scheduler.h"

namespace visikv {

namespace {

using json = nlohmann::json;

// JSON out: invalid UTF-8 (which the engine never produces) would be replaced, not thrown.
std::string dump(const json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

void send_error(httplib::Response& res, const RequestError& error) {
  res.status = error.status;
  res.set_content(dump(error_body(error)), "application/json");
}

}  // namespace

struct Server::Impl {
  Impl(const Model& m, ServeOptions o, ChatRenderer chat)
      : model(m),
        options(std::move(o)),
        render_chat(std::move(chat)),
        scheduler(m, options.max_sequences, options.rounding) {}

  void install() {
    const int threads = options.http_threads;
    http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    http.set_payload_max_length(static_cast<size_t>(options.max_body_bytes));
    http.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"status":"ok"})", "application/json");
    });
    http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(dump({{"object", "list"},
                            {"data", json::array({{{"id", options.defaults.model_id},
                                                   {"object", "model"},
                                                   {"created", started},
                                                   {"owned_by", "visikv"}}})}}),
                      "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics(), "text/plain; version=0.0.4");
    });
    http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      complete(Endpoint::Completions, req, res);
    });
    http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      complete(Endpoint::ChatCompletions, req, res);
    });
    // Whatever httplib answers by itself (404, 405, 413 for a body over the limit) gets an
    // OpenAI-style body too.
    http.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      std::string message = res.status == 404   ? "no such endpoint: " + req.path
                            : res.status == 413 ? "the request body is too large"
                                                : "the request could not be served";
      send_error(res, {.status = res.status, .message = message});
    });
    http.set_exception_handler(
        [](const httplib::Request&, httplib::Response& res, std::exception_ptr error) {
          std::string message = "internal error";
          try {
            std::rethrow_exception(error);
          } catch (const std::exception& e) {
            message = e.what();
          } catch (...) {
          }
          send_error(res, {.status = 500, .message = message, .type = "server_error"});
        });
  }

  void complete(Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
    ParsedRequest parsed;
    try {
      parsed = parse_request(endpoint, req.body, model, options.defaults, render_chat);
    } catch (const RequestError& error) {
      return send_error(res, error);
    }
    const std::string id =
        str_cat(endpoint == Endpoint::Completions ? "cmpl-" : "chatcmpl-", std::hex, next_id++);
    const int64_t created = std::time(nullptr);
    std::shared_ptr<SequenceHandle> handle = scheduler.submit(std::move(parsed.sequence));
    const std::string& model_id = options.defaults.model_id;
    if (!parsed.stream) {
      std::string text;
      SequenceUpdate update;
      do {
        update = handle->next();
        text += update.text;
      } while (!update.finished);
      if (update.finish_reason == "error")
        return send_error(res, {.status = 500, .message = update.error, .type = "server_error"});
      res.set_content(
          dump(response_body(endpoint, id, created, model_id, text, update.finish_reason,
                             update.prompt_tokens, update.completion_tokens)),
          "application/json");
      return;
    }
    // Server-sent events: a chunk per update, then [DONE]. A failed write (the client closed
    // the connection) cancels the sequence.
    auto first = std::make_shared<bool>(true);
    res.set_chunked_content_provider(
        "text/event-stream",
        [handle, first, endpoint, id, created, model_id](size_t, httplib::DataSink& sink) {
          const SequenceUpdate update = handle->next();
          const auto send = [&](const std::string& payload) {
            const std::string event = "data: " + payload + "\n\n";
            return sink.write(event.data(), event.size());
          };
          if (update.finish_reason == "error") {
            send(
                dump(error_body({.status = 500, .message = update.error, .type = "server_error"})));
            sink.done();
            return true;
          }
          if (!update.text.empty() || *first || update.finished) {
            if (!send(dump(stream_chunk(endpoint, id, created, model_id, update.text,
                                        update.finished ? update.finish_reason : "", *first)))) {
              handle->cancel();
              return false;
            }
            *first = false;
          }
          if (update.finished) {
            send("[DONE]");
            sink.done();
          }
          return true;
        },
        [handle](bool success) {
          if (!success) handle->cancel();
        });
  }

  std::string metrics() const {
    const SchedulerStats s = scheduler.stats();
    const int64_t kv_total = std::accumulate(s.kv_bytes.begin(), s.kv_bytes.end(), int64_t{0});
    const int64_t kv_max =
        s.kv_bytes.empty() ? 0 : *std::max_element(s.kv_bytes.begin(), s.kv_bytes.end());
    std::ostringstream out;
    const auto metric = [&](const char* name, const char* type, const char* help, double value) {
      out << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n"
          << name << " " << value << "\n";
    };
    metric("visikv_requests_total", "counter", "Completion requests accepted.",
           static_cast<double>(s.requests));
    metric("visikv_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
           static_cast<double>(s.prompt_tokens));
    metric("visikv_generated_tokens_total", "counter", "Tokens generated.",
           static_cast<double>(s.generated_tokens));
    metric("visikv_generated_tokens_per_second", "gauge",
           "Tokens generated per second over the recent rounds, all sequences together.",
           s.generated_tokens_per_s);
    metric("visikv_active_sequences", "gauge", "Sequences being generated.",
           static_cast<double>(s.active));
    metric("visikv_queued_sequences", "gauge", "Sequences waiting for a slot.",
           static_cast<double>(s.queued));
    metric("visikv_kv_cache_bytes", "gauge",
           "KV cache bytes of the active sequences, as their codecs store them.",
           static_cast<double>(kv_total));
    metric(
        "visikv_kv_cache_tokens", "gauge", "Tokens held in the active sequences' caches.",
        static_cast<double>(std::accumulate(s.kv_tokens.begin(), s.kv_tokens.end(), int64_t{0})));
    metric("visikv_kv_cache_bytes_per_sequence", "gauge",
           "Mean KV cache bytes per active sequence.",
           s.kv_bytes.empty() ? 0.0 : static_cast<double>(kv_total) / s.kv_bytes.size());
    metric("visikv_kv_cache_bytes_max_sequence", "gauge",
           "KV cache bytes of the largest active sequence.", static_cast<double>(kv_max));
    return out.str();
  }

  const Model& model;
  ServeOptions options;
  ChatRenderer render_chat;
  Scheduler scheduler;
  httplib::Server http;
  std::atomic<uint64_t> next_id{1};
  int64_t started = std::time(nullptr);
};

Server::Server(const Model& model, ServeOptions options, ChatRenderer render_chat)
    : impl_(std::make_unique<Impl>(model, std::move(options), std::move(render_chat))) {
  impl_->install();
}

Server::~Server() = default;

int Server::bind() {
  const ServeOptions& o = impl_->options;
  if (o.port == 0) {
    const int port = impl_->http.bind_to_any_port(o.host);
    require(port > 0, "cannot listen on ", o.host, " (any port)");
    return port;
  }
  require(impl_->http.bind_to_port(o.host, o.port), "cannot listen on ", o.host, ":", o.port,
          " (in use, or not an address of this machine)");
  return o.port;
}

void Server::run() { impl_->http.listen_after_bind(); }

void Server::stop() { impl_->http.stop(); }

}  // namespace visikv

#include "visikv/serve/scheduler.h"

#include <algorithm>
#include <chrono>

#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/eval/generate.h"
#include "visikv/eval/text_stream.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"

namespace visikv {

SequenceUpdate SequenceHandle::next() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return has_update_; });
  SequenceUpdate out = std::move(queued_);
  queued_ = {};
  has_update_ = false;
  return out;
}

void SequenceHandle::post(SequenceUpdate update) {
  {
    std::lock_guard lock(mutex_);
    queued_.text += update.text;
    queued_.finished = update.finished;
    queued_.finish_reason = std::move(update.finish_reason);
    queued_.error = std::move(update.error);
    queued_.prompt_tokens = update.prompt_tokens;
    queued_.completion_tokens = update.completion_tokens;
    has_update_ = true;
  }
  changed_.notify_all();
}

// One running sequence: its cache, support, sampler and text.
struct Scheduler::Active {
  Active(const CacheShape& shape, SequenceRequest r, std::shared_ptr<SequenceHandle> h)
      : request(std::move(r)),
        handle(std::move(h)),
        support(make_support(request.selector)),
        sampler(request.sampling),
        text(request.stop) {
    cache = make_cache(
        shape, request.keys, request.values,
        generation_cache_reserve(static_cast<int64_t>(request.prompt.size()), request.max_tokens),
        request.selector.cache_block_size());
    prepare_summaries(*cache, request.selector, nullptr);
  }

  int64_t kv_bytes(const CacheShape& shape) const {
    const int64_t tokens = cache->length(0);
    const int64_t bits = codec_stored_bits(request.keys.codec, shape.head_dim, tokens) +
                         codec_stored_bits(request.values.codec, shape.head_dim, tokens);
    return shape.layers * shape.kv_heads * bits / 8;
  }

  SequenceRequest request;
  std::shared_ptr<SequenceHandle> handle;
  std::unique_ptr<KVCache> cache;
  std::unique_ptr<Support> support;
  Sampler sampler;
  TextStream text;
  std::vector<int32_t> generated;
  bool finished = false;
};

Scheduler::Scheduler(const Model& model, int64_t max_active, ProductRounding rounding)
    : model_(model),
      max_active_(std::max<int64_t>(1, max_active)),
      rounding_(rounding),
      stops_(stop_tokens(model)) {
  worker_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  work_.notify_all();
  worker_.join();
}

std::shared_ptr<SequenceHandle> Scheduler::submit(SequenceRequest request) {
  auto handle = std::make_shared<SequenceHandle>();
  {
    std::lock_guard lock(mutex_);
    ++stats_.requests;
    stats_.prompt_tokens += static_cast<int64_t>(request.prompt.size());
    queue_.emplace_back(std::move(request), handle);
    stats_.queued = static_cast<int64_t>(queue_.size());
  }
  work_.notify_all();
  return handle;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void Scheduler::loop() {
  std::vector<std::unique_ptr<Active>> active;
  // One decoder for every round: its scratch buffers grow to the largest round and stay.
  Decoder decoder(model_);
  decoder.set_product_rounding(rounding_);
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      work_.wait(lock, [&] { return stopping_ || !queue_.empty() || !active.empty(); });
      if (stopping_) break;
      while (!queue_.empty() && static_cast<int64_t>(active.size()) < max_active_) {
        auto [request, handle] = std::move(queue_.front());
        queue_.pop_front();
        try {
          active.push_back(
              std::make_unique<Active>(decoder.cache_shape(), std::move(request), handle));
        } catch (const std::exception& e) {
          handle->post({.finished = true, .finish_reason = "error", .error = e.what()});
        }
      }
      stats_.queued = static_cast<int64_t>(queue_.size());
    }
    round(active, decoder);
  }
  // Whatever is left ends with an error, so no request thread waits forever.
  for (auto& a : active)
    a->handle->post({.finished = true, .finish_reason = "error", .error = "the server stopped"});
  std::lock_guard lock(mutex_);
  for (auto& [request, handle] : queue_)
    handle->post({.finished = true, .finish_reason = "error", .error = "the server stopped"});
}

void Scheduler::round(std::vector<std::unique_ptr<Active>>& active, Decoder& decoder) {
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  const Tokenizer& tokenizer = model_.tokenizer();
  const int64_t vocab = model_.config().vocab_size;

  // Who runs this round, and with which tokens: a new sequence its prompt, the others their last
  // token. Cancelled ones stop here.
  std::vector<Active*> running;
  for (auto& a : active) {
    if (a->handle->cancelled()) {
      a->finished = true;
      continue;
    }
    running.push_back(a.get());
  }
  std::vector<DecoderSegment> segments;
  std::vector<std::vector<float>> logits(running.size());
  for (size_t i = 0; i < running.size(); ++i) {
    Active& a = *running[i];
    const std::span<const int32_t> tokens = a.generated.empty()
                                                ? std::span<const int32_t>(a.request.prompt)
                                                : std::span<const int32_t>(&a.generated.back(), 1);
    segments.push_back({.tokens = tokens,
                        .cache = a.cache.get(),
                        .rows = LogitRows::Last,
                        .sink =
                            [&logits, i, vocab](int64_t, int64_t, std::span<const float> l) {
                              logits[i].assign(l.end() - vocab, l.end());
                            },
                        .attention = {.support = a.support.get()}});
  }
  int64_t produced = 0;
  try {
    decoder.forward_batch(segments);
  } catch (const std::exception& e) {
    for (Active* a : running) {
      a->handle->post({.finished = true, .finish_reason = "error", .error = e.what()});
      a->finished = true;
    }
    running.clear();
  }
  // Sampling a large vocabulary costs milliseconds (a sort and an exp per token); each sequence
  // has its own sampler, so the sequences draw in parallel and each draws what it would alone.
  std::vector<int32_t> tokens(running.size());
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < running.size(); ++i) tokens[i] = running[i]->sampler.next(logits[i]);
  for (size_t i = 0; i < running.size(); ++i) {
    Active& a = *running[i];
    const int32_t token = tokens[i];
    a.generated.push_back(token);
    ++produced;
    const bool eos = std::find(stops_.begin(), stops_.end(), token) != stops_.end();
    std::string text = eos || tokenizer.is_special(token)
                           ? std::string()
                           : a.text.push(tokenizer.token_bytes(token));
    const bool length = static_cast<int64_t>(a.generated.size()) >= a.request.max_tokens;
    a.finished = eos || a.text.stopped() || length;
    if (a.finished && !a.text.stopped()) text += a.text.flush();
    a.handle->post({.text = std::move(text),
                    .finished = a.finished,
                    .finish_reason =
                        a.finished ? (length && !eos && !a.text.stopped() ? "length" : "stop") : "",
                    .prompt_tokens = static_cast<int64_t>(a.request.prompt.size()),
                    .completion_tokens = static_cast<int64_t>(a.generated.size())});
  }
  std::erase_if(active, [](const std::unique_ptr<Active>& a) { return a->finished; });

  const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
  const CacheShape shape = decoder.cache_shape();
  std::lock_guard lock(mutex_);
  stats_.active = static_cast<int64_t>(active.size());
  stats_.generated_tokens += produced;
  if (produced > 0 && seconds > 0)
    stats_.generated_tokens_per_s =
        0.8 * stats_.generated_tokens_per_s + 0.2 * (static_cast<double>(produced) / seconds);
  stats_.kv_bytes.clear();
  stats_.kv_tokens.clear();
  for (const auto& a : active) {
    stats_.kv_bytes.push_back(a->kv_bytes(shape));
    stats_.kv_tokens.push_back(a->cache->length(0));
  }
}

}  // namespace visikv

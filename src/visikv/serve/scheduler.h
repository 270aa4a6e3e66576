// The sequences a server runs at once. Requests queue; a worker thread admits up to a limit of
// them, then steps every active sequence once per round: a new one prefills its prompt, the
// others decode one token each in one forward call over all of them (Decoder::forward_batch: the
// weights are read once per round, whatever the number of sequences). Each sequence has its own
// cache (its own codecs) and attention support. Text goes back to the request's thread through
// its handle, as it is generated; a handle can cancel its sequence (a client gone).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/eval/sampler.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {

struct SequenceRequest {
  std::vector<int32_t> prompt;  // non-empty; prompt + max_tokens within the context
  int64_t max_tokens = 16;
  SamplingOptions sampling;
  std::vector<std::string> stop;  // stop strings: the text ends before the first one
  KeyCodecSpec keys;
  ValueCodecSpec values;
  SelectorSpec selector;
};

// What a sequence has produced since the last look.
struct SequenceUpdate {
  std::string text;  // whole UTF-8 characters, stop strings held back
  bool finished = false;
  std::string finish_reason;  // "stop" (EOS or a stop string), "length", or "error"
  std::string error;          // with finish_reason "error"
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

class SequenceHandle {
 public:
  // Blocks until the sequence has new text or has finished; merges what queued meanwhile.
  SequenceUpdate next();
  // Ends the sequence at the next round (its client is gone); idempotent.
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

 private:
  friend class Scheduler;
  void post(SequenceUpdate update);
  std::mutex mutex_;
  std::condition_variable changed_;
  SequenceUpdate queued_;
  bool has_update_ = false;
  std::atomic<bool> cancelled_{false};
};

struct SchedulerStats {
  int64_t active = 0, queued = 0;
  int64_t requests = 0, prompt_tokens = 0, generated_tokens = 0;
  double generated_tokens_per_s = 0;  // over the last completed rounds
  // KV cache bytes of each active sequence, as its codecs store them (kv/codec_spec.h), and the
  // tokens its cache holds.
  std::vector<int64_t> kv_bytes, kv_tokens;
};

class Scheduler {
 public:
  // `rounding`: how the weight products round (model/matmul.h); each token's activations round
  // on their own, so a sequence's tokens do not depend on the others in its rounds.
  Scheduler(const Model& model, int64_t max_active,
            ProductRounding rounding = ProductRounding::Fastest);
  ~Scheduler();  // stops the worker; queued and active sequences end with an error

  // Queues a request (checked by the caller against the model). Never blocks on the model.
  std::shared_ptr<SequenceHandle> submit(SequenceRequest request);
  SchedulerStats stats() const;

 private:
  struct Active;
  void loop();
  void round(std::vector<std::unique_ptr<Active>>& active, Decoder& decoder);

  const Model& model_;
  const int64_t max_active_;
  const ProductRounding rounding_;
  const std::vector<int32_t> stops_;  // tokens that end a sequence (eval/generate.h)
  mutable std::mutex mutex_;
  std::condition_variable work_;
  std::deque<std::pair<SequenceRequest, std::shared_ptr<SequenceHandle>>> queue_;
  bool stopping_ = false;
  SchedulerStats stats_;
  std::thread worker_;
};

}  // namespace visikv

// Text continuation: prefill the prompt, then decode one token at a time through the cache
// until EOS or the token limit.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "visikv/eval/context_limit.h"
#include "visikv/eval/sampler.h"
#include "visikv/kv/cache.h"
#include "visikv/model/decoder.h"

namespace visikv {

struct GenerationOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;
  bool stop_at_eos = true;
  // The support attention reads (attention/support.h; nullptr: dense). It keeps the refresh
  // rule's state, so reset() it between prompts.
  Support* support = nullptr;
  // Positions past the model's context (eval/context_limit.h): refused unless the user asked
  // for them (--allow-past-context), and then only on a RoPE model.
  PastContext past_context = PastContext::Refuse;
};

// Checks, before any forward pass, that a prompt of `prompt_tokens` tokens and then
// `max_new_tokens` new ones fit the model's context: the prompt alone first, then the whole
// sequence. Throws visikv::Error naming the numbers; when `past` allows going past the context
// and the run does, returns the warning to print.
std::optional<std::string> check_generation_context(const Config& config, int64_t prompt_tokens,
                                                    int64_t max_new_tokens, PastContext past);

// The tokens that end a generation: the model's EOS ids and the tokenizer's EOS.
std::vector<int32_t> stop_tokens(const Model& model);

// Tokens a generation's cache makes room for up front: the whole sequence, but at most 4096 past
// the prompt; the cache grows past that as tokens come, so a huge limit allocates nothing early.
int64_t generation_cache_reserve(int64_t prompt_tokens, int64_t max_new_tokens);

struct GenerationResult {
  std::vector<int32_t> tokens;  // new tokens only (the EOS that stopped it included)
  bool stopped_at_eos = false;
  double prefill_seconds = 0, decode_seconds = 0;
};

// One sequence's continuation, a token at a time: the first next() checks the context
// (check_generation_context with options.past_context) and prefills the prompt; each later one
// runs the previous token through the cache. Done after max_new_tokens tokens or, with
// stop_at_eos, after an end-of-sequence token. The decoder, the cache and options.support must
// outlive it.
class Generation {
 public:
  Generation(Decoder& decoder, KVCache& cache, std::span<const int32_t> prompt,
             const GenerationOptions& options);

  // The next token, or nothing when the generation is done.
  std::optional<int32_t> next();
  bool done() const;
  // The tokens so far, and the time spent in the prefill and in the decode steps.
  const GenerationResult& result() const { return result_; }

 private:
  Decoder& decoder_;
  KVCache& cache_;
  std::vector<int32_t> prompt_;
  GenerationOptions options_;
  std::vector<int32_t> stops_;
  Sampler sampler_;
  GenerationResult result_;
};

// The whole continuation at once (Generation); on_token is called with each new token as soon as
// it is chosen.
GenerationResult generate(Decoder& decoder, KVCache& cache, std::span<const int32_t> prompt,
                          const GenerationOptions& options,
                          const std::function<void(int32_t)>& on_token = {});

}  // namespace visikv

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

struct GenerationResult {
  std::vector<int32_t> tokens;  // new tokens only (the EOS that stopped it included)
  bool stopped_at_eos = false;
  double prefill_seconds = 0, decode_seconds = 0;
};

// on_token is called with each new token as soon as it is chosen. Checks the context first
// (check_generation_context with options.past_context).
GenerationResult generate(Decoder& decoder, KVCache& cache, std::span<const int32_t> prompt,
                          const GenerationOptions& options,
                          const std::function<void(int32_t)>& on_token = {});

}  // namespace visikv

// Text continuation: prefill the prompt, then decode one token at a time through the cache
// until EOS or the token limit.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

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
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // new tokens only (the EOS that stopped it included)
  bool stopped_at_eos = false;
  double prefill_seconds = 0, decode_seconds = 0;
};

// on_token is called with each new token as soon as it is chosen.
GenerationResult generate(Decoder& decoder, KVCache& cache, std::span<const int32_t> prompt,
                          const GenerationOptions& options,
                          const std::function<void(int32_t)>& on_token = {});

}  // namespace visikv

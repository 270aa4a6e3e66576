#include "visikv/eval/generate.h"

#include <algorithm>
#include <chrono>

#include "visikv/core/error.h"
#include "visikv/core/saturating.h"

namespace visikv {

std::optional<std::string> check_generation_context(const Config& config, int64_t prompt_tokens,
                                                    int64_t max_new_tokens, PastContext past) {
  // The prompt alone first: a prompt longer than the context (a long file, a post-processor that
  // adds many tokens) fails before its prefill, whatever -n says.
  const std::string prompt = str_cat("a prompt of ", prompt_tokens, " tokens");
  check_context(config, prompt_tokens, prompt, past);
  const int64_t positions = saturating_add(prompt_tokens, max_new_tokens);
  const std::string sequence = str_cat(prompt, " + ", max_new_tokens, " new tokens");
  if (!check_context(config, positions, sequence, past)) return std::nullopt;
  return past_context_warning(config, positions, sequence);
}

GenerationResult generate(Decoder& decoder, KVCache& cache, std::span<const int32_t> prompt,
                          const GenerationOptions& options,
                          const std::function<void(int32_t)>& on_token) {
  require(!prompt.empty(), "generation needs a non-empty prompt");
  require(options.max_new_tokens >= 0, "the number of new tokens must be >= 0");
  const Config& config = decoder.model().config();
  check_generation_context(config, static_cast<int64_t>(prompt.size()), options.max_new_tokens,
                           options.past_context);
  std::vector<int32_t> stops = config.eos_ids;
  if (auto eos = decoder.model().tokenizer().eos_id()) stops.push_back(*eos);

  Sampler sampler(options.sampling);
  GenerationResult result;
  using Clock = std::chrono::steady_clock;
  auto started = Clock::now();
  std::vector<float> logits = decoder.next_logits(prompt, cache, {.support = options.support});
  result.prefill_seconds = std::chrono::duration<double>(Clock::now() - started).count();
  started = Clock::now();
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    const int32_t token = sampler.next(logits);
    result.tokens.push_back(token);
    if (on_token) on_token(token);
    if (options.stop_at_eos && std::find(stops.begin(), stops.end(), token) != stops.end()) {
      result.stopped_at_eos = true;
      break;
    }
    if (i + 1 < options.max_new_tokens)
      logits = decoder.next_logits({&token, 1}, cache, {.support = options.support});
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - started).count();
  return result;
}

}  // namespace visikv

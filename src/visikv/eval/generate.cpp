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

std::vector<int32_t> stop_tokens(const Model& model) {
  std::vector<int32_t> stops = model.config().eos_ids;
  if (auto eos = model.tokenizer().eos_id()) stops.push_back(*eos);
  return stops;
}

int64_t generation_cache_reserve(int64_t prompt_tokens, int64_t max_new_tokens) {
  constexpr int64_t kReserveAhead = 4096;
  return saturating_add(prompt_tokens, std::min(max_new_tokens, kReserveAhead));
}

Generation::Generation(Decoder& decoder, KVCache& cache, std::span<const int32_t> prompt,
                       const GenerationOptions& options)
    : decoder_(decoder),
      cache_(cache),
      prompt_(prompt.begin(), prompt.end()),
      options_(options),
      stops_(stop_tokens(decoder.model())),
      sampler_(options.sampling) {
  require(!prompt_.empty(), "generation needs a non-empty prompt");
  require(options.max_new_tokens >= 0, "the number of new tokens must be >= 0");
}

bool Generation::done() const {
  const int64_t count = static_cast<int64_t>(result_.tokens.size());
  return count >= options_.max_new_tokens || result_.stopped_at_eos;
}

std::optional<int32_t> Generation::next() {
  if (done()) return std::nullopt;
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  const AttentionOptions attention{.support = options_.support};
  std::vector<float> logits;
  if (result_.tokens.empty()) {
    check_generation_context(decoder_.model().config(), static_cast<int64_t>(prompt_.size()),
                             options_.max_new_tokens, options_.past_context);
    logits = decoder_.next_logits(prompt_, cache_, attention);
    result_.prefill_seconds = std::chrono::duration<double>(Clock::now() - started).count();
  } else {
    // The previous token goes through the cache only now, so that the last one never does.
    logits = decoder_.next_logits({&result_.tokens.back(), 1}, cache_, attention);
  }
  const int32_t token = sampler_.next(logits);
  if (!result_.tokens.empty())
    result_.decode_seconds += std::chrono::duration<double>(Clock::now() - started).count();
  result_.tokens.push_back(token);
  result_.stopped_at_eos =
      options_.stop_at_eos && std::find(stops_.begin(), stops_.end(), token) != stops_.end();
  return token;
}

GenerationResult generate(Decoder& decoder, KVCache& cache, std::span<const int32_t> prompt,
                          const GenerationOptions& options,
                          const std::function<void(int32_t)>& on_token) {
  Generation generation(decoder, cache, prompt, options);
  while (const std::optional<int32_t> token = generation.next())
    if (on_token) on_token(*token);
  return generation.result();
}

}  // namespace visikv

#include "visikv/eval/retrieval.h"

#include <algorithm>

#include "visikv/attention/support.h"
#include "visikv/core/error.h"
#include "visikv/eval/generate.h"
#include "visikv/kv/cache_factory.h"

namespace visikv {

PieceEncoder::PieceEncoder(const Tokenizer& tokenizer) : tokenizer_(tokenizer) {
  // With a dummy prefix, " x" encodes as one extra token before what "x" encodes to ("▁", "▁x");
  // a byte-level tokenizer gives one token for each ("Ġx", "x").
  const std::vector<int32_t> spaced = tokenizer.encode(" x", false);
  const std::vector<int32_t> plain = tokenizer.encode("x", false);
  if (spaced.size() == plain.size() + 1 &&
      std::equal(plain.begin(), plain.end(), spaced.begin() + 1))
    space_ = spaced[0];
}

std::vector<int32_t> PieceEncoder::operator()(std::string_view text) const {
  std::vector<int32_t> tokens = tokenizer_.encode(text, false);
  if (space_ && !text.empty() && (text[0] == ' ' || text[0] == '\n') && !tokens.empty() &&
      tokens[0] == *space_)
    tokens.erase(tokens.begin());
  return tokens;
}

std::vector<int32_t> splice_prompt(std::optional<int32_t> bos, std::span<const int32_t> preamble,
                                   std::span<const int32_t> haystack,
                                   std::span<const Splice> splices,
                                   std::span<const int32_t> question, int64_t length,
                                   std::string_view what) {
  int64_t fixed = (bos ? 1 : 0) + static_cast<int64_t>(preamble.size() + question.size());
  for (const Splice& s : splices) {
    require(s.depth >= 0.0 && s.depth <= 1.0, what, ": splice depth ", s.depth,
            " is outside [0, 1]");
    fixed += static_cast<int64_t>(s.tokens.size());
  }
  const int64_t hay = length - fixed;
  require(hay >= 1, what, ": a prompt of ", length, " tokens is too short for its fixed parts (",
          fixed, " tokens and at least one haystack token)");
  require(static_cast<int64_t>(haystack.size()) >= hay, what, ": the haystack text has ",
          haystack.size(), " tokens, length ", length, " needs ", hay);
  std::vector<int64_t> offsets(splices.size());
  for (size_t i = 0; i < splices.size(); ++i)
    offsets[i] = std::min<int64_t>(hay, std::llround(splices[i].depth * static_cast<double>(hay)));
  std::vector<size_t> by_offset(splices.size());
  for (size_t i = 0; i < by_offset.size(); ++i) by_offset[i] = i;
  std::stable_sort(by_offset.begin(), by_offset.end(),
                   [&](size_t a, size_t b) { return offsets[a] < offsets[b]; });
  std::vector<int32_t> prompt;
  prompt.reserve(static_cast<size_t>(length));
  if (bos) prompt.push_back(*bos);
  prompt.insert(prompt.end(), preamble.begin(), preamble.end());
  int64_t next = 0;
  for (size_t i : by_offset) {
    prompt.insert(prompt.end(), haystack.begin() + next, haystack.begin() + offsets[i]);
    next = offsets[i];
    prompt.insert(prompt.end(), splices[i].tokens.begin(), splices[i].tokens.end());
  }
  prompt.insert(prompt.end(), haystack.begin() + next, haystack.begin() + hay);
  prompt.insert(prompt.end(), question.begin(), question.end());
  require(static_cast<int64_t>(prompt.size()) == length, what, ": internal error, prompt of ",
          prompt.size(), " tokens for length ", length);
  return prompt;
}

std::vector<std::string> greedy_answers(Decoder& decoder, std::span<const AnswerRequest> requests,
                                        const KeyCodecSpec& key_codec,
                                        const ValueCodecSpec& value_codec,
                                        const SelectorSpec& selector,
                                        const AnswerProgress& progress, PastContext past_context) {
  require(!requests.empty(), "retrieval: no prompts");
  int64_t longest = 0;
  for (const AnswerRequest& r : requests)
    longest = std::max<int64_t>(longest, static_cast<int64_t>(r.prompt.size()) + r.answer_tokens);
  auto cache = make_cache(decoder.cache_shape(), key_codec, value_codec, longest,
                          selector.cache_block_size());
  prepare_summaries(*cache, selector, nullptr);
  const std::unique_ptr<Support> support = make_support(selector);
  GenerationOptions generation;
  generation.stop_at_eos = true;  // greedy: sampling temperature 0
  generation.support = support.get();
  generation.past_context = past_context;
  std::vector<std::string> answers;
  answers.reserve(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    cache->clear();
    support->reset();
    generation.max_new_tokens = requests[i].answer_tokens;
    const GenerationResult g = generate(decoder, *cache, requests[i].prompt, generation);
    answers.push_back(decoder.model().tokenizer().decode(g.tokens));
    if (progress) progress(static_cast<int64_t>(i) + 1, static_cast<int64_t>(requests.size()));
  }
  return answers;
}

}  // namespace visikv

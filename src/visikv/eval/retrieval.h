// What the retrieval evaluations (eval/needle.h, eval/ruler.h) share: prompts built in token
// space from a text with sentences spliced into it, and greedy answers to them under one
// configuration of cache codecs and attention selector.
//
// Prompts are assembled from token pieces, never re-tokenized as a whole, so a prompt's length
// is exactly the sum of its pieces and can be made to hit a requested length to the token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/eval/context_limit.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"

namespace visikv {

// Prompts are drawn from std::mt19937_64, which the standard specifies bit for bit, with plain
// modulo (std::uniform_int_distribution's algorithm is implementation-defined), so every platform
// builds the same prompts for a seed.
inline uint64_t draw_below(std::mt19937_64& rng, uint64_t n) { return rng() % n; }

// Moves `k` distinct elements of `items`, drawn uniformly, to its front (a partial Fisher-Yates
// shuffle); k is clamped to the size.
template <typename T>
void shuffle_front(std::mt19937_64& rng, std::vector<T>& items, size_t k) {
  k = std::min(k, items.size());
  for (size_t i = 0; i < k; ++i) std::swap(items[i], items[i + draw_below(rng, items.size() - i)]);
}

// Tokens of text pieces that go inside a prompt, after other tokens. A SentencePiece-style
// tokenizer puts a space (its dummy prefix, "▁") before any text it encodes; before a piece that
// starts with its own space or newline that is one space too many ("1.  word"), so such a lone
// leading space token is dropped. Byte-level tokenizers (GPT-2, SmolLM2, Qwen2) add nothing and
// are left alone.
class PieceEncoder {
 public:
  explicit PieceEncoder(const Tokenizer& tokenizer);
  std::vector<int32_t> operator()(std::string_view text) const;

 private:
  const Tokenizer& tokenizer_;
  std::optional<int32_t> space_;  // the lone space token a dummy prefix produces, if any
};

// Tokens spliced into a haystack at a depth: the fraction of the haystack's tokens before them.
struct Splice {
  std::vector<int32_t> tokens;
  double depth = 0;  // in [0, 1]
};

// BOS (when given), `preamble`, haystack tokens [0, h) with every splice inserted at token
// offset round(depth * h), then `question`; h is chosen so that the prompt holds exactly `length`
// tokens. Splices go in increasing offset, ties in their given order, so a chain of statements
// at non-decreasing depths keeps its order. Throws visikv::Error starting with `what` when the
// fixed parts leave no room for a haystack token or the haystack holds fewer than h tokens.
std::vector<int32_t> splice_prompt(std::optional<int32_t> bos, std::span<const int32_t> preamble,
                                   std::span<const int32_t> haystack,
                                   std::span<const Splice> splices,
                                   std::span<const int32_t> question, int64_t length,
                                   std::string_view what);

// One greedy answer per prompt.
struct AnswerRequest {
  std::span<const int32_t> prompt;
  int64_t answer_tokens = 0;  // at most this many new tokens; EOS stops earlier
};

using AnswerProgress = std::function<void(int64_t done, int64_t total)>;

// The decoded greedy answer to each request, every prompt through a fresh cache of the given
// codecs (one cache, cleared between prompts, sized for the longest) and attention through
// `selector`'s support (reset between prompts, so no choice leaks from one prompt to the next).
// `past_context` says whether a prompt may run past the model's context (eval/context_limit.h).
std::vector<std::string> greedy_answers(Decoder& decoder, std::span<const AnswerRequest> requests,
                                        const KeyCodecSpec& key_codec,
                                        const ValueCodecSpec& value_codec,
                                        const SelectorSpec& selector,
                                        const AnswerProgress& progress = {},
                                        PastContext past_context = PastContext::Refuse);

}  // namespace visikv

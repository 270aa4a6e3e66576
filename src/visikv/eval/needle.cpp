#include "visikv/eval/needle.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <optional>
#include <random>

#include "visikv/core/error.h"
#include "visikv/core/saturating.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/retrieval.h"

namespace visikv {

namespace {

constexpr std::array<const char*, 24> kNames = {
    "Alice",   "Boris", "Chen",  "Dmitri", "Elena",  "Farid",  "Greta", "Hiroshi",
    "Ingrid",  "Jamal", "Kofi",  "Lucia",  "Mateo",  "Nadia",  "Oskar", "Priya",
    "Quentin", "Rosa",  "Samir", "Tomas",  "Ulrike", "Viktor", "Wanda", "Yusuf"};

// The case's generator (drawn from as eval/retrieval.h says, so every platform builds the same
// prompts).
std::mt19937_64 case_generator(uint64_t seed, int64_t context, size_t depth_index,
                               int64_t needles) {
  const uint64_t mixed =
      seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(context) * 1000003ull +
      static_cast<uint64_t>(depth_index) * 7919ull + static_cast<uint64_t>(needles);
  return std::mt19937_64(mixed);
}

}  // namespace

void check_needle_options(const Config& config, const NeedleOptions& o) {
  require(!o.contexts.empty(), "needle: no context lengths given");
  require(!o.depths.empty(), "needle: no depths given");
  require(!o.needles.empty(), "needle: no needle counts given");
  require(o.answer_tokens >= 1, "needle: answer tokens must be >= 1, got ", o.answer_tokens);
  for (double d : o.depths)
    require(std::isfinite(d) && d >= 0.0 && d <= 1.0, "needle: depth ", d, " is outside [0, 1]");
  for (int64_t k : o.needles)
    require(k >= 1 && k <= static_cast<int64_t>(kNames.size()), "needle: needle count ", k,
            " is outside [1, ", kNames.size(), "]");
  for (int64_t c : o.contexts) {
    require(c >= 1, "needle: context length must be positive, got ", c);
    check_context(config, saturating_add(c, o.answer_tokens),
                  str_cat("needle: context ", c, " + ", o.answer_tokens, " answer tokens"));
  }
}

std::vector<NeedleCase> needle_cases(const Tokenizer& tokenizer, std::span<const int32_t> haystack,
                                     const NeedleOptions& o) {
  std::optional<int32_t> bos;
  if (tokenizer.adds_bos()) bos = tokenizer.bos_id();
  std::vector<NeedleCase> cases;
  for (int64_t context : o.contexts) {
    for (size_t di = 0; di < o.depths.size(); ++di) {
      for (int64_t k : o.needles) {
        std::mt19937_64 rng = case_generator(o.seed, context, di, k);
        // k distinct names: a partial Fisher-Yates shuffle.
        std::vector<size_t> order(kNames.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        shuffle_front(rng, order, static_cast<size_t>(k));
        std::vector<Splice> needles;
        std::string asked_digits;
        for (int64_t j = 0; j < k; ++j) {
          const std::string digits = std::to_string(100000 + draw_below(rng, 900000));
          if (j == 0) asked_digits = digits;
          // The asked needle keeps its depth (1.0 included); the others wrap around.
          const double depth =
              j == 0 ? o.depths[di] : std::fmod(o.depths[di] + static_cast<double>(j) / k, 1.0);
          needles.push_back({tokenizer.encode(std::string(" The secret number of ") +
                                                  kNames[order[j]] + " is " + digits + ".",
                                              false),
                             depth});
        }
        const std::string name = kNames[order[0]];
        const std::vector<int32_t> question = tokenizer.encode(
            " What is the secret number of " + name + "? The secret number of " + name + " is",
            false);
        NeedleCase c{context, o.depths[di], k, name, asked_digits, {}};
        c.prompt = splice_prompt(bos, {}, haystack, needles, question, context,
                                 str_cat("needle: context ", context, " with ", k, " needle(s)"));
        cases.push_back(std::move(c));
      }
    }
  }
  return cases;
}

NeedleRow needle_row(Decoder& decoder, std::span<const NeedleCase> cases,
                     const NamedSelectorSpec& named, const NeedleOptions& o,
                     const NeedleProgress& progress) {
  const auto started = std::chrono::steady_clock::now();
  require(!cases.empty(), "needle: no cases");
  std::vector<AnswerRequest> requests;
  for (const NeedleCase& c : cases) requests.push_back({c.prompt, o.answer_tokens});
  const std::vector<std::string> answers =
      greedy_answers(decoder, requests, o.key_codec, o.value_codec, named.spec, progress);
  NeedleRow row;
  row.selector = named.text;
  int64_t hits = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const NeedleCase& c = cases[i];
    NeedleResult r{c.context, c.depth, c.needles, c.digits, answers[i], false};
    r.hit = r.answer.find(c.digits) != std::string::npos;
    hits += r.hit ? 1 : 0;
    row.results.push_back(std::move(r));
  }
  row.exact_match_rate = static_cast<double>(hits) / static_cast<double>(cases.size());
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return row;
}

}  // namespace visikv

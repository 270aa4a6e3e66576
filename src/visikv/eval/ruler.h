// A long-context retrieval suite in the style of RULER (Hsieh et al., NVIDIA 2024, "RULER: What's
// the Real Context Size of Your Long-Context Language Models?"), generated in process from a text
// and a seed.
//
// Tasks (RULER's names and defaults; prompts are RULER's base-model templates):
//   niah_single      one needle " One of the special magic numbers for <key> is: <7 digits>."
//                    in the haystack; asked for its number
//   niah_multikey    the asked needle and `multi - 1` distractor needles with other keys
//   niah_multivalue  `multi` needles with one key and different numbers; asked for all of them
//   niah_multiquery  `multi` needles with different keys; asked for all their numbers
//   vt               variable tracking: a chain " VAR A = 12345." " VAR B = VAR A." ... of
//                    `vt_hops` + 1 variables at increasing depths; asked for every variable that
//                    holds the value
//   cwe              common-word extraction: a numbered list " 1. word 2. word ..." in which
//                    `cwe_words` words occur `cwe_common` times each and the rest `cwe_uncommon`
//                    times; asked for the `cwe_words` most common ones
//
// A length L counts what the model holds at the end, as RULER counts it: a prompt of exactly
// L - A tokens and A answer tokens (A: --answer-tokens, or the task's default), so a model's whole
// context is a valid length. The haystack is the text's tokens from an offset drawn per sample
// (the needles spliced in token space, eval/retrieval.h); cwe has no haystack but its list, and
// pads the few tokens the list cannot fill with text before it. Keys and the common-word task's
// words are lower-case words of the text (4 to 10 letters, none inside another of the same
// sample, so a substring match cannot credit one for another); numbers and variable names never
// occur in the text. Every prompt comes from std::mt19937_64 seeded by (seed, task, length,
// sample), so every configuration sees the same prompts and a seed reproduces them anywhere.
//
// Scoring is RULER's string_match_all: a sample scores the fraction of its expected strings found
// (case-insensitively) in the decoded greedy answer; a (task, length) cell averages its samples.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/retrieval.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"

namespace visikv {

enum class RulerTask {
  NiahSingle,
  NiahMultikey,
  NiahMultivalue,
  NiahMultiquery,
  VariableTracking,
  CommonWords
};

// Every task, in table order.
const std::vector<RulerTask>& all_ruler_tasks();
// "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe".
std::string ruler_task_name(RulerTask task);
// The task of a name; throws visikv::Error naming it and listing the known names.
RulerTask parse_ruler_task(std::string_view name);

struct RulerOptions {
  std::vector<int64_t> lengths = {4096, 8192, 16384, 32768};
  std::vector<RulerTask> tasks = all_ruler_tasks();
  int64_t samples = 4;  // per task and length
  uint64_t seed = 1;
  // Greedy answer tokens of every task; 0: each task's default (ruler_answer_tokens).
  int64_t answer_tokens = 0;
  // The tasks' shapes (RULER's defaults).
  int64_t multi = 4;         // needles of multikey (asked one included), multivalue, multiquery
  int64_t vt_hops = 4;       // assignments after the first: a chain of vt_hops + 1 variables
  int64_t cwe_words = 10;    // common words asked for
  int64_t cwe_common = 30;   // occurrences of each common word
  int64_t cwe_uncommon = 3;  // occurrences of each other word
  // Lengths past the model's context: refused, or (Allow) run on a RoPE model, which probes how
  // retrieval degrades past the trained positions.
  PastContext past_context = PastContext::Refuse;
};

// The answer tokens of a task: options.answer_tokens, or the task's default, enough to write its
// expected strings in a list with some slack (niah_single and niah_multikey 16, vt 48,
// niah_multivalue, niah_multiquery and cwe 64).
int64_t ruler_answer_tokens(const RulerOptions& options, RulerTask task);

// Throws visikv::Error for empty lengths or tasks, samples < 1, answer tokens < 0, task shapes
// < 1 (cwe_common must exceed cwe_uncommon), a repeated length or task, a length not above its
// answer tokens, or a length beyond the model's positions (eval/context_limit.h). A length too
// short for a task's fixed text is found when its prompts are built (ruler_samples).
// Returns the warning to print when options.past_context allows a length past the context and
// one is.
std::optional<std::string> check_ruler_options(const Config& config, const RulerOptions& options);

struct RulerSample {
  RulerTask task = RulerTask::NiahSingle;
  int64_t length = 0;
  int64_t index = 0;                  // 0 .. samples - 1
  std::vector<std::string> expected;  // what a right answer contains
  std::vector<int32_t> prompt;        // length - answer_tokens tokens
  int64_t answer_tokens = 0;
};

// The lower-case words of `text` with 4 to 10 letters (whole runs of ASCII letters), each once, in
// order of first occurrence.
std::vector<std::string> ruler_word_pool(std::string_view text);

// Every sample, nested task, length, sample. `text_tokens` are the text's tokens (without BOS),
// at least the longest prompt; more give the haystack offsets room. Throws visikv::Error naming
// the task and length when a length is too short for the task's fixed text (or, for cwe, its
// common words) or the text is too short or has too few distinct words.
std::vector<RulerSample> ruler_samples(const Tokenizer& tokenizer,
                                       std::span<const int32_t> text_tokens,
                                       const RulerOptions& options);

// RULER's string_match_all: the fraction of `expected` found case-insensitively in `answer`.
double ruler_score(std::span<const std::string> expected, std::string_view answer);

// One configuration of the suite: dense, a selector, or cache codecs.
struct RulerConfig {
  std::string name;  // the row's name in tables, JSON and --resume
  KeyCodecSpec key_codec;
  ValueCodecSpec value_codec;
  NamedSelectorSpec selector;
};

struct RulerResult {
  RulerTask task = RulerTask::NiahSingle;
  int64_t length = 0;
  std::vector<std::string> expected;
  std::string answer;
  double score = 0;
};

struct RulerRow {
  std::string name, key_codec, value_codec, selector;
  std::vector<RulerResult> results;  // one per sample, in sample order
  double seconds = 0;
};

// The mean score of a row's results of `task` and `length` (either left out: all); NaN when none.
double ruler_mean(const RulerRow& row, std::optional<RulerTask> task,
                  std::optional<int64_t> length);

// Answers every sample under one configuration (eval/retrieval.h, greedy_answers) and scores it.
RulerRow ruler_row(Decoder& decoder, std::span<const RulerSample> samples,
                   const RulerConfig& config, const AnswerProgress& progress = {},
                   PastContext past_context = PastContext::Refuse);

}  // namespace visikv

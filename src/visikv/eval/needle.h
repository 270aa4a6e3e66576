// Needle-in-a-haystack retrieval, dense versus sparse attention.
//
// A case is (context length L, depth fraction d, needle count k). The prompt holds exactly L
// tokens: BOS (when the model uses one), a haystack of consecutive text tokens from the start of
// the text, k needle sentences " The secret number of <name> is <6 digits>." spliced into the
// haystack's token stream, and the question " What is the secret number of <name>? The secret
// number of <name> is" about the first needle. The asked needle sits at token depth d of the
// haystack; the other k - 1 (distinct names and numbers) at depths d + j/k (mod 1), spread evenly.
// Names and digits come from a fixed generator seeded by the case, so every selector sees the
// same prompts. The model generates `answer_tokens` greedily (EOS stops it); the case is a hit
// when the asked needle's six digits appear in the decoded answer.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"

namespace visikv {

struct NeedleOptions {
  std::vector<int64_t> contexts = {512, 1024, 2048};
  std::vector<double> depths = {0.1, 0.5, 0.9};
  std::vector<int64_t> needles = {1, 3};
  int64_t answer_tokens = 10;
  KeyCodecSpec key_codec;      // f32 by default
  ValueCodecSpec value_codec;  // f32 by default
  uint64_t seed = 1;
};

// Throws visikv::Error for empty lists, depths outside [0, 1], needle counts < 1, or contexts
// that are too short for the needles and question or beyond the model's positions.
void check_needle_options(const Config& config, const NeedleOptions& options);

struct NeedleCase {
  int64_t context = 0;
  double depth = 0;
  int64_t needles = 0;
  std::string name;    // of the asked needle
  std::string digits;  // its secret number
  std::vector<int32_t> prompt;
};

// Every (context, depth, needles) case, in that nesting order. `haystack` is the text's tokens
// (without BOS); throws when it is too short for the longest context.
std::vector<NeedleCase> needle_cases(const Tokenizer& tokenizer, std::span<const int32_t> haystack,
                                     const NeedleOptions& options);

struct NeedleResult {
  int64_t context = 0;
  double depth = 0;
  int64_t needles = 0;
  std::string expected;
  std::string answer;  // the decoded generated text
  bool hit = false;
};

struct NeedleRow {
  std::string selector;
  std::vector<NeedleResult> results;  // one per case, in case order
  double exact_match_rate = 0;        // hits / cases
  double seconds = 0;
};

using NeedleProgress = std::function<void(int64_t done, int64_t total)>;

// Runs every case with one selector spec ("dense" allowed). Leaves the decoder dense.
NeedleRow needle_row(Decoder& decoder, std::span<const NeedleCase> cases,
                     const NamedSelectorSpec& selector, const NeedleOptions& options,
                     const NeedleProgress& progress = {});

}  // namespace visikv

#include "visikv/tokenizer/pretokenizer.h"

#include <algorithm>

#include "visikv/core/error.h"
#include "visikv/tokenizer/byte_level.h"
#include "visikv/tokenizer/normalizer.h"

namespace visikv {

namespace {

struct Segment {
  std::size_t begin;
  std::size_t end;
  bool matched;
};

// Cuts `word` into matched and unmatched segments and regroups them the way Hugging Face's
// NormalizedString::split does for each behavior.
void split_word(const PreToken& word, const Regex& pattern, SplitBehavior behavior, bool invert,
                std::vector<PreToken>& out) {
  std::vector<Segment> segments;
  std::size_t previous = 0;
  for (const MatchRange& m : pattern.find_all(word.text)) {
    if (m.begin > previous) segments.push_back({previous, m.begin, invert});
    segments.push_back({m.begin, m.end, !invert});
    previous = m.end;
  }
  if (previous < word.text.size()) segments.push_back({previous, word.text.size(), invert});

  std::vector<Segment> grouped;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const Segment& s : segments)
        if (!s.matched) grouped.push_back(s);
      break;
    case SplitBehavior::kIsolated:
      grouped = std::move(segments);
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_matched = false;
      for (const Segment& s : segments) {
        if (s.matched && !previous_matched && !grouped.empty()) {
          grouped.back().end = s.end;
        } else {
          grouped.push_back(s);
        }
        previous_matched = s.matched;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool next_matched = false;
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->matched && !next_matched && !grouped.empty()) {
          grouped.back().begin = it->begin;
        } else {
          grouped.push_back(*it);
        }
        next_matched = it->matched;
      }
      std::reverse(grouped.begin(), grouped.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_matched = false;
      for (const Segment& s : segments) {
        if (s.matched == previous_matched && !grouped.empty()) {
          grouped.back().end = s.end;
        } else {
          grouped.push_back(s);
        }
        previous_matched = s.matched;
      }
      break;
    }
  }
  for (const Segment& s : grouped) {
    if (s.end <= s.begin) continue;
    out.push_back({word.text.substr(s.begin, s.end - s.begin), word.at_text_start && s.begin == 0});
  }
}

void split_all(std::vector<PreToken>& words, const Regex& pattern, SplitBehavior behavior,
               bool invert) {
  std::vector<PreToken> out;
  out.reserve(words.size() * 2);
  for (const PreToken& word : words) split_word(word, pattern, behavior, invert, out);
  words = std::move(out);
}

const std::shared_ptr<const Regex>& gpt2_regex() {
  static const auto regex = std::make_shared<const Regex>(std::string(kGpt2Pattern));
  return regex;
}

}  // namespace

LlamaCppPre llama_cpp_pre(std::string_view pre) {
  // Transcribed from llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp), which keeps the
  // regexes of each model family's tokenizer.json (rewriting "(?i:...)" as explicit classes).
  const std::string gpt2 =
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))";
  const auto in = [&](std::initializer_list<std::string_view> names) {
    for (std::string_view name : names)
      if (pre == name) return true;
    return false;
  };
  if (in({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx",
          "smaug-bpe"})) {
    return {{std::string(kLlama3Pattern)}, true, true};
  }
  if (in({"gpt-2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de",
          "jina-v2-code", "mpt", "olmo", "jais", "trillion", "granite-docling"})) {
    return {{gpt2}, false, false};
  }
  if (in({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})) {
    return {{R"(\p{N})", gpt2}, false, false};
  }
  if (in({"qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"})) {
    return {{std::string(kQwen2Pattern)}, false, false};
  }
  if (in({"falcon"})) {
    return {{R"([\p{P}\$\+<=>\^~\|`]+)", gpt2, "[0-9][0-9][0-9]"}, false, false};
  }
  if (in({"default"})) {
    return {{R"([\p{P}\$\+<=>\^~\|]+)", gpt2, R"(\p{N}+)", "[0-9][0-9][0-9]"}, false, false};
  }
  fail("unsupported GGUF pre-tokenizer tokenizer.ggml.pre = '", pre,
       "' (supported: default, gpt-2 family, llama3 family, qwen2 family, smollm/starcoder "
       "family, falcon)");
}

PreTokenizer::Step PreTokenizer::split(std::shared_ptr<const Regex> pattern, SplitBehavior behavior,
                                       bool invert) {
  return [pattern = std::move(pattern), behavior, invert](std::vector<PreToken>& words) {
    split_all(words, *pattern, behavior, invert);
  };
}

PreTokenizer::Step PreTokenizer::byte_level(bool add_prefix_space, bool use_regex) {
  return [add_prefix_space, use_regex](std::vector<PreToken>& words) {
    if (add_prefix_space) {
      for (PreToken& word : words)
        if (word.text.empty() || word.text[0] != ' ') word.text = " " + word.text;
    }
    if (use_regex) split_all(words, *gpt2_regex(), SplitBehavior::kIsolated, false);
    for (PreToken& word : words) word.text = to_byte_level(word.text);
  };
}

PreTokenizer::Step PreTokenizer::digits(bool individual) {
  static const auto digit = std::make_shared<const Regex>(R"(\p{N})");
  return [individual](std::vector<PreToken>& words) {
    split_all(words, *digit, individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous,
              false);
  };
}

PreTokenizer::Step PreTokenizer::metaspace(std::string replacement, PrependScheme scheme,
                                           bool split) {
  auto delimiter = std::make_shared<const Regex>(replacement, /*literal=*/true);
  return [replacement = std::move(replacement), scheme, split,
          delimiter = std::move(delimiter)](std::vector<PreToken>& words) {
    for (PreToken& word : words) {
      word.text = replace_all(word.text, " ", replacement);
      const bool needs_prefix = word.text.compare(0, replacement.size(), replacement) != 0;
      if (needs_prefix && (scheme == PrependScheme::kAlways ||
                           (scheme == PrependScheme::kFirst && word.at_text_start))) {
        word.text.insert(0, replacement);
      }
    }
    if (split) split_all(words, *delimiter, SplitBehavior::kMergedWithNext, false);
  };
}

std::vector<PreToken> PreTokenizer::run(std::string text, bool at_text_start) const {
  std::vector<PreToken> words;
  if (text.empty()) return words;
  words.push_back({std::move(text), at_text_start});
  for (const Step& step : steps_) step(words);
  return words;
}

}  // namespace visikv

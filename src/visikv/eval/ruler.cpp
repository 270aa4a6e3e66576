#include "visikv/eval/ruler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "visikv/core/error.h"
#include "visikv/core/saturating.h"
#include "visikv/eval/context_limit.h"

namespace visikv {

namespace {

struct TaskInfo {
  RulerTask task;
  const char* name;
  int64_t answer_tokens;
};

// Default answer lengths: a 7-digit number is about 8 tokens with a separator in the default
// model's tokenizer (digits are single tokens), so four of them take about 36, and a small model
// tends to open with a line or two of its own (48 cut answers short in a trial); ten common words
// written as a numbered list take about 50.
constexpr TaskInfo kTasks[] = {
    {RulerTask::NiahSingle, "niah_single", 16},
    {RulerTask::NiahMultikey, "niah_multikey", 16},
    {RulerTask::NiahMultivalue, "niah_multivalue", 64},
    {RulerTask::NiahMultiquery, "niah_multiquery", 64},
    {RulerTask::VariableTracking, "vt", 48},
    {RulerTask::CommonWords, "cwe", 64},
};

const TaskInfo& info(RulerTask task) {
  for (const TaskInfo& t : kTasks)
    if (t.task == task) return t;
  fail("ruler: unknown task");
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

// Draws the sample's words from the pool in a seeded order, skipping any word that contains or is
// contained in one already drawn: the score is a substring match, which would otherwise credit
// "rain" for "rainfall".
class WordDrawer {
 public:
  WordDrawer(std::mt19937_64& rng, const std::vector<std::string>& pool, std::string what)
      : rng_(rng), pool_(pool), what_(std::move(what)) {
    order_.resize(pool_.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
  }

  std::string next() {
    while (next_ < order_.size()) {
      // Fisher-Yates one step at a time: only as much of the pool is shuffled as is drawn.
      shuffle_step();
      const std::string& w = pool_[order_[next_++]];
      const bool related = std::any_of(taken_.begin(), taken_.end(), [&](const std::string& t) {
        return t.find(w) != std::string::npos || w.find(t) != std::string::npos;
      });
      if (related) continue;
      taken_.push_back(w);
      return w;
    }
    fail(what_, ": the text has too few distinct words (", pool_.size(), " in its pool, ",
         taken_.size(), " usable) for this sample");
  }

 private:
  void shuffle_step() {
    const size_t j = next_ + draw_below(rng_, order_.size() - next_);
    std::swap(order_[next_], order_[j]);
  }

  std::mt19937_64& rng_;
  const std::vector<std::string>& pool_;
  std::string what_;
  std::vector<size_t> order_;
  size_t next_ = 0;
  std::vector<std::string> taken_;
};

// A sample's generator: the four coordinates mixed into one 64-bit seed (as eval/needle.cpp's
// cases are), so each sample's prompt depends on nothing else.
std::mt19937_64 sample_generator(uint64_t seed, RulerTask task, int64_t length, int64_t index) {
  const uint64_t mixed =
      seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(task) * 0xBF58476D1CE4E5B9ull +
      static_cast<uint64_t>(length) * 1000003ull + static_cast<uint64_t>(index) * 7919ull;
  return std::mt19937_64(mixed);
}

// What every sample builder needs.
struct Builder {
  const Tokenizer& tokenizer;
  std::optional<int32_t> bos;
  std::span<const int32_t> text_tokens;
  std::string_view text_lower;  // the decoded text, lower-cased
  const std::vector<std::string>& pool;
  const RulerOptions& options;

  PieceEncoder pieces;

  std::vector<int32_t> encode(const std::string& s) const { return pieces(s); }

  // A number of `digits` digits that is not in `used` and never occurs in the text, so the
  // expected string is in the prompt exactly once.
  std::string number(std::mt19937_64& rng, int digits, std::set<std::string>& used) const {
    uint64_t low = 1;
    for (int i = 1; i < digits; ++i) low *= 10;
    for (;;) {
      std::string n = std::to_string(low + draw_below(rng, 9 * low));
      if (used.count(n) == 0 && text_lower.find(n) == std::string_view::npos) {
        used.insert(n);
        return n;
      }
    }
  }

  // A variable name of five upper-case letters (RULER's), distinct and, lower-cased, absent from
  // the text: the case-insensitive match must not find it in ordinary words of an answer.
  std::string variable(std::mt19937_64& rng, std::set<std::string>& used) const {
    for (;;) {
      std::string v(5, 'A');
      for (char& c : v) c = static_cast<char>('A' + draw_below(rng, 26));
      if (used.count(v) == 0 && text_lower.find(lower(v)) == std::string_view::npos) {
        used.insert(v);
        return v;
      }
    }
  }

  double depth(std::mt19937_64& rng) const {
    return static_cast<double>(draw_below(rng, 1001)) / 1000.0;
  }

  // The haystack of one sample: the text from a drawn offset, long enough for `prompt_tokens`.
  std::span<const int32_t> haystack(std::mt19937_64& rng, int64_t prompt_tokens) const {
    const int64_t room = static_cast<int64_t>(text_tokens.size()) - prompt_tokens;
    const int64_t offset =
        room > 0 ? static_cast<int64_t>(draw_below(rng, static_cast<uint64_t>(room) + 1)) : 0;
    return text_tokens.subspan(static_cast<size_t>(offset));
  }

  RulerSample niah(RulerTask task, int64_t length, int64_t index) const;
  RulerSample vt(int64_t length, int64_t index) const;
  RulerSample cwe(int64_t length, int64_t index) const;
};

std::string join_and(const std::vector<std::string>& items) {
  // RULER's list of queries: "a, b, c, and d".
  if (items.size() == 1) return items[0];
  std::string out;
  for (size_t i = 0; i + 1 < items.size(); ++i) out += items[i] + ", ";
  return out + "and " + items.back();
}

RulerSample Builder::niah(RulerTask task, int64_t length, int64_t index) const {
  std::mt19937_64 rng = sample_generator(options.seed, task, length, index);
  const std::string what = str_cat("ruler: task ", ruler_task_name(task), " at length ", length);
  RulerSample s{task, length, index, {}, {}, ruler_answer_tokens(options, task)};
  const int64_t prompt_tokens = length - s.answer_tokens;
  WordDrawer words(rng, pool, what);
  // RULER's keys are word pairs. Draws are separate statements: the order in which a function's
  // arguments or an operator's operands are evaluated is unspecified, and the prompts must not
  // depend on the compiler.
  const auto key = [&] {
    std::string k = words.next();
    return k + "-" + words.next();
  };
  const int64_t multi = task == RulerTask::NiahSingle ? 1 : options.multi;
  // (key, value) of every needle; the asked ones first.
  std::vector<std::pair<std::string, std::string>> needles;
  std::set<std::string> numbers;
  if (task == RulerTask::NiahMultivalue) {
    const std::string k = key();
    for (int64_t i = 0; i < multi; ++i) needles.emplace_back(k, number(rng, 7, numbers));
  } else {
    for (int64_t i = 0; i < multi; ++i) {
      std::string k = key();
      needles.emplace_back(std::move(k), number(rng, 7, numbers));
    }
  }
  std::vector<std::string> asked_keys;
  if (task == RulerTask::NiahMultiquery) {
    for (const auto& [k, v] : needles) {
      asked_keys.push_back(k);
      s.expected.push_back(v);
    }
  } else if (task == RulerTask::NiahMultivalue) {
    asked_keys.push_back(needles[0].first);
    for (const auto& kv : needles) s.expected.push_back(kv.second);
  } else {  // single, multikey: the first needle is asked, the others distract
    asked_keys.push_back(needles[0].first);
    s.expected.push_back(needles[0].second);
  }
  std::vector<Splice> splices;
  for (const auto& [k, v] : needles)
    splices.push_back(
        {encode(" One of the special magic numbers for " + k + " is: " + v + "."), depth(rng)});
  const bool plural = s.expected.size() > 1;
  const std::string keys = join_and(asked_keys);
  const std::string question =
      plural ? "\nWhat are all the special magic numbers for " + keys +
                   " mentioned in the provided text? The special magic numbers for " + keys +
                   " mentioned in the provided text are"
             : "\nWhat is the special magic number for " + keys +
                   " mentioned in the provided text? The special magic number for " + keys +
                   " mentioned in the provided text is";
  s.prompt =
      splice_prompt(bos,
                    encode("Some special magic numbers are hidden within the following "
                           "text. Make sure to memorize it. I will quiz you about the "
                           "numbers afterwards.\n"),
                    haystack(rng, prompt_tokens), splices, encode(question), prompt_tokens, what);
  return s;
}

RulerSample Builder::vt(int64_t length, int64_t index) const {
  const RulerTask task = RulerTask::VariableTracking;
  std::mt19937_64 rng = sample_generator(options.seed, task, length, index);
  const std::string what = str_cat("ruler: task vt at length ", length);
  RulerSample s{task, length, index, {}, {}, ruler_answer_tokens(options, task)};
  const int64_t prompt_tokens = length - s.answer_tokens;
  std::set<std::string> names, numbers;
  const std::string value = number(rng, 5, numbers);
  for (int64_t i = 0; i <= options.vt_hops; ++i) s.expected.push_back(variable(rng, names));
  // The chain at sorted depths: splice_prompt keeps equal depths in order, so every assignment
  // comes after the one it reads.
  std::vector<double> depths;
  for (int64_t i = 0; i <= options.vt_hops; ++i) depths.push_back(depth(rng));
  std::sort(depths.begin(), depths.end());
  std::vector<Splice> splices;
  for (size_t i = 0; i < s.expected.size(); ++i)
    splices.push_back({encode(" VAR " + s.expected[i] + " = " +
                              (i == 0 ? value : "VAR " + s.expected[i - 1]) + "."),
                       depths[i]});
  const std::string question =
      "\nQuestion: Find all variables that are assigned the value " + value +
      " in the text above. Answer: According to the chain(s) of variables assignment in the text "
      "above, " +
      std::to_string(s.expected.size()) + " variables are assigned the value " + value +
      ", they are:";
  s.prompt =
      splice_prompt(bos,
                    encode("Memorize and track the chain(s) of variable assignment hidden in the "
                           "following text.\n"),
                    haystack(rng, prompt_tokens), splices, encode(question), prompt_tokens, what);
  return s;
}

RulerSample Builder::cwe(int64_t length, int64_t index) const {
  const RulerTask task = RulerTask::CommonWords;
  std::mt19937_64 rng = sample_generator(options.seed, task, length, index);
  const std::string what = str_cat("ruler: task cwe at length ", length);
  RulerSample s{task, length, index, {}, {}, ruler_answer_tokens(options, task)};
  const int64_t prompt_tokens = length - s.answer_tokens;
  const std::vector<int32_t> preamble = encode(
      "Below is a numbered list of words. In these words, some appear more often than "
      "others. Memorize the ones that appear most often.\n");
  const std::string n = std::to_string(options.cwe_words);
  const std::vector<int32_t> question = encode(
      "\nQuestion: What are the " + n + " most common words in the above list? Answer: The top " +
      n + " words that appear most often in the list are:");
  // The list may use what the fixed parts leave but one token of text (splice_prompt's minimum).
  const int64_t budget =
      prompt_tokens - (bos ? 1 : 0) - static_cast<int64_t>(preamble.size() + question.size()) - 1;
  // Each entry is " <i>." and " <word>" tokenized apart, so the list's length is a sum over
  // entries whatever their order: the words can be added greedily against the budget and
  // shuffled afterwards.
  WordDrawer words(rng, pool, what);
  const auto entry_number = [&](size_t i) { return encode(str_cat(" ", i, ".")); };
  std::vector<std::string> entries;
  std::vector<int64_t> word_tokens;  // per entry, in `entries` order
  int64_t used = 0;
  const auto add = [&](const std::string& w, int64_t times, bool required) {
    const int64_t wt = static_cast<int64_t>(encode(str_cat(" ", w)).size());
    int64_t cost = 0;
    for (int64_t t = 0; t < times; ++t)
      cost += wt + static_cast<int64_t>(entry_number(entries.size() + t + 1).size());
    if (used + cost > budget) {
      require(!required, what, ": length ", length, " is too short for ", options.cwe_words,
              " common words x ", options.cwe_common, " (", prompt_tokens,
              " prompt tokens, the list may use ", budget, ")");
      return false;
    }
    used += cost;
    for (int64_t t = 0; t < times; ++t) entries.push_back(w);
    return true;
  };
  for (int64_t i = 0; i < options.cwe_words; ++i) {
    s.expected.push_back(words.next());
    add(s.expected.back(), options.cwe_common, true);
  }
  // Uncommon words until the next one does not fit. Stopping at the first miss (not trying a
  // shorter word) keeps the loop short; the few tokens left become text padding.
  while (add(words.next(), options.cwe_uncommon, false)) {
  }
  for (size_t i = entries.size(); i > 1; --i)
    std::swap(entries[i - 1], entries[draw_below(rng, i)]);
  std::vector<int32_t> list;
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::vector<int32_t> number = entry_number(i + 1);
    const std::vector<int32_t> word = encode(str_cat(" ", entries[i]));
    list.insert(list.end(), number.begin(), number.end());
    list.insert(list.end(), word.begin(), word.end());
  }
  const std::vector<Splice> splices = {{std::move(list), 1.0}};
  s.prompt = splice_prompt(bos, preamble, haystack(rng, prompt_tokens), splices, question,
                           prompt_tokens, what);
  return s;
}

}  // namespace

const std::vector<RulerTask>& all_ruler_tasks() {
  static const std::vector<RulerTask> tasks = [] {
    std::vector<RulerTask> t;
    for (const TaskInfo& i : kTasks) t.push_back(i.task);
    return t;
  }();
  return tasks;
}

std::string ruler_task_name(RulerTask task) { return info(task).name; }

RulerTask parse_ruler_task(std::string_view name) {
  std::string known;
  for (const TaskInfo& t : kTasks) {
    if (name == t.name) return t.task;
    known += std::string(known.empty() ? "" : ", ") + t.name;
  }
  fail("unknown ruler task '", name, "' (known: ", known, ")");
}

int64_t ruler_answer_tokens(const RulerOptions& o, RulerTask task) {
  return o.answer_tokens > 0 ? o.answer_tokens : info(task).answer_tokens;
}

std::optional<std::string> check_ruler_options(const Config& config, const RulerOptions& o) {
  require(!o.lengths.empty(), "ruler: no lengths given");
  require(!o.tasks.empty(), "ruler: no tasks given");
  require(o.samples >= 1, "ruler: samples must be at least 1, got ", o.samples);
  require(o.answer_tokens >= 0, "ruler: answer tokens must be >= 1 (or 0: per task), got ",
          o.answer_tokens);
  require(o.multi >= 1 && o.vt_hops >= 1 && o.cwe_words >= 1 && o.cwe_uncommon >= 1,
          "ruler: task shapes must be at least 1");
  require(o.cwe_common > o.cwe_uncommon, "ruler: common words must occur more often (",
          o.cwe_common, ") than the others (", o.cwe_uncommon, ")");
  for (size_t i = 0; i < o.tasks.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      require(o.tasks[i] != o.tasks[j], "ruler: task ", ruler_task_name(o.tasks[i]),
              " is given twice");
  std::optional<std::string> warning;
  for (size_t i = 0; i < o.lengths.size(); ++i) {
    const int64_t length = o.lengths[i];
    for (size_t j = 0; j < i; ++j)
      require(length != o.lengths[j], "ruler: length ", length, " is given twice");
    for (RulerTask task : o.tasks) {
      const int64_t answer = ruler_answer_tokens(o, task);
      require(length > answer, "ruler: length ", length, " leaves no prompt for task ",
              ruler_task_name(task), " (", answer, " answer tokens)");
    }
    // A length is the prompt and its answer: the positions the model holds at the end.
    const std::string what = str_cat("ruler: length ", length);
    if (check_context(config, length, what, o.past_context) && !warning)
      warning = past_context_warning(config, length, what);
  }
  return warning;
}

std::vector<std::string> ruler_word_pool(std::string_view text) {
  std::vector<std::string> pool;
  std::set<std::string> seen;
  const auto letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); };
  size_t i = 0;
  while (i < text.size()) {
    if (!letter(text[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && letter(text[j])) ++j;
    const std::string_view w = text.substr(i, j - i);
    const bool all_lower = std::all_of(w.begin(), w.end(), [](char c) { return c >= 'a'; });
    if (all_lower && w.size() >= 4 && w.size() <= 10 && seen.insert(std::string(w)).second)
      pool.emplace_back(w);
    i = j;
  }
  return pool;
}

std::vector<RulerSample> ruler_samples(const Tokenizer& tokenizer,
                                       std::span<const int32_t> text_tokens,
                                       const RulerOptions& o) {
  const std::string text_lower = lower(tokenizer.decode(text_tokens));
  const std::vector<std::string> pool = ruler_word_pool(text_lower);
  std::optional<int32_t> bos;
  if (tokenizer.adds_bos()) bos = tokenizer.bos_id();
  const Builder b{tokenizer, bos, text_tokens, text_lower, pool, o, PieceEncoder(tokenizer)};
  std::vector<RulerSample> samples;
  for (RulerTask task : o.tasks)
    for (int64_t length : o.lengths)
      for (int64_t i = 0; i < o.samples; ++i) {
        if (task == RulerTask::VariableTracking)
          samples.push_back(b.vt(length, i));
        else if (task == RulerTask::CommonWords)
          samples.push_back(b.cwe(length, i));
        else
          samples.push_back(b.niah(task, length, i));
      }
  return samples;
}

double ruler_score(std::span<const std::string> expected, std::string_view answer) {
  if (expected.empty()) return 0;
  const std::string a = lower(answer);
  int64_t found = 0;
  for (const std::string& e : expected) found += a.find(lower(e)) != std::string::npos ? 1 : 0;
  return static_cast<double>(found) / static_cast<double>(expected.size());
}

double ruler_mean(const RulerRow& row, std::optional<RulerTask> task,
                  std::optional<int64_t> length) {
  double sum = 0;
  int64_t n = 0;
  for (const RulerResult& r : row.results)
    if ((!task || r.task == *task) && (!length || r.length == *length)) {
      sum += r.score;
      ++n;
    }
  return n > 0 ? sum / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN();
}

RulerRow ruler_row(Decoder& decoder, std::span<const RulerSample> samples,
                   const RulerConfig& config, const AnswerProgress& progress,
                   PastContext past_context) {
  const auto started = std::chrono::steady_clock::now();
  require(!samples.empty(), "ruler: no samples");
  std::vector<AnswerRequest> requests;
  for (const RulerSample& s : samples) requests.push_back({s.prompt, s.answer_tokens});
  const std::vector<std::string> answers =
      greedy_answers(decoder, requests, config.key_codec, config.value_codec, config.selector.spec,
                     progress, past_context);
  RulerRow row{
      config.name, config.key_codec.text(), config.value_codec.text(), config.selector.text, {}, 0};
  for (size_t i = 0; i < samples.size(); ++i) {
    const RulerSample& s = samples[i];
    row.results.push_back(
        {s.task, s.length, s.expected, answers[i], ruler_score(s.expected, answers[i])});
  }
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return row;
}

}  // namespace visikv

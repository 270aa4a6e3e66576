// The RULER-style retrieval suite (eval/ruler.h): prompt generation, scoring, option checks, and
// `visikv eval ruler` end to end with --resume on a tiny fixture model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/error.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/retrieval.h"
#include "visikv/eval/ruler.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;
namespace fs = std::filesystem;

std::string fixture(const std::string& name) {
  return std::string(VISIKV_FIXTURES) + "/models/" + name;
}

// A text of many distinct lower-case words of six letters (none inside another), with
// punctuation and capitals that the word pool must skip: the fixtures need no real text.
std::string synthetic_text(size_t words) {
  const char* syllables[] = {"ba", "ke", "lo", "mi", "nu", "ra", "so", "ti", "pe", "du"};
  std::string text;
  for (size_t i = 0; i < words; ++i) {
    const size_t a = i % 10, b = (i / 10) % 10, c = (i / 100) % 10;
    text += std::string(syllables[a]) + syllables[b] + syllables[c];
    text += i % 7 == 6 ? ". The " : " ";
  }
  return text;
}

// Options small enough for the fixture tokenizer (512 ids: words take several tokens each).
RulerOptions small_options() {
  RulerOptions o;
  o.lengths = {700, 1000};
  o.samples = 2;
  o.seed = 7;
  o.answer_tokens = 8;
  o.cwe_words = 3;
  o.cwe_common = 6;
  o.cwe_uncommon = 2;
  return o;
}

struct Fixture {
  Model model = Model::load(fixture("llama"));
  std::vector<int32_t> tokens = model.tokenizer().encode(synthetic_text(1000), false);
};

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(Ruler, TaskNamesRoundTripAndUnknownOnesAreNamed) {
  for (RulerTask t : all_ruler_tasks()) EXPECT_EQ(parse_ruler_task(ruler_task_name(t)), t);
  const std::string message = error_of([] { parse_ruler_task("niah_triple"); });
  EXPECT_NE(message.find("niah_triple"), std::string::npos) << message;
  EXPECT_NE(message.find("niah_multiquery"), std::string::npos) << message;
}

TEST(Ruler, WordPoolTakesDistinctLowerCaseWords) {
  const std::vector<std::string> pool =
      ruler_word_pool("The cat sat; rain, rainfall RAIN rain-fall ab ok@word café abcdefghijk");
  EXPECT_EQ(pool, (std::vector<std::string>{"rain", "rainfall", "fall", "word"}));
}

TEST(Ruler, GenerationIsDeterministicForASeedAndDiffersAcrossSeeds) {
  Fixture f;
  const RulerOptions o = small_options();
  const auto a = ruler_samples(f.model.tokenizer(), f.tokens, o);
  const auto b = ruler_samples(f.model.tokenizer(), f.tokens, o);
  ASSERT_EQ(a.size(), 6u * 2u * 2u);
  RulerOptions other = o;
  other.seed = 8;
  const auto c = ruler_samples(f.model.tokenizer(), f.tokens, other);
  ASSERT_EQ(c.size(), a.size());
  size_t differing = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].prompt, b[i].prompt) << i;
    EXPECT_EQ(a[i].expected, b[i].expected) << i;
    differing += a[i].prompt != c[i].prompt ? 1 : 0;
    // Samples of one cell differ from each other too.
    if (i % 2 == 1) {
      EXPECT_NE(a[i].prompt, a[i - 1].prompt) << i;
    }
  }
  EXPECT_EQ(differing, a.size());
}

TEST(Ruler, PromptsHaveExactlyTheRequestedLength) {
  Fixture f;
  RulerOptions o = small_options();
  o.lengths = {640, 777, 1000};
  o.answer_tokens = 0;  // per task: prompt = length - the task's default
  for (const RulerSample& s : ruler_samples(f.model.tokenizer(), f.tokens, o)) {
    EXPECT_EQ(s.answer_tokens, ruler_answer_tokens(o, s.task));
    EXPECT_EQ(static_cast<int64_t>(s.prompt.size()), s.length - s.answer_tokens)
        << ruler_task_name(s.task) << " " << s.length;
    EXPECT_EQ(s.prompt.front(), *f.model.tokenizer().bos_id());
  }
}

// The needles of a prompt: key -> values, in prompt order.
std::vector<std::pair<std::string, std::string>> needles_of(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  const std::regex needle("One of the special magic numbers for ([a-z]+-[a-z]+) is: ([0-9]+)\\.");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), needle);
       it != std::sregex_iterator(); ++it)
    out.emplace_back((*it)[1].str(), (*it)[2].str());
  return out;
}

TEST(Ruler, ExpectedAnswersOccurInThePromptAndAreUnique) {
  Fixture f;
  const RulerOptions o = small_options();
  for (const RulerSample& s : ruler_samples(f.model.tokenizer(), f.tokens, o)) {
    const std::string text = f.model.tokenizer().decode(s.prompt);
    const std::string where = ruler_task_name(s.task) + " " + std::to_string(s.length);
    ASSERT_FALSE(s.expected.empty()) << where;
    const std::set<std::string> distinct(s.expected.begin(), s.expected.end());
    EXPECT_EQ(distinct.size(), s.expected.size()) << where;
    for (const std::string& a : s.expected)
      for (const std::string& b : s.expected)
        if (a != b) {
          EXPECT_EQ(a.find(b), std::string::npos) << where << ": " << b << " in " << a;
        }
    const auto needles = needles_of(text);
    switch (s.task) {
      case RulerTask::NiahSingle:
      case RulerTask::NiahMultikey: {
        ASSERT_EQ(needles.size(), s.task == RulerTask::NiahSingle ? 1u : 4u) << where;
        ASSERT_EQ(s.expected.size(), 1u);
        // Exactly one needle holds the expected number, and its key is the one asked for; every
        // distractor has another key.
        std::string asked;
        for (const auto& [k, v] : needles)
          if (v == s.expected[0]) asked = k;
        ASSERT_FALSE(asked.empty()) << where;
        EXPECT_EQ(count(text, s.expected[0]), 1u) << where;
        for (const auto& [k, v] : needles)
          if (v != s.expected[0]) {
            EXPECT_NE(k, asked) << where;
          }
        EXPECT_NE(text.find("What is the special magic number for " + asked + " mentioned"),
                  std::string::npos)
            << where;
        break;
      }
      case RulerTask::NiahMultivalue:
        ASSERT_EQ(needles.size(), 4u) << where;
        for (size_t i = 0; i < needles.size(); ++i) {
          EXPECT_EQ(needles[i].first, needles[0].first) << where;  // one key
          EXPECT_EQ(count(text, needles[i].second), 1u) << where;
        }
        EXPECT_EQ(std::set<std::string>(s.expected.begin(), s.expected.end()), ([&] {
                    std::set<std::string> v;
                    for (const auto& n : needles) v.insert(n.second);
                    return v;
                  }()))
            << where;
        break;
      case RulerTask::NiahMultiquery: {
        ASSERT_EQ(needles.size(), 4u) << where;
        std::set<std::string> keys, values;
        for (const auto& [k, v] : needles) {
          keys.insert(k);
          values.insert(v);
          // In its needle and twice in the question ("for a, b, c, and d mentioned ...").
          EXPECT_EQ(count(text, k), 3u) << where;
        }
        EXPECT_EQ(keys.size(), 4u) << where;
        EXPECT_EQ(values, std::set<std::string>(s.expected.begin(), s.expected.end())) << where;
        for (const std::string& v : s.expected) EXPECT_EQ(count(text, v), 1u) << where;
        break;
      }
      case RulerTask::VariableTracking: {
        ASSERT_EQ(s.expected.size(), 5u) << where;
        const std::regex first(" VAR " + s.expected[0] + " = ([0-9]{5})\\.");
        std::smatch m;
        ASSERT_TRUE(std::regex_search(text, m, first)) << where;
        const std::string value = m[1].str();
        // The value: once in the chain and twice in the question, nowhere else.
        EXPECT_EQ(count(text, value), 3u) << where;
        size_t at = static_cast<size_t>(m.position(0));
        for (size_t i = 1; i < s.expected.size(); ++i) {
          const std::string hop = " VAR " + s.expected[i] + " = VAR " + s.expected[i - 1] + ".";
          const size_t next = text.find(hop);
          ASSERT_NE(next, std::string::npos) << where << ": " << hop;
          EXPECT_GT(next, at) << where;  // every assignment after the one it reads
          at = next;
        }
        // Each name: in its own assignment and in the next one's right side, nowhere else.
        for (size_t i = 0; i < s.expected.size(); ++i) {
          const size_t uses = i + 1 < s.expected.size() ? 2 : 1;
          EXPECT_EQ(count(text, "VAR " + s.expected[i]), uses) << where;
          EXPECT_EQ(count(text, s.expected[i]), uses) << where;
        }
        break;
      }
      case RulerTask::CommonWords: {
        // The list " 1. w 2. w ...", numbered from 1 without gaps; the expected words are each
        // there cwe_common times, every other word cwe_uncommon times.
        const std::regex entry(" ([0-9]+)\\. ([a-z]+)");
        std::map<std::string, int64_t> frequency;
        int64_t next = 1;
        for (auto it = std::sregex_iterator(text.begin(), text.end(), entry);
             it != std::sregex_iterator(); ++it) {
          EXPECT_EQ(std::stoll((*it)[1].str()), next) << where;
          ++next;
          ++frequency[(*it)[2].str()];
        }
        ASSERT_EQ(s.expected.size(), 3u) << where;
        EXPECT_GT(frequency.size(), s.expected.size()) << where;  // uncommon words are there
        for (const auto& [word, n] : frequency) {
          const bool common =
              std::find(s.expected.begin(), s.expected.end(), word) != s.expected.end();
          EXPECT_EQ(n, common ? o.cwe_common : o.cwe_uncommon) << where << ": " << word;
        }
        break;
      }
    }
  }
}

TEST(Ruler, ScoringCountsPartialAnswers) {
  const std::vector<std::string> four = {"1234567", "2345678", "Rain", "VARAB"};
  EXPECT_DOUBLE_EQ(ruler_score(four, "1234567, 2345678, rain and varab"), 1.0);
  EXPECT_DOUBLE_EQ(ruler_score(four, "The numbers are 1234567 and RAIN."), 0.5);
  EXPECT_DOUBLE_EQ(ruler_score(four, "2345678"), 0.25);
  EXPECT_DOUBLE_EQ(ruler_score(four, "123456 234567"), 0.0);  // a prefix is no match
  EXPECT_DOUBLE_EQ(ruler_score(four, ""), 0.0);
  RulerRow row;
  row.results = {{RulerTask::NiahSingle, 100, {"a"}, "a", 1.0},
                 {RulerTask::NiahSingle, 200, {"a"}, "", 0.0},
                 {RulerTask::CommonWords, 100, {"a", "b"}, "b", 0.5}};
  EXPECT_DOUBLE_EQ(ruler_mean(row, RulerTask::NiahSingle, std::nullopt), 0.5);
  EXPECT_DOUBLE_EQ(ruler_mean(row, std::nullopt, 100), 0.75);
  EXPECT_DOUBLE_EQ(ruler_mean(row, std::nullopt, std::nullopt), 0.5);
  EXPECT_TRUE(std::isnan(ruler_mean(row, RulerTask::VariableTracking, std::nullopt)));
}

TEST(Ruler, BadOptionsAreNamed) {
  Fixture f;
  const Config& config = f.model.config();  // 128 positions
  RulerOptions o = small_options();
  o.lengths = {128};
  EXPECT_EQ(error_of([&] { check_ruler_options(config, o); }), "<no error>");
  const auto message = [&](const RulerOptions& bad) {
    return error_of([&] { check_ruler_options(config, bad); });
  };
  RulerOptions bad = o;
  bad.lengths = {200};
  EXPECT_NE(message(bad).find("ruler: length 200 needs 200 positions"), std::string::npos)
      << message(bad);
  bad = o;
  bad.samples = 0;
  EXPECT_NE(message(bad).find("samples must be at least 1, got 0"), std::string::npos)
      << message(bad);
  bad = o;
  bad.lengths = {8};
  EXPECT_NE(message(bad).find("length 8 leaves no prompt"), std::string::npos) << message(bad);
  bad = o;
  bad.lengths = {100, 100};
  EXPECT_NE(message(bad).find("given twice"), std::string::npos) << message(bad);
  bad = o;
  bad.tasks = {};
  EXPECT_NE(message(bad).find("no tasks"), std::string::npos) << message(bad);
  bad = o;
  bad.cwe_common = 2;
  EXPECT_NE(message(bad).find("more often"), std::string::npos) << message(bad);
  // Too short for a task's fixed text: found when the prompts are built, naming task and length.
  bad = o;
  bad.lengths = {60};
  bad.tasks = {RulerTask::NiahMultiquery};
  std::string m = error_of([&] { ruler_samples(f.model.tokenizer(), f.tokens, bad); });
  EXPECT_NE(m.find("ruler: task niah_multiquery at length 60"), std::string::npos) << m;
  EXPECT_NE(m.find("too short"), std::string::npos) << m;
  bad.tasks = {RulerTask::CommonWords};
  bad.lengths = {300};
  bad.cwe_common = 40;  // 120 list entries of several tokens each
  m = error_of([&] { ruler_samples(f.model.tokenizer(), f.tokens, bad); });
  EXPECT_NE(m.find("ruler: task cwe at length 300"), std::string::npos) << m;
  EXPECT_NE(m.find("too short for 3 common words x 40"), std::string::npos) << m;
  // Too few words for the common-word list.
  const std::vector<int32_t> few = f.model.tokenizer().encode(synthetic_text(8), false);
  std::vector<int32_t> long_few;
  while (long_few.size() < 2000) long_few.insert(long_few.end(), few.begin(), few.end());
  bad.lengths = {1000};
  bad.cwe_common = 6;
  m = error_of([&] { ruler_samples(f.model.tokenizer(), long_few, bad); });
  EXPECT_NE(m.find("too few distinct words"), std::string::npos) << m;
}

// RULER's own shapes at 4096 tokens with the default model's tokenizer and WikiText-103: the
// lengths and the task invariants hold at the size the suite is run at.
TEST(Ruler, DefaultShapesOnTheDefaultModel) {
  if (!fs::exists(Model::default_model_path()) || !fs::exists(default_test_text()))
    GTEST_SKIP() << "the default model or WikiText-103 test is absent";
  const Model model = Model::load("default");
  RulerOptions o;
  o.lengths = {4096};
  o.samples = 2;
  check_ruler_options(model.config(), o);
  const std::vector<int32_t> tokens =
      text_file_tokens(model.tokenizer(), default_test_text(), 2 * 4096);
  for (const RulerSample& s : ruler_samples(model.tokenizer(), tokens, o)) {
    EXPECT_EQ(static_cast<int64_t>(s.prompt.size()), 4096 - s.answer_tokens);
    const std::string text = model.tokenizer().decode(s.prompt);
    if (s.task == RulerTask::CommonWords) {
      EXPECT_EQ(s.expected.size(), 10u);
      for (const std::string& w : s.expected) EXPECT_EQ(count(text, ". " + w + " "), 30u) << w;
    } else {
      for (const std::string& e : s.expected) EXPECT_GE(count(text, e), 1u) << e;
    }
  }
}

// ---- the command ----

TEST(EvalRulerCommand, RunsRowsAndResumeSkipsFinishedOnes) {
  const fs::path json_path = temp_path("eval_ruler.json");
  const fs::path text_path = temp_path("eval_ruler.txt");
  {
    std::ofstream out(text_path);
    out << synthetic_text(1000);
  }
  const std::string args =
      "-t 1 eval ruler " + fixture("llama") + " --text " + text_path.string() +
      " --lengths 360 --allow-past-context --tasks niah_single,vt --samples 2 "
      "--answer-tokens 4 --selectors sparse:a1:w8:k8:exact --kv int4:g16:tok/f16 --json " +
      json_path.string();
  ProgramRun r = run_visikv(args);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("length 360 (%)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("warning: ruler: length 360 needs 360 positions"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("niah_single"), std::string::npos) << r.output;
  nlohmann::json j = read_json(json_path);
  EXPECT_EQ(j["command"], "eval ruler");
  EXPECT_TRUE(j["complete"].get<bool>());
  ASSERT_EQ(j["rows"].size(), 3u);
  EXPECT_EQ(j["rows"][0]["name"], "dense");
  EXPECT_EQ(j["rows"][1]["name"], "sparse:a1:w8:k8:exact");
  EXPECT_EQ(j["rows"][2]["name"], "int4:g16:tok/f16");
  for (const auto& row : j["rows"]) {
    ASSERT_EQ(row["samples"].size(), 2u * 2u);
    ASSERT_EQ(row["cells"].size(), 2u);
    for (const auto& s : row["samples"]) {
      const double score = s["score"];
      EXPECT_GE(score, 0.0);
      EXPECT_LE(score, 1.0);
    }
  }

  // Resume: a finished row is read back, not rerun (the marker survives); a missing one runs.
  j["rows"][0]["samples"][0]["answer"] = "kept, not rerun";
  j["rows"].erase(2);
  j["complete"] = false;
  {
    std::ofstream out(json_path);
    out << j.dump(2);
  }
  r = run_visikv(args + " --resume " + json_path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("dense: kept from the resumed file"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("sparse:a1:w8:k8:exact: kept"), std::string::npos) << r.output;
  const nlohmann::json resumed = read_json(json_path);
  EXPECT_TRUE(resumed["complete"].get<bool>());
  ASSERT_EQ(resumed["rows"].size(), 3u);
  EXPECT_EQ(resumed["rows"][0]["samples"][0]["answer"], "kept, not rerun");
  EXPECT_EQ(resumed["rows"][2]["name"], "int4:g16:tok/f16");

  // A missing row before a kept one (the selector row, added to a file of dense and codec rows):
  // it runs, and the kept row after it is read back into its place.
  j = resumed;
  j["rows"][2]["samples"][1]["answer"] = "kept behind a new row";
  j["rows"].erase(1);
  j["complete"] = false;
  {
    std::ofstream out(json_path);
    out << j.dump(2);
  }
  r = run_visikv(args + " --resume " + json_path.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("sparse:a1:w8:k8:exact: done in"), std::string::npos) << r.output;
  const nlohmann::json reordered = read_json(json_path);
  ASSERT_EQ(reordered["rows"].size(), 3u);
  EXPECT_EQ(reordered["rows"][1]["name"], "sparse:a1:w8:k8:exact");
  EXPECT_EQ(reordered["rows"][2]["samples"][1]["answer"], "kept behind a new row");
  EXPECT_EQ(reordered["rows"][0]["samples"][0]["answer"], "kept, not rerun");

  // Other parameters are refused, naming them.
  r = run_visikv("-t 1 eval ruler " + fixture("llama") + " --text " + text_path.string() +
                 " --lengths 360 --allow-past-context --tasks niah_single,vt --samples 3 "
                 "--answer-tokens 4 "
                 "--selectors none --kv none --resume " +
                 json_path.string());
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("samples"), std::string::npos) << r.output;
  fs::remove(json_path);
  fs::remove(text_path);
}

TEST(EvalRulerCommand, BadFlagsFailClearly) {
  const std::string model = fixture("llama");
  ProgramRun r = run_visikv("eval ruler " + model + " --tasks niah_single,needle_x");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--tasks: unknown ruler task 'needle_x'"), std::string::npos) << r.output;
  r = run_visikv("eval ruler " + model + " --lengths 4096");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("ruler: length 4096 needs 4096 positions"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("--allow-past-context"), std::string::npos) << r.output;
  r = run_visikv("eval ruler " + model + " --lengths 128 --samples 0");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("samples must be at least 1"), std::string::npos) << r.output;
  r = run_visikv("eval ruler " + model + " --lengths 128 --kv int5:g16:tok");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--kv"), std::string::npos) << r.output;
  r = run_visikv("eval ruler " + model + " --lengths 128 --kv int4:g16:tok/a2");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--kv"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace visikv

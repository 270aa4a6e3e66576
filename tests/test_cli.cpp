// The visikv program end to end on tiny fixture models: commands work, JSON output has its
// fields, and bad flags or inputs give a clear message and a non-zero exit.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "test_support.h"
namespace {

using namespace visikv::test_support;

ProgramRun run(const std::string& args) { return run_visikv(args); }

namespace fs = std::filesystem;

const std::string kLlama = std::string(VISIKV_FIXTURES) + "/models/llama";
const std::string kGpt2 = std::string(VISIKV_FIXTURES) + "/models/gpt2";

fs::path temp_file(const std::string& name) {
  return fs::temp_directory_path() / (name + "_" + std::to_string(::getpid()));
}

TEST(Cli, InfoDescribesTheModel) {
  const ProgramRun r = run("info " + kLlama);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("llama"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2 kv heads"), std::string::npos) << r.output;
}

// VISIKV_SIMD picks the weight kernels' instruction set; a bad name is a clear error, not a crash.
TEST(Cli, SimdEnvironmentVariable) {
  ProgramRun r = run_visikv("info " + kLlama, "VISIKV_SIMD=generic");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(r.output.find("kernels:      SCALAR") != std::string::npos ||
              r.output.find("kernels:      EMU128") != std::string::npos)
      << r.output;
  r = run_visikv("info " + kLlama, "VISIKV_SIMD=sse9");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("visikv: error: VISIKV_SIMD: unknown SIMD target 'sse9'"),
            std::string::npos)
      << r.output;
}

// --numerics: int8 and int16 cannot run decode-batched (exact products only), and unknown names
// are refused.
TEST(Cli, NumericsFlagRejectsWhatItCannotDo) {
  for (const std::string numerics : {"int8", "int16"}) {
    const ProgramRun r =
        run("ppl " + kLlama + " --mode decode-batched --numerics " + numerics + " --tokens 8");
    EXPECT_EQ(r.status, 1) << r.output;
    EXPECT_NE(r.output.find("--numerics " + numerics +
                            ": decode-batched computes decode order with exact products only"),
              std::string::npos)
        << r.output;
  }
  ProgramRun r = run("eval numerics " + kLlama + " --window 16 --numerics int16 int16");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--numerics: int16 given twice"), std::string::npos) << r.output;
  r = run("ppl " + kLlama + " --numerics fastest --tokens 8");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--numerics"), std::string::npos) << r.output;
}

TEST(Cli, TokenizeAndGenerate) {
  ProgramRun r = run("tokenize " + kGpt2 + " 'Hello world' --count");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_GT(std::stoi(r.output), 0);
  r = run("generate " + kLlama + " 'The' -n 5 --ignore-eos");
  EXPECT_EQ(r.status, 0) << r.output;
  r = run("generate " + kLlama + " 'The' -n 5 --temperature 0.8 --top-k 20 --top-p 0.9 --seed 3");
  const ProgramRun again =
      run("generate " + kLlama + " 'The' -n 5 --temperature 0.8 --top-k 20 --top-p 0.9 --seed 3");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output, again.output) << "the same seed must give the same text";
}

// ---- the model's context and the size of inputs ----

// How often `part` occurs in `text`.
size_t occurrences(const std::string& text, const std::string& part) {
  size_t count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++count;
  return count;
}

// The prompt + -n tokens must fit the context: exactly at it runs, one past it is an error that
// names both numbers and the flag that allows it.
TEST(Cli, GenerateIsBoundedByTheContext) {
  const int prompt = std::stoi(run("tokenize " + kLlama + " 'The' --count").output);
  ProgramRun r =
      run("generate " + kLlama + " 'The' --ignore-eos -n " + std::to_string(128 - prompt));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(r.output.find("warning"), std::string::npos) << r.output;
  r = run("generate " + kLlama + " 'The' --ignore-eos -n " + std::to_string(129 - prompt));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("a prompt of " + std::to_string(prompt) + " tokens + " +
                          std::to_string(129 - prompt) +
                          " new tokens needs 129 positions, which exceeds the model's context of "
                          "128 positions (--allow-past-context runs past it"),
            std::string::npos)
      << r.output;
  r = run("generate " + kLlama + " 'The' -n 1000 --ignore-eos");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("1000 new tokens"), std::string::npos) << r.output;
}

// A huge -n is the same error, not an allocation failure (and not an overflow past the largest
// integer).
TEST(Cli, GenerateWithAHugeTokenCountIsAClearError) {
  for (const std::string n : {"99999999999", "9223372036854775807"}) {
    const ProgramRun r = run("generate " + kLlama + " 'The' --ignore-eos -n " + n);
    EXPECT_EQ(r.status, 1) << r.output;
    EXPECT_NE(r.output.find(n + " new tokens"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("exceeds the model's context of 128 positions"), std::string::npos)
        << r.output;
    EXPECT_EQ(r.output.find("internal error"), std::string::npos) << r.output;
  }
}

// --allow-past-context lets a RoPE model run past its context with one warning on stderr; learned
// positions end at their table, so GPT-2 refuses even then.
TEST(Cli, AllowPastContextWarnsOnceAndNeverExtendsLearnedPositions) {
  const fs::path err_path = temp_file("visikv_past_context.txt");
  const std::string command = std::string(VISIKV_BINARY) + " generate " + kLlama +
                              " 'The' -n 200 --ignore-eos --allow-past-context >/dev/null 2>" +
                              err_path.string();
  EXPECT_EQ(std::system(command.c_str()), 0);
  std::ifstream in(err_path);
  const std::string err((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(occurrences(err, "warning"), 1u) << err;
  EXPECT_NE(err.find("a prompt of 2 tokens + 200 new tokens needs 202 positions, past the model's "
                     "context of 128"),
            std::string::npos)
      << err;
  fs::remove(err_path);
  ProgramRun r;
  r = run("generate " + kGpt2 + " 'The' -n 200 --ignore-eos --allow-past-context");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("learned embeddings"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("warning"), std::string::npos) << r.output;
}

// A copy of the llama fixture whose tokenizer's post-processor adds 1000 tokens to every prompt
// (tests/fixtures/mutants/limits): the prompt alone is past the context, refused before any
// forward pass.
TEST(Cli, PromptLongerThanTheContextFailsBeforeThePrefill) {
  const fs::path model = temp_file("visikv_long_post_processor");
  fs::create_directories(model);
  for (const char* name :
       {"config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors"})
    fs::copy_file(fs::path(kLlama) / name, model / name, fs::copy_options::overwrite_existing);
  fs::copy_file(fs::path(VISIKV_FIXTURES) / "mutants/limits/long_post_processor/tokenizer.json",
                model / "tokenizer.json", fs::copy_options::overwrite_existing);
  ProgramRun r = run("generate " + model.string() + " 'The' -n 1 --stats");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("a prompt of 1001 tokens needs 1001 positions, which exceeds the "
                          "model's context of 128 positions"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("prompt: "), std::string::npos) << "no prefill ran: " << r.output;
  fs::remove_all(model);

  // A prompt file longer than the context fails from its first tokens.
  const fs::path prompt = temp_file("visikv_long_prompt.txt");
  {
    std::ofstream file(prompt);
    for (int i = 0; i < 2000; ++i) file << kEnglishText;
  }
  r = run("generate " + kLlama + " --file " + prompt.string() + " -n 1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("a prompt of more than 128 tokens"), std::string::npos) << r.output;
  fs::remove(prompt);
}

// generate and tokenize read their text from the command line or a file, the same text either
// way.
TEST(Cli, GenerateAndTokenizeReadAFile) {
  const fs::path prompt = temp_file("visikv_prompt.txt");
  std::ofstream(prompt) << "The tower is";
  ProgramRun from_file = run("generate " + kLlama + " --file " + prompt.string() + " -n 4");
  ProgramRun from_flag = run("generate " + kLlama + " 'The tower is' -n 4");
  EXPECT_EQ(from_file.status, 0) << from_file.output;
  EXPECT_EQ(from_file.output, from_flag.output);
  from_file = run("tokenize " + kLlama + " --file " + prompt.string());
  from_flag = run("tokenize " + kLlama + " 'The tower is'");
  EXPECT_EQ(from_file.status, 0) << from_file.output;
  EXPECT_EQ(from_file.output, from_flag.output);
  fs::remove(prompt);
}

// With --tokens, ppl tokenizes only the start of a long one-line text (the windows' tokens and
// their margin), not all of it.
TEST(Cli, PerplexityReadsOnlyTheTokensItScores) {
  const fs::path text = temp_file("visikv_one_line.txt");
  {
    std::ofstream file(text);
    std::string line = kEnglishText;
    line.pop_back();  // no newline: one line
    for (int i = 0; i < 20000; ++i) file << line << ' ';
  }
  const ProgramRun r =
      run("ppl " + kLlama + " --file " + text.string() + " --window 64 --tokens 64");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("(67 tokens read)"), std::string::npos) << r.output;
  fs::remove(text);
}

// Text files must be regular files of at most 1 GiB: a directory, a device that never ends or a
// file over the limit is an error naming the path, in every command that reads one.
TEST(Cli, TextInputsMustBeRegularFilesOfBoundedSize) {
  const fs::path dir = temp_file("visikv_text_dir");
  fs::create_directories(dir);
  const fs::path huge = temp_file("visikv_huge.txt");
  std::ofstream(huge).flush();
  fs::resize_file(huge, (uintmax_t{1} << 30) + 1);  // sparse: no disk space used
  const std::string d = dir.string(), h = huge.string();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"tokenize " + kLlama + " --file " + d, "text file \"" + d + "\" is a directory"},
      {"tokenize " + kLlama + " --file /dev/zero", "\"/dev/zero\" is not a regular file"},
      {"generate " + kLlama + " --file /dev/zero", "\"/dev/zero\" is not a regular file"},
      {"generate " + kLlama + " --file " + d, "is a directory"},
      {"ppl " + kLlama + " --window 16 --file /dev/zero", "\"/dev/zero\" is not a regular file"},
      {"ppl " + kLlama + " --window 16 --tokens 8 --file " + d, "is a directory"},
      {"ppl " + kLlama + " --window 16 --file " + h,
       "holds 1073741825 bytes, more than the limit of 1073741824 bytes (1 GiB)"},
      {"tokenize " + kLlama + " --count --file " + h, "more than the limit"},
      {"eval sparse " + kLlama + " --prefix 32 --continuation 4 --selectors dense --text " + d,
       "is a directory"},
      {"eval numerics " + kLlama + " --window 16 --file /dev/zero", "not a regular file"},
      {"calibrate " + kLlama + " --out " + d + "/basis --text /dev/zero", "not a regular file"},
      {"analyze " + kLlama + " --tokens 32 --keys f32 --text " + d, "is a directory"},
  };
  for (const auto& [args, expected] : cases) {
    const ProgramRun r = run(args);
    EXPECT_EQ(r.status, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(expected), std::string::npos) << args << "\n" << r.output;
  }
  fs::remove_all(dir);
  fs::remove(huge);
}

TEST(Cli, PerplexityWritesJsonAndModesAgree) {
  const fs::path text = temp_file("visikv_cli_text.txt");
  std::ofstream(text) << "The tower is 324 metres tall , about the same height as an 81 @-@ storey "
                         "building , and the tallest structure in Paris . Its base is square . ";
  const fs::path prefill_json = temp_file("visikv_prefill.json"),
                 decode_json = temp_file("visikv_decode.json");
  ProgramRun r = run("ppl " + kGpt2 + " --file " + text.string() + " --window 16 --json " +
                     prefill_json.string());
  ASSERT_EQ(r.status, 0) << r.output;
  r = run("ppl " + kGpt2 + " --file " + text.string() + " --window 16 --mode decode --json " +
          decode_json.string());
  ASSERT_EQ(r.status, 0) << r.output;
  const auto prefill = nlohmann::json::parse(std::ifstream(prefill_json));
  const auto decode = nlohmann::json::parse(std::ifstream(decode_json));
  for (const char* key : {"model", "mode", "window", "tokens", "nll", "ppl", "tokens_per_s"})
    EXPECT_TRUE(prefill.contains(key)) << key;
  EXPECT_EQ(prefill["mode"], "prefill");
  EXPECT_EQ(decode["mode"], "decode");
  EXPECT_EQ(prefill["tokens"], decode["tokens"]);
  EXPECT_NEAR(prefill["nll"].get<double>(), decode["nll"].get<double>(), 1e-5);
  EXPECT_NEAR(std::exp(prefill["nll"].get<double>()), prefill["ppl"].get<double>(), 1e-6);
  fs::remove(text);
  fs::remove(prefill_json);
  fs::remove(decode_json);
}

TEST(Cli, PerplexityWithQuantizedKeysAndSparseAttention) {
  const std::string text = std::string(VISIKV_FIXTURES) + "/models/llama/reference.json";
  const std::string common =
      "ppl " + kLlama + " --file " + text + " --window 32 --tokens 60 --mode decode";
  for (const std::string extra :
       {" --keys int4:g16:tok", " --keys int2:g16:chan:r8 --values int8:g16:tok",
        " --selector sparse:a1:w8:k8:b16:bound", " --selector certified:a1:w8:b16:eps0.05"}) {
    const ProgramRun r = run(common + extra);
    EXPECT_EQ(r.status, 0) << extra << "\n" << r.output;
    EXPECT_NE(r.output.find("PPL"), std::string::npos) << r.output;
  }
}

// ---- long runs: --json row by row, --resume, progress, KL beside perplexity -----------------

// A text long enough for every eval command on the fixture, and the commands at fixture sizes.
fs::path eval_text() {
  static const fs::path text = [] {
    const fs::path path = temp_file("visikv_cli_eval_text.txt");
    std::ofstream out(path);
    for (int i = 0; i < 6; ++i) out << kEnglishText;
    return path;
  }();
  return text;
}

std::vector<std::string> eval_commands() {
  const std::string t = eval_text().string();
  return {"ppl " + kLlama + " --file " + t + " --window 32 --tokens 40 --keys int2:g16:tok " +
              "--reference-keys f32",
          "eval kv " + kLlama + " --text " + t + " --calibration-text " + t +
              " --window 32 --tokens 40 --calibration-tokens 64 --rows k2-tok,k2-tok+hq-r8",
          "eval sparse-ppl " + kLlama + " --text " + t +
              " --window 32 --tokens 40 --selectors sparse:a1:w8:k8:exact --keys int2:g16:tok",
          "eval sparse " + kLlama + " --text " + t + " --prefix 32 --continuation 4 --samples 2 " +
              "--selectors sparse:a1:w8:k8:exact,sparse:a1:w4:k4:b16:bound",
          "eval needle " + kLlama + " --text " + t + " --contexts 64 --depths 0.5 --needles 1 " +
              "--answer-tokens 4 --selectors sparse:a1:w8:k8:exact",
          "eval coverage " + kLlama + " --text " + t +
              " --tokens 64 --from 16 --selectors sparse:a1:w8:k8:exact",
          // RULER's templates alone take ~220 fixture tokens: past the fixture's 128 positions.
          "eval ruler " + kLlama + " --text " + t +
              " --lengths 300 --allow-past-context --tasks niah_single,vt --samples 1 "
              "--answer-tokens 4 --selectors sparse:a1:w8:k8:exact --kv int4:g16:tok",
          "eval numerics " + kLlama + " --file " + t + " --window 32 --tokens 40",
          "analyze " + kLlama + " --text " + t + " --tokens 48 --keys f32,int2:g16:tok"};
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// The document without what differs between two runs of the same rows: the wall-clock times.
nlohmann::json without_times(nlohmann::json j) {
  if (j.is_object()) {
    for (const char* key : {"seconds", "grid_seconds", "total_seconds", "tokens_per_s"})
      j.erase(key);
    for (auto& [key, value] : j.items()) value = without_times(value);
  } else if (j.is_array()) {
    for (auto& value : j) value = without_times(value);
  }
  return j;
}

// Every command: a finished run resumed is not run again, and what it reads back is what it
// wrote (the file is rewritten, for the commands of several rows, from the rows read back).
TEST(Cli, EveryEvalCommandResumesAFinishedRunWithoutRunningIt) {
  for (const std::string& command : eval_commands()) {
    const fs::path json = temp_file("visikv_resume_all.json");
    fs::remove(json);
    const ProgramRun first = run("-t 1 " + command + " --json " + json.string());
    ASSERT_EQ(first.status, 0) << command << "\n" << first.output;
    EXPECT_NE(first.output.find("done in"), std::string::npos) << command << "\n" << first.output;
    const std::string written = read_file(json);
    const nlohmann::json document = nlohmann::json::parse(written);
    EXPECT_EQ(document["complete"], true) << command;
    EXPECT_TRUE(document["parameters"].is_object()) << command;
    EXPECT_FALSE(fs::exists(json.string() + ".partial")) << command;
    const ProgramRun again = run("-t 1 " + command + " --resume " + json.string());
    ASSERT_EQ(again.status, 0) << command << "\n" << again.output;
    EXPECT_EQ(again.output.find("done in"), std::string::npos) << command << "\n" << again.output;
    // eval kv records this invocation's grid time; every other byte is read back.
    if (command.starts_with("eval kv"))
      EXPECT_EQ(without_times(nlohmann::json::parse(read_file(json))), without_times(document));
    else
      EXPECT_EQ(read_file(json), written) << command;
    // Without progress: nothing but the table.
    const ProgramRun quiet = run("-t 1 " + command + " --resume " + json.string() + " --quiet");
    EXPECT_EQ(quiet.output.find("kept from"), std::string::npos) << command << quiet.output;
    fs::remove(json);
  }
}

// A run killed after its first row: resuming runs only the rows that are missing and ends with the
// document an uninterrupted run writes; the row read back stays as it was written.
TEST(Cli, ResumedGridRunsOnlyTheMissingRows) {
  const std::string command = eval_commands()[2];  // eval sparse-ppl: 4 rows, 4 runs
  const fs::path full = temp_file("visikv_resume_full.json"),
                 partial = temp_file("visikv_resume_partial.json");
  fs::remove(full);
  ProgramRun r = run("-t 1 " + command + " --json " + full.string());
  ASSERT_EQ(r.status, 0) << r.output;
  nlohmann::json document = nlohmann::json::parse(read_file(full));
  ASSERT_EQ(document["rows"].size(), 4u);
  const std::string first_row = document["rows"][0].dump();
  nlohmann::json cut = document;
  cut["rows"] = nlohmann::json::array({document["rows"][0]});
  cut["complete"] = false;
  std::ofstream(partial) << cut.dump(2);

  r = run("-t 1 " + command + " --resume " + partial.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(occurrences(r.output, "kept from the resumed file"), 1u) << r.output;
  EXPECT_NE(r.output.find("[1/4] dense: kept from the resumed file"), std::string::npos);
  EXPECT_EQ(occurrences(r.output, "done in"), 3u) << r.output;
  const nlohmann::json resumed = nlohmann::json::parse(read_file(partial));
  EXPECT_EQ(resumed["rows"][0].dump(), first_row);  // seconds included: not run again
  EXPECT_EQ(without_times(resumed), without_times(document));
  fs::remove(full);
  fs::remove(partial);
}

// eval kv's products: exact by default, named in the JSON; a file written with other products is
// not resumed.
TEST(Cli, EvalKvNamesItsProductsAndResumesOnlyTheSame) {
  const std::string command = eval_commands()[1];
  ASSERT_TRUE(command.starts_with("eval kv"));
  const fs::path json = temp_file("visikv_eval_kv_numerics.json");
  fs::remove(json);
  const ProgramRun exact = run("-t 1 " + command + " --json " + json.string());
  ASSERT_EQ(exact.status, 0) << exact.output;
  EXPECT_NE(exact.output.find("products:     exact"), std::string::npos) << exact.output;
  EXPECT_EQ(nlohmann::json::parse(read_file(json))["numerics"], "exact");
  // (In decode order: decode-batched refuses int16 products of the fixture's float weights.)
  const ProgramRun other =
      run("-t 1 " + command + " --numerics int16 --mode decode --resume " + json.string());
  EXPECT_EQ(other.status, 1) << other.output;
  EXPECT_NE(other.output.find("numerics: nothing in the file, \"int16\" in this run"),
            std::string::npos)
      << other.output;
  const ProgramRun bad = run("-t 1 " + command + " --numerics int4");
  EXPECT_NE(bad.status, 0) << bad.output;
  EXPECT_NE(bad.output.find("--numerics"), std::string::npos) << bad.output;
  // The fixture's float weights round by the chunk with int16 products: refused in decode-batched
  // order before any row runs.
  const ProgramRun float_weights = run("-t 1 " + command + " --numerics int16");
  EXPECT_EQ(float_weights.status, 1) << float_weights.output;
  EXPECT_NE(float_weights.output.find("needs GGUF block weights in every matrix"),
            std::string::npos)
      << float_weights.output;
  fs::remove(json);
}

TEST(Cli, ResumeRefusesOtherParametersAndFilesItCannotRead) {
  const std::string command = eval_commands()[2];
  const fs::path json = temp_file("visikv_resume_checks.json");
  fs::remove(json);
  ASSERT_EQ(run("-t 1 " + command + " --json " + json.string()).status, 0);
  const auto fails_with = [](const std::string& args, const std::string& expected) {
    const ProgramRun r = run("-t 1 " + args);
    EXPECT_EQ(r.status, 1) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(expected), std::string::npos) << args << "\n" << r.output;
  };
  // Other parameters: every difference is named.
  const auto replaced = [](std::string text, const std::string& from, const std::string& to) {
    return text.replace(text.find(from), from.size(), to);
  };
  const std::string window16 = replaced(command, " --window 32", " --window 16");
  fails_with(window16 + " --resume " + json.string(),
             "written with other parameters (window: 32 in the file, 16 in this run)");
  fails_with(replaced(window16, " --tokens 40", " --tokens 20") + " --resume " + json.string(),
             "tokens: 40 in the file, 20 in this run; window: 32 in the file, 16 in this run");
  // Fewer rows: resuming would drop the others from the file.
  fails_with(
      replaced(command, " --keys int2:g16:tok", "") + " --resume " + json.string(),
      "holds rows this run does not make (int2:g16:tok, int2:g16:tok + sparse:a1:w8:k8:exact)");
  // Another command's file.
  fails_with(eval_commands()[1] + " --resume " + json.string(),
             "holds the results of `eval sparse-ppl`, not `eval kv`");
  // A row of the same name measured with other settings.
  nlohmann::json document = nlohmann::json::parse(read_file(json));
  document["rows"][2]["key_codec"] = "int4:g16:tok";
  std::ofstream(json) << document.dump();
  fails_with(command + " --resume " + json.string(),
             "row 'int2:g16:tok' there has keys int4:g16:tok");
  // A row that does not read back.
  document["rows"][2].erase("key_codec");
  document["rows"][0].erase("nll");
  std::ofstream(json) << document.dump();
  fails_with(command + " --resume " + json.string(), "row 'dense' does not read back");
  // Not JSON, not a results file, two files.
  std::ofstream(json) << "{\"command\": \"eval sparse-ppl\", \"rows\": [";
  fails_with(command + " --resume " + json.string(), "malformed JSON");
  std::ofstream(json) << "[1, 2]";
  fails_with(command + " --resume " + json.string(), "not a visikv results file");
  fails_with(command + " --resume " + json.string() + " --json other.json",
             "a resumed run writes the file it resumes");
  fs::remove(json);
}

// ppl --reference-keys: KL of the run against a reference of its own codecs is 0; with 2-bit keys
// it is the figure eval sparse-ppl reports for the same codec.
TEST(Cli, PerplexityReportsKlAgainstAReference) {
  const std::string text = eval_text().string();
  const fs::path json = temp_file("visikv_ppl_kl.json"), grid = temp_file("visikv_grid_kl.json");
  const std::string ppl = "-t 1 ppl " + kLlama + " --file " + text +
                          " --window 32 --tokens 40 --mode decode --reference-keys f32 --json " +
                          json.string();
  ProgramRun r = run(ppl + " --keys f32");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("top-1:        1.0000 of tokens agree"), std::string::npos) << r.output;
  nlohmann::json j = nlohmann::json::parse(read_file(json));
  EXPECT_EQ(j["kl_mean"], 0.0);
  EXPECT_EQ(j["kl_max"], 0.0);
  EXPECT_EQ(j["top1_agreement"], 1.0);
  EXPECT_EQ(j["reference_nll"], j["nll"]);
  r = run(ppl + " --keys int2:g16:tok");
  ASSERT_EQ(r.status, 0) << r.output;
  j = nlohmann::json::parse(read_file(json));
  EXPECT_GT(j["kl_mean"].get<double>(), 0);
  EXPECT_LE(j["kl_mean"].get<double>(), j["kl_max"].get<double>());
  EXPECT_LT(j["top1_agreement"].get<double>(), 1);
  r = run("-t 1 " + eval_commands()[2] + " --json " + grid.string());
  ASSERT_EQ(r.status, 0) << r.output;
  const nlohmann::json g = nlohmann::json::parse(read_file(grid));
  ASSERT_EQ(g["rows"][2]["name"], "int2:g16:tok");
  EXPECT_EQ(g["rows"][2]["kl_mean"], j["kl_mean"]);  // decode and decode-batched: same bits
  EXPECT_EQ(g["rows"][2]["top1_agreement"], j["top1_agreement"]);
  EXPECT_TRUE(g["rows"][0]["kl_mean"].is_null());  // dense is the reference
  // Without --reference-keys the fields are null.
  r = run("-t 1 ppl " + kLlama + " --file " + text + " --window 32 --tokens 40 --json " +
          json.string());
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(nlohmann::json::parse(read_file(json))["kl_mean"].is_null());
  fs::remove(json);
  fs::remove(grid);
}

struct BadInvocation {
  std::string args;
  std::string expected;  // part of the message
};

class CliBadInput : public ::testing::TestWithParam<BadInvocation> {};

TEST_P(CliBadInput, FailsWithAClearMessage) {
  const ProgramRun r = run(GetParam().args);
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find(GetParam().expected), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("internal error"), std::string::npos) << r.output;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CliBadInput,
    ::testing::Values(
        BadInvocation{"", "A subcommand is required"}, BadInvocation{"frobnicate", "frobnicate"},
        BadInvocation{"info /no/such/model", "model not found"},
        BadInvocation{"info " + std::string(VISIKV_FIXTURES) + "/formats/floats.safetensors",
                      "GGUF"},
        BadInvocation{"ppl " + kLlama + " --window 1", "window"},
        BadInvocation{"ppl " + kLlama + " --window 100000 --tokens 4",
                      "exceeds the model's context"},
        // Every command that feeds positions checks them against the context, with one message.
        BadInvocation{"ppl " + kLlama + " --window 256",
                      "a perplexity window of 256 tokens needs 256 positions, which exceeds the "
                      "model's context of 128 positions"},
        BadInvocation{"eval kv " + kLlama + " --window 256 --tokens 8",
                      "--window 256 needs 256 positions, which exceeds the model's context of "
                      "128 positions"},
        BadInvocation{"eval sparse-ppl " + kLlama + " --window 256 --tokens 8",
                      "--window 256 needs 256 positions, which exceeds the model's context of "
                      "128 positions"},
        BadInvocation{"eval sparse " + kLlama + " --prefix 120 --continuation 16",
                      "a prefix of 120 tokens + a continuation of 16 needs 136 positions, which "
                      "exceeds the model's context of 128 positions"},
        BadInvocation{"eval needle " + kLlama + " --contexts 200",
                      "needle: context 200 + 10 answer tokens needs 210 positions, which exceeds "
                      "the model's context of 128 positions"},
        BadInvocation{"eval ruler " + kLlama + " --lengths 4096",
                      "ruler: length 4096 needs 4096 positions, which exceeds the model's context "
                      "of 128 positions"},
        BadInvocation{"eval coverage " + kLlama + " --tokens 512",
                      "coverage: a window of 512 tokens needs 512 positions, which exceeds the "
                      "model's context of 128 positions"},
        BadInvocation{"eval numerics " + kLlama + " --tokens 8",
                      "a window of 1024 tokens needs 1024 positions, which exceeds the model's "
                      "context of 128 positions"},
        BadInvocation{"analyze " + kLlama + " --tokens 256 --keys f32",
                      "--tokens 256 needs 256 positions, which exceeds the model's context of "
                      "128 positions"},
        BadInvocation{"calibrate " + kLlama + " --window 256 --out /dev/null",
                      "--window 256 needs 256 positions, which exceeds the model's context of "
                      "128 positions"},
        BadInvocation{"ppl " + kGpt2 + " --window 256",
                      "which exceeds the model's context of 128 positions"},
        BadInvocation{"generate " + kLlama, "give a prompt or --file"},
        BadInvocation{"generate " + kLlama + " 'x' --file /dev/null", "excludes"},
        BadInvocation{"ppl " + kLlama + " --mode sideways", "mode"},
        BadInvocation{"ppl " + kLlama + " --tokens -5", "tokens"},
        BadInvocation{"ppl " + kLlama + " --window 16 --file /no/such/text.txt", "no such file"},
        BadInvocation{
            "ppl " + kLlama + " --cache int3 --tokens 4 --file " + kLlama + "/config.json", "int3"},
        BadInvocation{"ppl " + kLlama + " --selector sparse:a1:w0:k0:exact --tokens 4", "k"},
        BadInvocation{"ppl " + kLlama + " --selector fancy --tokens 4", "fancy"},
        // Options of the other side of the cache fail where the flag is read, naming both.
        BadInvocation{"ppl " + kLlama + " --keys a2:int2/int4:g16:w4:avg3 --tokens 4",
                      "--keys: key codec 'a2:int2/int4:g16:w4:avg3': the value bit policy 'a2' "
                      "is for values only"},
        BadInvocation{"ppl " + kLlama + " --values int2:g16:tok+headq:r4:s4 --tokens 4",
                      "--values: value codec 'int2:g16:tok+headq:r4:s4': the HeadQ side code "
                      "'+headq:r4:s4' is for keys only"},
        BadInvocation{"eval sparse-ppl " + kLlama + " --keys recency:int2/int4:g16:w4:avg3",
                      "--keys: key codec"},
        BadInvocation{"eval coverage " + kLlama + " --values int2:g16:tok+headq:r4:s4",
                      "--values: value codec"},
        BadInvocation{"analyze " + kLlama + " --values int2:g16:tok+headq:r4:s4", "keys only"},
        // A JSON file that cannot be written is an error, also when opening it succeeds.
        BadInvocation{"ppl " + kLlama + " --tokens 4 --window 8 --file " + kLlama +
                          "/reference.json --json /dev/full",
                      "cannot write /dev/full"},
        BadInvocation{"ppl " + kLlama + " --tokens 4 --window 8 --file " + kLlama +
                          "/reference.json --json /no/such/dir/out.json",
                      "cannot write /no/such/dir/out.json"},
        BadInvocation{"generate " + kLlama + " 'x' --top-p 2", "top-p"},
        BadInvocation{"generate " + kLlama + " 'x' --temperature -1", "temperature"},
        BadInvocation{"generate " + kLlama + " 'x' --bogus-flag", "bogus-flag"},
        BadInvocation{"tokenize " + kLlama, "give a text or --file"}));

}  // namespace

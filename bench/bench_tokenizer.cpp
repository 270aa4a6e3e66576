// Tokenizer speed: encoding the WikiText-103 test text (1.3 MB) with the default model's
// byte-level BPE and with a SentencePiece-style fixture tokenizer (Google Benchmark).
//   build/bench/bench_tokenizer [--benchmark_format=json]
// bytes_per_second and tokens_per_s are per encode of the whole text.
#include <benchmark/benchmark.h>

#include <filesystem>
#include <string>
#include <vector>

#include "visikv/eval/data_paths.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/model.h"
#include "visikv/tokenizer/tokenizer.h"

namespace {

using namespace visikv;

const std::string& test_text() {
  static const std::string text = read_text_file(default_test_text());
  return text;
}

void encode_text(benchmark::State& state, const Tokenizer& tokenizer) {
  const std::string& text = test_text();
  size_t tokens = 0;
  for (auto _ : state) {
    const std::vector<int32_t> ids = tokenizer.encode(text, false);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * text.size()));
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(tokens) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}

void DefaultModelByteLevelBpe(benchmark::State& state) {
  static const Model model = Model::load("default");
  encode_text(state, model.tokenizer());
}

void SentencePieceFixture(benchmark::State& state) {
  static const Tokenizer tokenizer =
      Tokenizer::from_hf_json(std::filesystem::path(VISIKV_SOURCE_DIR) / "tests" / "fixtures" /
                              "tokenizer" / "spm_legacy_trained" / "tokenizer.json");
  encode_text(state, tokenizer);
}

}  // namespace

BENCHMARK(DefaultModelByteLevelBpe)->Unit(benchmark::kMillisecond);
BENCHMARK(SentencePieceFixture)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();

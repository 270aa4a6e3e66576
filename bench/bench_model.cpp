// Prefill and decode speed of a model at several context lengths (Google Benchmark).
//   build/bench/bench_model [--benchmark_format=json]        (model: $VISIKV_BENCH_MODEL or
//   default; cache codec for keys and values: $VISIKV_BENCH_CACHE, default f16, any spec of
//   docs/CACHE_SPECS.md without side codes, e.g. int4:g32:tok; products: $VISIKV_BENCH_NUMERICS,
//   exact (default), int8 or int16, as `visikv generate --numerics`; attention support of the
//   decode steps: $VISIKV_BENCH_SELECTOR, any spec of docs/SELECTOR_SPECS.md, dense by default
//   (the prefill before them is dense; a query frame qN reads the basis file
//   $VISIKV_BENCH_BASIS, made by `visikv calibrate`); decode steps: $VISIKV_BENCH_DECODE_STEPS,
//   default 32 (more make a profile of the decode steps stand out from the untimed prefill's))
// Prefill/N: one forward pass over N tokens. Decode/N: the decode steps, one token at a time, after
// an N-token prefill (the prefill is not timed); tokens_per_s counts them; support and keys_read:
// the positions whose values, and whose keys, a query head read per step (a certified choice from
// position sketches also reads keys whose values it then leaves out). peak_rss_mib: the
// process's peak resident memory when the benchmark ended.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "visikv/attention/support.h"
#include "visikv/calibration/basis_file.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"
#include "visikv/model/matmul.h"
#include "visikv/model/model.h"

namespace {

using namespace visikv;

int64_t decode_steps() {
  const char* steps = std::getenv("VISIKV_BENCH_DECODE_STEPS");
  return steps != nullptr ? std::max<int64_t>(1, std::atoll(steps)) : 32;
}
// The text the benchmarks read: the first 256 KB of WikiText-103 test (about 60,000 tokens, more
// than the longest context plus its decode steps), cut at a line end. Tokenizing the whole file
// would add its own memory to the peak RSS the comparison with llama.cpp reports (whose
// measured process receives ready token ids).
constexpr size_t kTextBytes = 256 * 1024;

struct Loaded {
  Model model;
  std::vector<int32_t> text;
};

Loaded& loaded() {
  static Loaded instance = [] {
    const char* spec = std::getenv("VISIKV_BENCH_MODEL");
    Model model = Model::load(spec != nullptr ? spec : "default");
    std::string whole = read_text_file(default_test_text());
    const size_t line_end = whole.find('\n', std::min(kTextBytes, whole.size()));
    if (line_end != std::string::npos) whole.resize(line_end + 1);
    std::vector<int32_t> text = model.tokenizer().encode(whole, false);
    return Loaded{std::move(model), std::move(text)};
  }();
  return instance;
}

SelectorSpec bench_selector() {
  const char* name = std::getenv("VISIKV_BENCH_SELECTOR");
  return parse_selector_spec(name != nullptr ? name : "dense");
}

// The calibrated basis $VISIKV_BENCH_BASIS names (for selectors with a query frame qN); null
// without it.
const HeadqBasis* bench_basis() {
  static const std::optional<HeadqBasis> basis = []() -> std::optional<HeadqBasis> {
    const char* path = std::getenv("VISIKV_BENCH_BASIS");
    if (path == nullptr || *path == '\0') return std::nullopt;
    return load_headq_basis(path, loaded().model);
  }();
  return basis ? &*basis : nullptr;
}

std::unique_ptr<KVCache> make_bench_cache(const Decoder& decoder, int64_t tokens) {
  const char* name = std::getenv("VISIKV_BENCH_CACHE");
  const std::string spec = name != nullptr ? name : "f16";
  const SelectorSpec selector = bench_selector();
  auto cache = make_cache(decoder.cache_shape(), spec, spec, tokens, selector.cache_block_size());
  prepare_summaries(*cache, selector, bench_basis());
  return cache;
}

// A decoder with the products $VISIKV_BENCH_NUMERICS asks for.
Decoder make_bench_decoder(const Model& model) {
  Decoder decoder(model);
  const char* name = std::getenv("VISIKV_BENCH_NUMERICS");
  if (name != nullptr && *name != '\0') decoder.set_product_rounding(numerics_rounding(name));
  return decoder;
}

void discard(int64_t, int64_t, std::span<const float>) {}

// This process's peak resident memory so far (VmHWM of /proc/self/status), in MiB; 0 where the
// system has no such file. Read here rather than from wait4 by the caller: a child's ru_maxrss
// starts from its parent's peak (kept across exec), so a large parent hides a smaller child.
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

// Whether `positions` positions fit the model's context (16384 is for the 1.5B model; the default
// model holds 8192); reports a skipped benchmark otherwise.
bool fits_context(benchmark::State& state, const Model& model, int64_t positions) {
  const int64_t context = model.config().max_positions;
  if (context <= 0 || positions <= context) return true;
  state.SkipWithError(("longer than the model's context of " + std::to_string(context)).c_str());
  return false;
}

void Prefill(benchmark::State& state) {
  Loaded& l = loaded();
  Decoder decoder = make_bench_decoder(l.model);
  const int64_t n = state.range(0);
  if (!fits_context(state, l.model, n)) return;
  auto cache = make_bench_cache(decoder, n);
  const std::span<const int32_t> tokens(l.text.data(), static_cast<size_t>(n));
  for (auto _ : state) {
    cache->clear();
    decoder.forward(tokens, *cache, LogitRows::Last, discard);
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_rss_mib"] = peak_rss_mib();
}

void Decode(benchmark::State& state) {
  Loaded& l = loaded();
  Decoder decoder = make_bench_decoder(l.model);
  const int64_t n = state.range(0), steps = decode_steps();
  if (!fits_context(state, l.model, n + steps)) return;
  auto cache = make_bench_cache(decoder, n + steps);
  const SelectorSpec selector = bench_selector();
  const std::unique_ptr<Support> support = make_support(selector);
  std::vector<SparseQueryStats> stats;
  double support_sum = 0, keys_sum = 0, support_count = 0;
  for (auto _ : state) {
    state.PauseTiming();
    cache->clear();
    support->reset();
    decoder.forward({l.text.data(), static_cast<size_t>(n)}, *cache, LogitRows::Last, discard);
    state.ResumeTiming();
    for (int64_t i = 0; i < steps; ++i)
      decoder.forward({l.text.data() + n + i, 1}, *cache, LogitRows::Last, discard,
                      {.support = support.get(),
                       .support_stats = [&](int64_t, std::span<const SparseQueryStats> s) {
                         for (const SparseQueryStats& q : s) {
                           support_sum += q.support;
                           keys_sum += keys_read(selector, q);
                         }
                         support_count += static_cast<double>(s.size());
                       }});
  }
  if (support_count > 0) {
    state.counters["support"] = support_sum / support_count;
    state.counters["keys_read"] = keys_sum / support_count;
  }
  state.counters["tokens_per_s"] =
      benchmark::Counter(static_cast<double>(steps), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_rss_mib"] = peak_rss_mib();
}

// One iteration per repetition: each decode iteration needs its own (untimed) prefill.
BENCHMARK(Prefill)
    ->Arg(128)
    ->Arg(512)
    ->Arg(1024)
    ->Arg(4096)
    ->Arg(8160)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);
BENCHMARK(Decode)
    ->Arg(128)
    ->Arg(512)
    ->Arg(1024)
    ->Arg(4096)
    ->Arg(8160)
    ->Arg(16384)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);

}  // namespace

BENCHMARK_MAIN();

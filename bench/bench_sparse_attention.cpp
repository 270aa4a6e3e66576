// Decode attention time per token versus context, dense against the sparse selectors
// (Google Benchmark).
//   build/bench/bench_sparse_attention [--benchmark_filter=...] [--benchmark_min_time=0.05]
// One layer of a synthetic dense f16 cache shaped like the default model's attention (head_dim 64,
// 3 KV heads, 9 query heads, summary blocks of 16), holding n = 1K..64K positions; one query token
// at position n - 1 attends through attend(). Values are N(0, 1); keys are N(0, 0.3^2) noise,
// and one key in 512 also carries 12 u for a unit direction u (a planted heavy position) that the
// queries (12 u + N(0, 0.3^2)) share, so attention is concentrated on the heavy positions: the
// setting in which the certified mode can stop early (on unstructured keys its bound certifies
// little and it reads nearly everything). The time is one decode token's attention for
// the layer (all 9 heads); counters: support (mean positions read per query head), blocks_read,
// summaries_read, selection_scores (keys scored to choose) and delta (certified).
// Threads: OpenMP over the 3 KV heads (set OMP_NUM_THREADS for a stable comparison).
#include <benchmark/benchmark.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/kv/dense_cache.h"

namespace {

using namespace visikv;

constexpr int64_t kHeads = 9, kKvHeads = 3, kHeadDim = 64, kBlock = 16, kHeavyEvery = 512;
constexpr float kNoise = 0.3f, kHeavy = 12.0f;

struct Context {
  int64_t n = 0;
  std::unique_ptr<KVCache> cache;
  std::vector<float> query;
};

// One context at a time (the benchmarks are registered context-major), rebuilt when n changes.
const Context& context(int64_t n) {
  static Context current;
  if (current.n == n) return current;
  current = Context{};
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> direction(kHeadDim);
  double norm = 0;
  for (float& x : direction) {
    x = normal(rng);
    norm += x * x;
  }
  for (float& x : direction) x = static_cast<float>(x / std::sqrt(norm));
  current.cache = make_dense_cache({1, kKvHeads, kHeadDim}, DenseFormat::F16, n, kBlock);
  current.cache->set_position_sketches(8);  // for the certified rows with :p8 (others ignore it)
  const int64_t row = kKvHeads * kHeadDim, chunk = 4096;
  std::vector<float> keys(chunk * row), values(chunk * row);
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t count = std::min(chunk, n - start);
    for (int64_t i = 0; i < count * row; ++i) {
      keys[i] = kNoise * normal(rng);
      values[i] = normal(rng);
    }
    for (int64_t t = 0; t < count; ++t)
      if ((start + t) % kHeavyEvery == kHeavyEvery / 2)
        for (int64_t i = 0; i < row; ++i) keys[t * row + i] += kHeavy * direction[i % kHeadDim];
    current.cache->append(0, std::span(keys).first(count * row),
                          std::span(values).first(count * row), count);
  }
  current.query.resize(kHeads * kHeadDim);
  for (size_t i = 0; i < current.query.size(); ++i)
    current.query[i] = kHeavy * direction[i % kHeadDim] + kNoise * normal(rng);
  current.n = n;
  return current;
}

void attention(benchmark::State& state, const std::string& spec_text) {
  const int64_t n = state.range(0);
  const Context& c = context(n);
  const std::unique_ptr<Support> selector = make_support(spec_text);
  const AttentionSpec spec{kHeads, kHeadDim, 1.0 / std::sqrt(double(kHeadDim)), 0};
  std::vector<float> out(kHeads * kHeadDim);
  std::vector<SparseQueryStats> stats(kHeads);
  for (auto _ : state) {
    attend(*c.cache, 0, c.query, 1, n - 1, spec, *selector, out, stats);
    benchmark::DoNotOptimize(out.data());
  }
  double support = 0, blocks = 0, summaries = 0, selection = 0, delta = 0;
  for (const SparseQueryStats& s : stats) {
    support += s.support;
    blocks += s.blocks_read;
    summaries += s.summaries_read;
    selection += s.selection_scores;
    delta = std::max(delta, std::isnan(s.delta) ? 0.0 : s.delta);
  }
  state.counters["support"] = support / kHeads;
  state.counters["blocks_read"] = blocks / kHeads;
  state.counters["summaries_read"] = summaries / kHeads;
  state.counters["selection_scores"] = selection / kHeads;
  state.counters["delta"] = delta;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> specs = {
      "dense",
      "sparse:a1:w64:k128:exact",
      "sparse:a1:w64:k128:b16:centroid",
      "sparse:a1:w64:k128:b16:bound",
      "certified:a1:w64:b16:eps0.01",
      "certified:a1:w64:b16:eps0.01:p8",
  };
  for (const int64_t n : {1024, 4096, 16384, 65536}) {
    for (const std::string& spec : specs) {
      benchmark::RegisterBenchmark(("DecodeAttention/" + spec).c_str(), attention, spec)
          ->Arg(n)
          ->Unit(benchmark::kMicrosecond);
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

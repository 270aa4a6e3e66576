// Cost of one decode step of attention per KV head, per cache codec (Google Benchmark):
// score a group of queries against n cached positions, then accumulate the values with weights
// over the same positions, both from the stored form.
//   build/bench/bench_kv_codecs [--benchmark_filter=int4] [--benchmark_min_time=0.1]
// Names are KVCodec/<spec>/<n>; keys and values use the same spec (a HeadQ side code, random
// basis, on the keys only), head_dim 64, 3 queries per KV head (the SmolLM2-135M grouping).
// bytes_per_second counts the stored key and value bytes one call reads (bytes_per_call,
// side codes included); ns_per_position is the time per cached position.
#include <benchmark/benchmark.h>

#include <random>
#include <string>
#include <vector>

#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_spec.h"

namespace {

using namespace visikv;

constexpr int64_t kHeadDim = 64;
constexpr int64_t kGroup = 3;

void codec_step(benchmark::State& state, const std::string& spec, int64_t n) {
  const std::string value_spec = spec.substr(0, spec.find('+'));  // side codes are for keys
  auto cache = make_cache({1, 1, kHeadDim}, spec, value_spec, n);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> keys(n * kHeadDim), values(n * kHeadDim), queries(kGroup * kHeadDim);
  for (float& x : keys) x = normal(rng);
  for (float& x : values) x = normal(rng);
  for (float& x : queries) x = normal(rng);
  cache->append(0, keys, values, n);

  const PositionSet positions = PositionSet::range(0, n);
  std::vector<float> scores(kGroup * n), out(kGroup * kHeadDim);
  const std::vector<float> weights(kGroup * n, 1.0f / static_cast<float>(n));
  for (auto _ : state) {
    cache->score(0, 0, queries, positions, scores);
    std::fill(out.begin(), out.end(), 0.0f);
    cache->accumulate(0, 0, weights, positions, out);
    benchmark::DoNotOptimize(scores.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double bytes =
      static_cast<double>(codec_stored_bits(parse_codec_spec(spec), kHeadDim, n) +
                          codec_stored_bits(parse_codec_spec(value_spec), kHeadDim, n)) /
      8.0;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  state.counters["bytes_per_call"] = bytes;
  state.counters["ns_per_position"] = benchmark::Counter(
      static_cast<double>(n) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

}  // namespace

int main(int argc, char** argv) {
  for (const char* spec :
       {"f32", "f16", "bf16", "int8:g64:tok", "int4:g64:tok", "int3:g64:tok", "int2:g64:tok",
        "int4:g32:tok", "int8:g32:chan:r128", "int4:g32:chan:r128", "int3:g32:chan:r128",
        "int2:g32:chan:r128", "int4:g64:tok:had", "int2:g64:tok:had", "int2:g32:chan:r128:had",
        "int2:g64:tok+headq:r8:s4:random", "int2:g32:chan:r128+headq:r8:s4:random"}) {
    for (int64_t n : {1024, 4096, 16384}) {
      benchmark::RegisterBenchmark(
          ("KVCodec/" + std::string(spec) + "/" + std::to_string(n)).c_str(), codec_step,
          std::string(spec), n);
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

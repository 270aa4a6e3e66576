// Cost of one decode step of attention over the cache, per cache codec (Google Benchmark): score
// a group of queries against n cached positions, then accumulate the values with weights over
// the same positions, both from the stored form.
//   build/bench/bench_kv_codecs [--benchmark_filter=int4] [--benchmark_min_time=0.1]
// Three families, keys and values in the same spec (a HeadQ side code, random basis, on the keys
// only), head_dim 64, 3 queries per KV head (the SmolLM2-135M grouping):
//   KVCodec/<spec>/<n>      one KV head: its cache stays in the core's caches, so this measures
//                           the arithmetic of reading the stored form;
//   KVCodecTile/<spec>/<n>  the same head read by 63 queries at once (21 tokens x 3 heads, a tile
//                           of dense prefill), which read each block of rows once and score it
//                           transposed;
//   KVCodecStep/<spec>/<n>  every KV head of the default model's cache (30 layers x 3 heads), as
//                           one decode step on one thread reads it: at 4K positions the dense
//                           f32 cache is 189 MB, so this measures the memory traffic as well.
// bytes_per_second counts the stored key and value bytes one call reads (bytes_per_call, side
// codes included); ns_per_position is the time per cached position (per head and position for
// KVCodec, per position of the whole model for KVCodecStep); ns_per_query_position divides it by
// the queries.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_spec.h"

namespace {

using namespace visikv;

constexpr int64_t kHeadDim = 64;
constexpr int64_t kGroup = 3;
// SmolLM2-135M: 30 layers, 3 KV heads of 64.
constexpr CacheShape kDefaultModelCache{30, 3, kHeadDim};
constexpr const char* kSpecs[] = {"f32",
                                  "f16",
                                  "bf16",
                                  "int8:g64:tok",
                                  "int4:g64:tok",
                                  "int3:g64:tok",
                                  "int2:g64:tok",
                                  "int4:g32:tok",
                                  "int8:g32:chan:r128",
                                  "int4:g32:chan:r128",
                                  "int3:g32:chan:r128",
                                  "int2:g32:chan:r128",
                                  "int4:g64:tok:had",
                                  "int2:g64:tok:had",
                                  "int2:g32:chan:r128:had",
                                  "int2:g64:tok+headq:r8:s4:random",
                                  "int2:g32:chan:r128+headq:r8:s4:random"};

// The values' spec of a benchmark spec: side codes are for keys.
std::string value_spec_of(const std::string& spec) { return spec.substr(0, spec.find('+')); }

// A cache of `shape` holding n random tokens in every layer. The last one built is kept, since
// the benchmark library calls a benchmark several times and a model-sized cache takes seconds to
// fill.
const KVCache& filled_cache(const CacheShape& shape, const std::string& spec, int64_t n) {
  static std::unique_ptr<KVCache> cache;
  static std::string key;
  const std::string wanted =
      spec + "/" + std::to_string(n) + "/" + std::to_string(shape.layers * shape.kv_heads);
  if (cache && key == wanted) return *cache;
  cache.reset();
  cache = make_cache(shape, spec, value_spec_of(spec), n);
  key = wanted;
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t row = shape.kv_heads * shape.head_dim, chunk = 256;
  std::vector<float> keys(chunk * row), values(chunk * row);
  for (int64_t layer = 0; layer < shape.layers; ++layer)
    for (int64_t t = 0; t < n; t += chunk) {
      const int64_t here = std::min(chunk, n - t);
      for (float& x : keys) x = normal(rng);
      for (float& x : values) x = normal(rng);
      cache->append(layer, std::span(keys).first(here * row), std::span(values).first(here * row),
                    here);
    }
  return *cache;
}

void codec_step(benchmark::State& state, const CacheShape& shape, const std::string& spec,
                int64_t n, int64_t group) {
  const KVCache& cache = filled_cache(shape, spec, n);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> queries(group * kHeadDim);
  for (float& x : queries) x = normal(rng);
  const PositionSet positions = PositionSet::range(0, n);
  std::vector<float> scores(group * n), out(group * kHeadDim);
  const std::vector<float> weights(group * n, 1.0f / static_cast<float>(n));
  for (auto _ : state) {
    for (int64_t layer = 0; layer < shape.layers; ++layer)
      for (int64_t head = 0; head < shape.kv_heads; ++head) {
        cache.score(layer, head, queries, positions, scores);
        std::fill(out.begin(), out.end(), 0.0f);
        cache.accumulate(layer, head, weights, positions, out);
        benchmark::DoNotOptimize(scores.data());
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
      }
  }
  const std::string value_spec = value_spec_of(spec);
  const double bytes =
      static_cast<double>(shape.layers * shape.kv_heads *
                          (codec_stored_bits(parse_codec_spec(spec), kHeadDim, n) +
                           codec_stored_bits(parse_codec_spec(value_spec), kHeadDim, n))) /
      8.0;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
  state.counters["bytes_per_call"] = bytes;
  state.counters["ns_per_position"] = benchmark::Counter(
      static_cast<double>(n) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["ns_per_query_position"] = benchmark::Counter(
      static_cast<double>(n * group) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

}  // namespace

int main(int argc, char** argv) {
  const struct {
    const char* name;
    CacheShape shape;
    int64_t queries;
  } families[] = {{"KVCodec", {1, 1, kHeadDim}, kGroup},
                  {"KVCodecTile", {1, 1, kHeadDim}, 21 * kGroup},
                  {"KVCodecStep", kDefaultModelCache, kGroup}};
  for (const auto& family : families)
    for (const char* spec : kSpecs)
      for (int64_t n : {1024, 4096, 16384})
        benchmark::RegisterBenchmark(
            (std::string(family.name) + "/" + spec + "/" + std::to_string(n)).c_str(), codec_step,
            family.shape, std::string(spec), n, family.queries);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

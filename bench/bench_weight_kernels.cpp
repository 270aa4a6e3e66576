// Throughput of the weight products on one thread against this core's multiply-add peak (Google
// Benchmark):
//   build/bench/bench_weight_kernels [--benchmark_filter=Q4_K]
//   FmaPeak                       independent 512-bit (or 256-bit without AVX-512) fused
//                                 multiply-adds in registers: the float floor of every product
//   Product/<type>/<tokens>       a 1536 x 1536 matrix of random blocks (the 1.5B benchmark
//                                 model's attention width) times `tokens` tokens, as linear_forward
//                                 computes it on one thread: 1 token is decode (the row kernel),
//                                 64 and 256 tokens prefill (the cache-blocked product; with
//                                 AMX, 256 tokens are one pass of the tile products); exact
//                                 products, and with the _int16 suffix the int16 numerics
//   ProductDown/<type>/256        the same with 1536 x 8960 (the 1.5B model's MLP down
//                                 projection), whose activations outgrow the core's L2
// Counters: gmac_per_s (multiply-adds per second), and for FmaPeak the lanes per instruction.
// The exact products multiply every weight into float32 accumulators, so gmac_per_s / (peak
// instructions per second x lanes) is the fraction of the float floor a product reaches.
#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "visikv/core/half.h"
#include "visikv/formats/tensor.h"
#include "visikv/model/matmul.h"
#include "visikv/model/weights.h"

namespace {

using namespace visikv;

constexpr int kChains = 16;  // independent accumulators: enough to hide the multiply-add latency

__attribute__((target("avx512f"))) float fma_chains_512(int64_t iterations) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.9999f), b = _mm512_set1_ps(1e-5f);
  for (int64_t n = 0; n < iterations; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  alignas(64) float lanes[16];
  float sum = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm512_store_ps(lanes, acc[i]);
    for (float v : lanes) sum += v;
  }
  return sum;
}

float fma_chains_256(int64_t iterations) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(0.001f * static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.9999f), b = _mm256_set1_ps(1e-5f);
  for (int64_t n = 0; n < iterations; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  alignas(32) float lanes[8];
  float sum = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm256_store_ps(lanes, acc[i]);
    for (float v : lanes) sum += v;
  }
  return sum;
}

void FmaPeak(benchmark::State& state) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  constexpr int64_t kIterations = 1 << 20;
  for (auto _ : state)
    benchmark::DoNotOptimize(avx512 ? fma_chains_512(kIterations) : fma_chains_256(kIterations));
  const double lanes = avx512 ? 16 : 8;
  state.counters["lanes"] = lanes;
  state.counters["gmac_per_s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * kIterations * kChains * lanes * 1e-9,
      benchmark::Counter::kIsRate);
}
BENCHMARK(FmaPeak)->Unit(benchmark::kMillisecond);

// Random blocks with small fp16 scales (every other byte random), so the values are finite.
std::vector<std::byte> random_blocks(DType type, int64_t rows, int64_t columns) {
  const DTypeInfo& info = dtype_info(type);
  const int64_t row_bytes = storage_bytes(type, columns);
  std::vector<std::byte> data(static_cast<size_t>(rows * row_bytes));
  std::mt19937 rng(1);
  for (auto& b : data) b = static_cast<std::byte>(rng() & 0xFF);
  const int64_t blocks = rows * columns / info.block_elements;
  const uint16_t scale = float_to_fp16(0.01f);
  for (int64_t b = 0; b < blocks; ++b) {
    std::byte* block = data.data() + b * info.block_bytes;
    // Where each type keeps its fp16 scale(s): Q6_K at the end, the others at the start.
    if (type == DType::Q6_K) {
      std::memcpy(block + 208, &scale, 2);
    } else {
      std::memcpy(block, &scale, 2);
      if (type == DType::Q4_1 || type == DType::Q5_1 || type == DType::Q4_K || type == DType::Q5_K)
        std::memcpy(block + 2, &scale, 2);
    }
  }
  return data;
}

// `rows` x `columns` weights of `type` times state.range(0) tokens.
void product(benchmark::State& state, DType type, ProductRounding rounding, int64_t rows,
             int64_t columns) {
  const int64_t tokens = state.range(0);
  const std::vector<std::byte> weights = random_blocks(type, rows, columns);
  Linear layer;
  layer.weight.name = "bench";
  layer.weight.dtype = type;
  layer.weight.shape = {rows, columns};
  layer.weight.data = weights;
  std::vector<float> x(static_cast<size_t>(tokens * columns)),
      y(static_cast<size_t>(tokens * rows));
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  for (auto _ : state) {
    linear_forward(layer, x, tokens, y, rounding);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["gmac_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * tokens * rows * columns * 1e-9,
                         benchmark::Counter::kIsRate);
}

void Product(benchmark::State& state, DType type, ProductRounding rounding) {
  product(state, type, rounding, 1536, 1536);
}

// The 1.5B model's MLP down projection: 8960 inputs, whose 16-bit activations for 256 tokens
// (4.6 MB) do not fit the core's L2.
void ProductDown(benchmark::State& state, DType type, ProductRounding rounding) {
  product(state, type, rounding, 1536, 8960);
}

void ProductArguments(benchmark::internal::Benchmark* b) {
  b->Arg(1)->Arg(64)->Arg(256)->Unit(benchmark::kMillisecond);
}
constexpr ProductRounding kExact = ProductRounding::PerToken;
constexpr ProductRounding kInt16 = ProductRounding::QuantizedActivations16;
BENCHMARK_CAPTURE(Product, Q4_0, DType::Q4_0, kExact)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q4_1, DType::Q4_1, kExact)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q8_0, DType::Q8_0, kExact)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q4_K, DType::Q4_K, kExact)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q6_K, DType::Q6_K, kExact)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q4_1_int16, DType::Q4_1, kInt16)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q8_0_int16, DType::Q8_0, kInt16)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q4_K_int16, DType::Q4_K, kInt16)->Apply(ProductArguments);
BENCHMARK_CAPTURE(Product, Q6_K_int16, DType::Q6_K, kInt16)->Apply(ProductArguments);
BENCHMARK_CAPTURE(ProductDown, Q4_K_int16, DType::Q4_K, kInt16)
    ->Arg(256)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(ProductDown, Q6_K_int16, DType::Q6_K, kInt16)
    ->Arg(256)
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();

// Times the CUDA kernels (cuda/attention.h) with CUDA events: median of repeated calls after a
// warm-up, on constant-filled inputs (the kernels' time does not depend on the values). Prints one
// JSON array of records; bench/gpu/run_gpu_bench.sh joins them with torch SDPA's times.
//
//   bench_cuda_attention [--quick] [--out FILE]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/cuda/attention.h"

namespace {

using namespace visikv;
using nlohmann::json;

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) fail("CUDA error in ", call, ": ", cudaGetErrorString(status));
}

// Median milliseconds of `repeats` calls (after two warm-ups), each timed by its own events.
double median_ms(const std::function<void()>& call, int repeats) {
  for (int i = 0; i < 2; ++i) call();
  cuda::synchronize();
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    check(cudaEventRecord(start), "cudaEventRecord");
    call();
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Heads {
  int64_t q_heads, kv_heads, head_dim;
  std::string name() const {
    return std::to_string(q_heads) + "x" + std::to_string(kv_heads) + "x" +
           std::to_string(head_dim);
  }
};

cuda::DenseCache constant_cache(const cuda::AttentionShape& shape) {
  const size_t size =
      static_cast<size_t>(shape.sequences * shape.kv_heads * shape.capacity * shape.head_dim);
  cuda::DenseCache cache{cuda::Element::BF16, cuda::DeviceArray<uint16_t>(size),
                         cuda::DeviceArray<uint16_t>(size)};
  cache.keys.fill_bytes(0x3C);
  cache.values.fill_bytes(0x3C);
  return cache;
}

cuda::DeviceArray<int32_t> full_lengths(const cuda::AttentionShape& shape) {
  const std::vector<int32_t> lengths(shape.sequences, static_cast<int32_t>(shape.capacity));
  return cuda::DeviceArray<int32_t>(std::span<const int32_t>(lengths));
}

cuda::DeviceArray<float> constant_queries(int64_t count) {
  cuda::DeviceArray<float> queries(count);
  queries.fill_bytes(0x3C);  // 0.0115 as float32 (0x3C3C3C3C)
  return queries;
}

json record(const std::string& kernel, const Heads& heads, int64_t batch, int64_t n, double ms,
            double bytes, double flops, int64_t support, const std::string& setting) {
  json r{{"kernel", kernel},  {"heads", heads.name()}, {"batch", batch}, {"n", n},
         {"ms", ms},          {"bytes", bytes},        {"flops", flops}, {"support", support},
         {"setting", setting}};
  std::cerr << r.dump() << "\n";
  return r;
}

json dense_decode(const Heads& h, int64_t batch, int64_t n, int repeats) {
  const cuda::AttentionShape shape{batch, h.q_heads, h.kv_heads, h.head_dim, n};
  const cuda::DenseCache cache = constant_cache(shape);
  const auto lengths = full_lengths(shape);
  const auto queries = constant_queries(batch * h.q_heads * h.head_dim);
  cuda::DeviceArray<float> out(batch * h.q_heads * h.head_dim);
  cuda::Workspace workspace;
  const double ms = median_ms(
      [&] { cuda::decode_dense(shape, cache, queries, lengths, out, workspace); }, repeats);
  const double bytes = 2.0 * batch * h.kv_heads * n * h.head_dim * 2;
  return record("dense_decode", h, batch, n, ms, bytes, 4.0 * batch * h.q_heads * n * h.head_dim, n,
                "bf16");
}

json int_decode(const Heads& h, int64_t batch, int64_t n, int repeats, const std::string& keys,
                const std::string& values) {
  const cuda::AttentionShape shape{batch, h.q_heads, h.kv_heads, h.head_dim, n};
  const cuda::IntLayout layout =
      cuda::IntLayout::from_specs(parse_codec_spec(keys), parse_codec_spec(values), h.head_dim);
  const size_t rows = static_cast<size_t>(batch * h.kv_heads * n);
  cuda::IntCache cache;
  cache.layout = layout;
  cache.key_codes = cuda::DeviceArray<uint8_t>(rows * layout.key_row_bytes());
  cache.key_params = cuda::DeviceArray<uint16_t>(rows * 2 * layout.key_groups());
  cache.value_codes = cuda::DeviceArray<uint8_t>(rows * layout.value_row_bytes());
  cache.value_params = cuda::DeviceArray<uint16_t>(rows * 2 * layout.value_groups());
  cache.side_codes = cuda::DeviceArray<uint8_t>(rows * layout.side_row_bytes());
  cache.side_params = cuda::DeviceArray<uint16_t>(layout.side_rank > 0 ? rows * 2 : 0);
  cache.basis = cuda::DeviceArray<float>(h.kv_heads * layout.side_rank * h.head_dim);
  cache.key_codes.fill_bytes(0x5A);
  cache.key_params.fill_bytes(0x3C);
  cache.value_codes.fill_bytes(0xA5);
  cache.value_params.fill_bytes(0x3C);
  cache.side_codes.fill_bytes(0x33);
  cache.side_params.fill_bytes(0x3C);
  cache.basis.fill_bytes(0x3C);
  const auto lengths = full_lengths(shape);
  const auto queries = constant_queries(batch * h.q_heads * h.head_dim);
  cuda::DeviceArray<float> out(batch * h.q_heads * h.head_dim);
  cuda::Workspace workspace;
  const double ms =
      median_ms([&] { cuda::decode_int(shape, cache, queries, lengths, out, workspace); }, repeats);
  const double row_bytes = layout.key_row_bytes() + 4.0 * layout.key_groups() +
                           layout.side_row_bytes() + (layout.side_rank > 0 ? 4.0 : 0.0) +
                           layout.value_row_bytes() + 4.0 * layout.value_groups();
  return record("int_decode", h, batch, n, ms, row_bytes * rows,
                4.0 * batch * h.q_heads * n * h.head_dim, n, keys + " / " + values);
}

json sparse_decode(const Heads& h, int64_t n, int repeats, const cuda::SparseSpec& spec,
                   const std::string& setting) {
  const cuda::AttentionShape shape{1, h.q_heads, h.kv_heads, h.head_dim, n};
  const cuda::DenseCache cache = constant_cache(shape);
  const auto lengths = full_lengths(shape);
  const auto queries = constant_queries(h.q_heads * h.head_dim);
  cuda::DeviceArray<float> out(h.q_heads * h.head_dim);
  cuda::Workspace workspace;
  cuda::BlockSummariesGpu summaries;
  // Summaries are kept up to date as keys arrive (one block touched per token), so a decode step
  // pays for selection and attention only.
  cuda::summarize_blocks(shape, cache, lengths, 64, summaries);
  cuda::Support support;
  const double ms = median_ms(
      [&] {
        cuda::select_sparse(shape, summaries, queries, lengths, spec, support);
        cuda::decode_dense(shape, cache, queries, lengths, out, workspace, &support);
      },
      repeats);
  const std::vector<int32_t> counts = support.counts.download();
  const int64_t used = *std::max_element(counts.begin(), counts.end());
  const double summary_bytes = (spec.rule == cuda::BlockRule::Bound ? 2.0 : 1.0) * h.kv_heads *
                               summaries.blocks * h.head_dim * 4;
  const double bytes = 2.0 * h.kv_heads * used * h.head_dim * 2 + summary_bytes;
  return record("sparse_decode", h, 1, n, ms, bytes, 4.0 * h.q_heads * used * h.head_dim, used,
                setting);
}

json sparse_prefill(const Heads& h, int64_t n, int repeats, const cuda::SparseSpec& spec,
                    const std::string& setting) {
  const cuda::AttentionShape shape{1, h.q_heads, h.kv_heads, h.head_dim, n};
  const cuda::DenseCache cache = constant_cache(shape);
  const auto lengths = full_lengths(shape);
  cuda::DeviceArray<uint16_t> queries(h.q_heads * n * h.head_dim);
  queries.fill_bytes(0x3C);
  cuda::DeviceArray<float> out(h.q_heads * n * h.head_dim);
  cuda::BlockSummariesGpu summaries;
  cuda::DeviceArray<int32_t> chosen;
  const double ms = median_ms(
      [&] {
        cuda::summarize_blocks(shape, cache, lengths, cuda::kPrefillBlock, summaries);
        cuda::select_prefill(shape, summaries, cuda::Element::BF16, queries, lengths, spec, chosen);
        cuda::sparse_prefill(shape, cache, queries, lengths, spec, chosen, out);
      },
      repeats);
  // Keys each query reads (at most): anchors + window + its own block + the chosen blocks.
  const int64_t support =
      std::min<int64_t>(n, spec.anchors + spec.window + cuda::kPrefillBlock +
                               spec.top_blocks(cuda::kPrefillBlock) * cuda::kPrefillBlock);
  return record("sparse_prefill", h, 1, n, ms, 0.0, 4.0 * h.q_heads * n * support * h.head_dim,
                support, setting);
}

}  // namespace

int main(int argc, char** argv) try {
  bool quick = false;
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else {
      std::cerr << "usage: bench_cuda_attention [--quick] [--out FILE]\n";
      return 2;
    }
  }
  require(cuda::device_count() > 0, "bench_cuda_attention: no CUDA device");
  std::cerr << "device: " << cuda::device_description() << "\n";
  const int repeats = quick ? 5 : 20;
  const std::vector<int64_t> sizes = quick ? std::vector<int64_t>{1024, 4096}
                                           : std::vector<int64_t>{1024, 4096, 16384, 65536, 131072};
  const std::vector<Heads> shapes{{32, 8, 128}, {9, 3, 64}};
  // Support <= 1024: anchor 1, window 64, 13 blocks of 64 (832 keys) = 897 keys (the query's own
  // block lies inside the window).
  const cuda::SparseSpec wide{1, 64, 832, cuda::BlockRule::Bound};
  const cuda::SparseSpec seed{1, 64, 32, cuda::BlockRule::Bound};
  json records = json::array();
  for (const Heads& h : shapes)
    for (int64_t n : sizes) {
      records.push_back(dense_decode(h, 1, n, repeats));
      records.push_back(int_decode(h, 1, n, repeats, "int2:g64:tok+headq:r8:s4", "int2:g64:tok"));
      records.push_back(sparse_decode(h, n, repeats, wide, "a1 w64 k832 bound"));
      records.push_back(sparse_prefill(h, n, std::max(3, repeats / 4), wide, "a1 w64 k832 bound"));
    }
  // The targets, at 128K (4K with --quick).
  const int64_t n = quick ? 4096 : 131072;
  const Heads big{32, 8, 128};
  records.push_back(dense_decode(big, 16, n, repeats));
  records.push_back(int_decode(big, 16, n, repeats, "int2:g64:tok+headq:r8:s4", "int2:g64:tok"));
  records.push_back(sparse_decode(big, n, repeats, seed, "a1 w64 k32 bound"));
  records.push_back(sparse_prefill(big, n, std::max(3, repeats / 4), seed, "a1 w64 k32 bound"));
  const json report{{"device", cuda::device_description()}, {"records", records}};
  if (out_path.empty()) {
    std::cout << report.dump(1) << "\n";
  } else {
    std::ofstream(out_path) << report.dump(1) << "\n";
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}

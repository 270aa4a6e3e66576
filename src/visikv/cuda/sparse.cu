// Sparse decode on the GPU: block summaries of the cached keys, the Condensate block selection
// (docs/SELECTOR_SPECS.md) and the certified mode. The attention over the chosen support is the
// decode kernel of decode.cu reading a position list.
#include <algorithm>

#include "visikv/cuda/common.cuh"

namespace visikv::cuda {

namespace {

using detail::kMaxGroup;

constexpr int kSelectThreads = 256, kSelectWarps = kSelectThreads / 32;

// One thread per channel: mean (summed in double, as the CPU summaries do), min and max over the
// keys of block blockIdx.x that are stored (positions < length).
template <typename T>
__global__ void summaries_kernel(const T* keys, const int32_t* lengths, int kv_heads, int capacity,
                                 int dim, int block_size, int blocks, float* centroid,
                                 float* minimum, float* maximum) {
  const int block = blockIdx.x, kv_head = blockIdx.y, sequence = blockIdx.z, c = threadIdx.x;
  const int start = block * block_size;
  const int count = min(block_size, lengths[sequence] - start);
  if (count <= 0 || c >= dim) return;
  const int64_t head = static_cast<int64_t>(sequence) * kv_heads + kv_head;
  const T* rows = keys + (head * capacity + start) * dim + c;
  double sum = 0.0;
  float lo = INFINITY, hi = -INFINITY;
  for (int j = 0; j < count; ++j) {
    const float x = static_cast<float>(rows[static_cast<int64_t>(j) * dim]);
    sum += x;
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  const int64_t at = (head * blocks + block) * dim + c;
  centroid[at] = static_cast<float>(sum / count);
  minimum[at] = lo;
  maximum[at] = hi;
}

// The parts of the visible range of the query at position length - 1 (SELECTOR_SPECS.md):
// anchors [0, anchors_end), candidates [anchors_end, tail_begin), tail [tail_begin, length).
struct Region {
  int length, anchors_end, tail_begin, first_block, blocks;  // candidate blocks
  __device__ Region(int n, int anchors, int window, int block_size) : length(n) {
    anchors_end = min(anchors, n);
    const int window_begin = max(0, n - min(window, n));
    const int own_block = (n - 1) / block_size * block_size;
    tail_begin = max(anchors_end, min(window_begin, own_block));
    first_block = anchors_end / block_size;
    blocks = tail_begin > anchors_end ? (tail_begin - 1) / block_size - first_block + 1 : 0;
  }
  // Candidate positions of block b: [begin, end).
  __device__ int begin(int b, int block_size) const { return max(b * block_size, anchors_end); }
  __device__ int end(int b, int block_size) const { return min((b + 1) * block_size, tail_begin); }
};

struct SelectParams {
  int kv_heads, group, dim, capacity, block_size, summary_blocks;
  int padded;  // certified: scratch slots, a power of two >= summary_blocks
  int anchors, window, top_blocks, max_support;
  float scale;
  BlockRule rule;
  const float *queries, *centroid, *minimum, *maximum;
  const int32_t* lengths;
  int32_t *positions, *counts, *chosen;
};

// Writes anchors, the given candidate blocks (ascending, flags[b] != 0 for b < region.blocks),
// then the tail, as the sorted position list of one (sequence, KV head).
__device__ void write_support(const Region& region, const int* flags, int* offsets_s,
                              int block_size, int32_t* positions, int32_t* count) {
  __shared__ int total_s;
  if (threadIdx.x == 0) {
    int at = region.anchors_end;
    for (int b = 0; b < region.blocks; ++b) {
      offsets_s[b] = at;
      if (flags[b]) {
        const int global = region.first_block + b;
        at += region.end(global, block_size) - region.begin(global, block_size);
      }
    }
    total_s = at + region.length - region.tail_begin;
    *count = total_s;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < region.anchors_end; i += blockDim.x) positions[i] = i;
  const int tail_at = total_s - (region.length - region.tail_begin);
  for (int i = threadIdx.x; i < region.length - region.tail_begin; i += blockDim.x)
    positions[tail_at + i] = region.tail_begin + i;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int b = warp; b < region.blocks; b += warps) {
    if (!flags[b]) continue;
    const int global = region.first_block + b;
    const int begin = region.begin(global, block_size), end = region.end(global, block_size);
    for (int j = begin + lane; j < end; j += 32) positions[offsets_s[b] + j - begin] = j;
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectParams p) {
  extern __shared__ float dynamic_s[];
  __shared__ float query_s[kMaxGroup][128];
  __shared__ float value_s[kSelectWarps];
  __shared__ int index_s[kSelectWarps];
  __shared__ int chosen_s[1024];
  const int kv_head = blockIdx.x, sequence = blockIdx.y;
  const int head = sequence * p.kv_heads + kv_head;
  const Region region(p.lengths[sequence], p.anchors, p.window, p.block_size);
  float* pooled_s = dynamic_s;                                          // [region.blocks]
  int* flags_s = reinterpret_cast<int*>(dynamic_s + p.summary_blocks);  // [region.blocks]
  int* offsets_s = flags_s + p.summary_blocks;
  for (int i = threadIdx.x; i < p.group * p.dim; i += blockDim.x)
    query_s[i / p.dim][i % p.dim] = p.queries[(static_cast<int64_t>(head) * p.group) * p.dim + i];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t summary_head = static_cast<int64_t>(head) * p.summary_blocks;
  for (int b = warp; b < region.blocks; b += kSelectWarps) {
    const int64_t at = (summary_head + region.first_block + b) * p.dim;
    const float value =
        detail::pooled_block_value(p.centroid + at, p.minimum + at, p.maximum + at, query_s,
                                   p.group, p.dim, p.scale, p.rule, nullptr);
    if (lane == 0) pooled_s[b] = value;
  }
  for (int b = threadIdx.x; b < region.blocks; b += blockDim.x) flags_s[b] = 0;
  __syncthreads();
  const int want = min(p.top_blocks, region.blocks);
  for (int k = 0; k < want; ++k) {
    const int best = detail::block_argmax(pooled_s, region.blocks, value_s, index_s);
    if (threadIdx.x == 0) {
      flags_s[best] = 1;
      pooled_s[best] = -INFINITY;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0 && p.chosen) {  // ascending block indices, -1 padded
    int at = 0;
    for (int b = 0; b < region.blocks && at < p.top_blocks; ++b)
      if (flags_s[b]) chosen_s[at++] = region.first_block + b;
    for (int i = 0; i < p.top_blocks; ++i)
      p.chosen[static_cast<int64_t>(head) * p.top_blocks + i] = i < at ? chosen_s[i] : -1;
  }
  __syncthreads();
  write_support(region, flags_s, offsets_s, p.block_size,
                p.positions + static_cast<int64_t>(head) * p.max_support, p.counts + head);
}

// Certified: blocks in decreasing pooled bound until δ <= eps for every query head of the group.
template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
    certified_kernel(const SelectParams p, const T* keys, double eps, float* delta) {
  extern __shared__ float dynamic_s[];
  __shared__ float query_s[kMaxGroup][128];
  __shared__ float warp_s[kSelectWarps][kMaxGroup];
  __shared__ float reference_s[kMaxGroup];
  __shared__ double kept_s[kMaxGroup], dropped_s[kMaxGroup];
  __shared__ int step_s;
  const int kv_head = blockIdx.x, sequence = blockIdx.y, group = p.group, dim = p.dim;
  const int head = sequence * p.kv_heads + kv_head;
  const Region region(p.lengths[sequence], p.anchors, p.window, p.block_size);
  const int padded = p.padded;
  float* bound_s = dynamic_s;                                     // [group][padded]
  float* order_value_s = bound_s + group * padded;                // [padded]
  int* order_s = reinterpret_cast<int*>(order_value_s + padded);  // [padded]
  int* flags_s = order_s + padded;                                // [padded]
  int* offsets_s = flags_s + padded;                              // [padded]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < group * dim; i += blockDim.x)
    query_s[i / dim][i % dim] = p.queries[(static_cast<int64_t>(head) * group) * dim + i];
  __syncthreads();
  const int64_t summary_head = static_cast<int64_t>(head) * p.summary_blocks;
  float per_head[kMaxGroup];
  for (int b = warp; b < region.blocks; b += kSelectWarps) {
    const int64_t at = (summary_head + region.first_block + b) * dim;
    const float pooled =
        detail::pooled_block_value(p.centroid + at, p.minimum + at, p.maximum + at, query_s, group,
                                   dim, p.scale, BlockRule::Bound, per_head);
    if (lane == 0) {
      for (int g = 0; g < group; ++g) bound_s[g * padded + b] = per_head[g];
      order_value_s[b] = pooled;
      order_s[b] = b;
    }
  }
  for (int b = region.blocks + threadIdx.x; b < padded; b += blockDim.x) {
    order_value_s[b] = -INFINITY;
    order_s[b] = padded + b;
  }
  for (int b = threadIdx.x; b < padded; b += blockDim.x) flags_s[b] = 0;
  __syncthreads();
  // Bitonic sort: decreasing pooled bound, ties to the lower block.
  for (int size = 2; size <= padded; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int j = i ^ stride;
        if (j <= i) continue;
        const bool descending = (i & size) == 0;
        const float a = order_value_s[i], b = order_value_s[j];
        const int ia = order_s[i], ib = order_s[j];
        const bool a_first = a > b || (a == b && ia < ib);
        if (a_first != descending) {
          order_value_s[i] = b;
          order_value_s[j] = a;
          order_s[i] = ib;
          order_s[j] = ia;
        }
      }
      __syncthreads();
    }
  }
  // Scores of positions [begin, end) for every query head, reduced with op into warp_s; each
  // warp takes positions, its lanes the channels.
  const T* rows = keys + static_cast<int64_t>(head) * p.capacity * dim;
  const auto position_score = [&](int position, int g) {
    float dot = 0.0f;
    for (int c = lane; c < dim; c += 32)
      dot = fmaf(static_cast<float>(rows[static_cast<int64_t>(position) * dim + c]), query_s[g][c],
                 dot);
    return p.scale * detail::warp_sum(dot);
  };
  // The reference m per head: the largest fixed-support score or bound (the ratio δ does not
  // depend on m; this keeps every exponent at most about 0).
  for (int g = 0; g < group; ++g) {
    float best = -INFINITY;
    for (int i = warp; i < region.anchors_end + region.length - region.tail_begin;
         i += kSelectWarps) {
      const int position = i < region.anchors_end ? i : region.tail_begin + i - region.anchors_end;
      best = fmaxf(best, position_score(position, g));
    }
    for (int b = threadIdx.x; b < region.blocks; b += blockDim.x)
      best = fmaxf(best, bound_s[g * padded + b]);
    best = detail::warp_max(best);
    if (lane == 0) warp_s[warp][g] = best;
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float best = -INFINITY;
    for (int w = 0; w < kSelectWarps; ++w) best = fmaxf(best, warp_s[w][threadIdx.x]);
    reference_s[threadIdx.x] = best;
  }
  __syncthreads();
  // Z over anchors and tail; Ẑ over every candidate block.
  for (int g = 0; g < group; ++g) {
    float mass = 0.0f;
    for (int i = warp; i < region.anchors_end + region.length - region.tail_begin;
         i += kSelectWarps) {
      const int position = i < region.anchors_end ? i : region.tail_begin + i - region.anchors_end;
      mass += expf(position_score(position, g) - reference_s[g]);
    }
    if (lane == 0) warp_s[warp][g] = mass;
  }
  __syncthreads();
  if (threadIdx.x < group) {
    const int g = threadIdx.x;
    double kept = 0.0, dropped = 0.0;
    for (int w = 0; w < kSelectWarps; ++w) kept += warp_s[w][g];
    for (int b = 0; b < region.blocks; ++b) {
      const int global = region.first_block + b;
      dropped += static_cast<double>(region.end(global, p.block_size) -
                                     region.begin(global, p.block_size)) *
                 exp(static_cast<double>(bound_s[g * padded + b] - reference_s[g]));
    }
    kept_s[g] = kept;
    dropped_s[g] = dropped;
  }
  if (threadIdx.x == 0) step_s = 0;
  __syncthreads();
  // Add blocks until every head is certified (or every block is read: δ = 0).
  while (true) {
    bool done = step_s >= region.blocks;
    if (!done) {
      done = true;
      for (int g = 0; g < group; ++g)
        if (fmax(dropped_s[g], 0.0) > eps * (kept_s[g] + fmax(dropped_s[g], 0.0))) done = false;
    }
    if (done) break;
    const int b = order_s[step_s], global = region.first_block + b;
    const int begin = region.begin(global, p.block_size), end = region.end(global, p.block_size);
    for (int g = 0; g < group; ++g) {
      float mass = 0.0f;
      for (int position = begin + warp; position < end; position += kSelectWarps)
        mass += expf(position_score(position, g) - reference_s[g]);
      if (lane == 0) warp_s[warp][g] = mass;
    }
    __syncthreads();
    if (threadIdx.x < group) {
      const int g = threadIdx.x;
      for (int w = 0; w < kSelectWarps; ++w) kept_s[g] += warp_s[w][g];
      dropped_s[g] -= static_cast<double>(end - begin) *
                      exp(static_cast<double>(bound_s[g * padded + b] - reference_s[g]));
    }
    if (threadIdx.x == 0) {
      flags_s[b] = 1;
      ++step_s;
    }
    __syncthreads();
  }
  if (threadIdx.x < group) {
    const int g = threadIdx.x;
    const double dropped = step_s >= region.blocks ? 0.0 : fmax(dropped_s[g], 0.0);
    delta[static_cast<int64_t>(head) * group + g] =
        static_cast<float>(dropped / (kept_s[g] + dropped));
  }
  __syncthreads();
  write_support(region, flags_s, offsets_s, p.block_size,
                p.positions + static_cast<int64_t>(head) * p.max_support, p.counts + head);
}

void check_summaries(const AttentionShape& shape, const BlockSummariesGpu& summaries) {
  const size_t size =
      static_cast<size_t>(shape.sequences * shape.kv_heads * summaries.blocks * shape.head_dim);
  require(
      summaries.block_size > 0 &&
          summaries.blocks == (shape.capacity + summaries.block_size - 1) / summaries.block_size &&
          summaries.centroid.size() == size && summaries.min.size() == size &&
          summaries.max.size() == size,
      "GPU sparse attention: the block summaries do not match the shape (run summarize_blocks "
      "for it)");
}

SelectParams select_params(const AttentionShape& shape, const BlockSummariesGpu& summaries,
                           const DeviceArray<float>& queries, const DeviceArray<int32_t>& lengths,
                           int64_t anchors, int64_t window) {
  shape.check();
  check_summaries(shape, summaries);
  require(queries.size() == static_cast<size_t>(shape.sequences * shape.q_heads * shape.head_dim),
          "GPU sparse attention: queries need ", shape.sequences * shape.q_heads * shape.head_dim,
          " floats, got ", queries.size());
  require(lengths.size() == static_cast<size_t>(shape.sequences),
          "GPU sparse attention: ", shape.sequences, " lengths needed, got ", lengths.size());
  require(anchors >= 0 && window >= 0,
          "GPU sparse attention: anchors and window must not be "
          "negative");
  SelectParams p{};
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.group = static_cast<int>(shape.group());
  p.dim = static_cast<int>(shape.head_dim);
  p.capacity = static_cast<int>(shape.capacity);
  p.block_size = static_cast<int>(summaries.block_size);
  p.summary_blocks = static_cast<int>(summaries.blocks);
  p.anchors = static_cast<int>(std::min(anchors, shape.capacity));
  p.window = static_cast<int>(std::min(window, shape.capacity));
  p.scale = shape.score_scale();
  p.queries = queries.data();
  p.centroid = summaries.centroid.data();
  p.minimum = summaries.min.data();
  p.maximum = summaries.max.data();
  p.lengths = lengths.data();
  return p;
}

void prepare_support(const AttentionShape& shape, int64_t max_support, Support& support) {
  support.max_support = std::max<int64_t>(1, std::min(max_support, shape.capacity));
  const size_t heads = static_cast<size_t>(shape.sequences * shape.kv_heads);
  support.positions.ensure(heads * support.max_support);
  if (support.positions.size() != heads * support.max_support)
    support.positions = DeviceArray<int32_t>(heads * support.max_support);
  support.counts.ensure(heads);
}

void allow_shared_memory(const void* kernel, size_t bytes) {
  int device = 0, limit = 0;
  VISIKV_CUDA_CHECK(cudaGetDevice(&device));
  VISIKV_CUDA_CHECK(
      cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  require(bytes <= static_cast<size_t>(limit), "GPU sparse attention: ", bytes,
          " bytes of shared memory needed, the device allows ", limit,
          " (fewer blocks: a larger block size or a shorter capacity)");
  VISIKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
}

}  // namespace

void summarize_blocks(const AttentionShape& shape, const DenseCache& cache,
                      const DeviceArray<int32_t>& lengths, int64_t block_size,
                      BlockSummariesGpu& summaries) {
  shape.check();
  require(block_size > 0, "GPU block summaries: block size must be positive, got ", block_size);
  require(lengths.size() == static_cast<size_t>(shape.sequences),
          "GPU block summaries: ", shape.sequences, " lengths needed, got ", lengths.size());
  require(cache.keys.size() == static_cast<size_t>(shape.sequences * shape.kv_heads *
                                                   shape.capacity * shape.head_dim),
          "GPU block summaries: the key cache does not match the shape");
  summaries.block_size = block_size;
  summaries.blocks = (shape.capacity + block_size - 1) / block_size;
  const size_t size =
      static_cast<size_t>(shape.sequences * shape.kv_heads * summaries.blocks * shape.head_dim);
  for (DeviceArray<float>* array : {&summaries.centroid, &summaries.min, &summaries.max})
    if (array->size() != size) *array = DeviceArray<float>(size);
  const dim3 grid(static_cast<unsigned>(summaries.blocks), static_cast<unsigned>(shape.kv_heads),
                  static_cast<unsigned>(shape.sequences));
  const auto args = [&](auto* keys) {
    summaries_kernel<<<grid, static_cast<unsigned>(shape.head_dim)>>>(
        keys, lengths.data(), static_cast<int>(shape.kv_heads), static_cast<int>(shape.capacity),
        static_cast<int>(shape.head_dim), static_cast<int>(block_size),
        static_cast<int>(summaries.blocks), summaries.centroid.data(), summaries.min.data(),
        summaries.max.data());
  };
  if (cache.element == Element::BF16)
    args(reinterpret_cast<const __nv_bfloat16*>(cache.keys.data()));
  else
    args(reinterpret_cast<const __half*>(cache.keys.data()));
  VISIKV_CUDA_LAUNCHED("summaries_kernel");
}

void select_sparse(const AttentionShape& shape, const BlockSummariesGpu& summaries,
                   const DeviceArray<float>& queries, const DeviceArray<int32_t>& lengths,
                   const SparseSpec& spec, Support& support, DeviceArray<int32_t>* chosen) {
  SelectParams p = select_params(shape, summaries, queries, lengths, spec.anchors, spec.window);
  require(spec.top_k > 0, "GPU sparse attention: top_k must be positive, got ", spec.top_k);
  const int64_t top_blocks = std::min(spec.top_blocks(summaries.block_size), summaries.blocks);
  require(top_blocks <= 1024, "GPU sparse attention: at most 1024 chosen blocks, got ", top_blocks);
  p.top_blocks = static_cast<int>(top_blocks);
  p.rule = spec.rule;
  prepare_support(shape,
                  p.anchors + std::max<int64_t>(p.window, summaries.block_size) +
                      top_blocks * summaries.block_size,
                  support);
  p.max_support = static_cast<int>(support.max_support);
  p.positions = support.positions.data();
  p.counts = support.counts.data();
  if (chosen) {
    const size_t size = static_cast<size_t>(shape.sequences * shape.kv_heads * top_blocks);
    if (chosen->size() != size) *chosen = DeviceArray<int32_t>(size);
    p.chosen = chosen->data();
  }
  const size_t shared = static_cast<size_t>(summaries.blocks) * 3 * 4;
  allow_shared_memory(reinterpret_cast<const void*>(select_kernel), shared);
  select_kernel<<<dim3(static_cast<unsigned>(shape.kv_heads),
                       static_cast<unsigned>(shape.sequences)),
                  kSelectThreads, shared>>>(p);
  VISIKV_CUDA_LAUNCHED("select_kernel");
}

void select_certified(const AttentionShape& shape, const DenseCache& cache,
                      const BlockSummariesGpu& summaries, const DeviceArray<float>& queries,
                      const DeviceArray<int32_t>& lengths, int64_t anchors, int64_t window,
                      double eps, Support& support, DeviceArray<float>& delta) {
  SelectParams p = select_params(shape, summaries, queries, lengths, anchors, window);
  require(eps > 0 && eps < 1, "GPU certified attention: eps must be in (0, 1), got ", eps);
  require(cache.keys.size() == static_cast<size_t>(shape.sequences * shape.kv_heads *
                                                   shape.capacity * shape.head_dim),
          "GPU certified attention: the key cache does not match the shape");
  // The sort runs over a power of two of slots.
  int64_t padded = 1;
  while (padded < summaries.blocks) padded *= 2;
  p.padded = static_cast<int>(padded);
  prepare_support(shape, shape.capacity, support);
  p.max_support = static_cast<int>(support.max_support);
  p.positions = support.positions.data();
  p.counts = support.counts.data();
  const size_t delta_size = static_cast<size_t>(shape.sequences * shape.q_heads);
  if (delta.size() != delta_size) delta = DeviceArray<float>(delta_size);
  const size_t shared = static_cast<size_t>(padded) * (shape.group() + 4) * 4;
  const dim3 grid(static_cast<unsigned>(shape.kv_heads), static_cast<unsigned>(shape.sequences));
  if (cache.element == Element::BF16) {
    allow_shared_memory(reinterpret_cast<const void*>(&certified_kernel<__nv_bfloat16>), shared);
    certified_kernel<__nv_bfloat16><<<grid, kSelectThreads, shared>>>(
        p, reinterpret_cast<const __nv_bfloat16*>(cache.keys.data()), eps, delta.data());
  } else {
    allow_shared_memory(reinterpret_cast<const void*>(&certified_kernel<__half>), shared);
    certified_kernel<__half><<<grid, kSelectThreads, shared>>>(
        p, reinterpret_cast<const __half*>(cache.keys.data()), eps, delta.data());
  }
  VISIKV_CUDA_LAUNCHED("certified_kernel");
}

}  // namespace visikv::cuda

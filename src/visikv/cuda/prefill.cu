// Sparse causal prefill on tensor cores. Each block of threads takes 64 queries of one query head
// and reads key tiles of 64 positions: the anchor tiles, the tiles of the window, its own tile
// and the tiles chosen for its query block. S = Q Kᵀ and O += P V run as 16x16x16 WMMA products
// (bf16 or fp16 in, float32 accumulate); the softmax is the online (flash) form with P rounded to
// the input precision for the second product. Masks are per element, so the support of query i
// is exactly the one attention.h describes.
#include <mma.h>

#include <algorithm>

#include "visikv/cuda/common.cuh"

namespace visikv::cuda {

namespace {

using detail::kMaxGroup;
using namespace nvcuda;

constexpr int kBlock = static_cast<int>(kPrefillBlock);
constexpr int kThreads = 128, kWarps = 4, kMaxTiles = 128;

struct PrefillParams {
  int q_heads, kv_heads, group, capacity, query_blocks, summary_blocks, top_blocks;
  int anchors, window, dim;
  float scale;
  BlockRule rule;
  const int32_t* lengths;
  const int32_t* chosen;  // {sequences, kv_heads, query_blocks, top_blocks}
  const float *centroid, *minimum, *maximum;
  float* out;
};

// Rows [first, first + 64) of a {capacity, kDim} matrix into shared memory; rows at or past
// `length` are zero.
template <typename T, int kDim>
__device__ void load_tile(T* tile, const T* rows, int first, int length) {
  constexpr int kChunks = kDim / 8;
  for (int i = threadIdx.x; i < kBlock * kChunks; i += blockDim.x) {
    const int r = i / kChunks, c = i % kChunks * 8;
    uint4 chunk = make_uint4(0, 0, 0, 0);
    if (first + r < length)
      chunk =
          __ldg(reinterpret_cast<const uint4*>(rows + static_cast<int64_t>(first + r) * kDim + c));
    *reinterpret_cast<uint4*>(tile + r * kDim + c) = chunk;
  }
}

template <int kDim>
constexpr size_t prefill_shared_bytes() {
  constexpr int kScratch = kDim > kBlock ? kDim : kBlock;
  return 3 * kBlock * kDim * 2 + kWarps * 16 * kBlock * 2 + kWarps * 16 * kScratch * 4 +
         kBlock * kDim * 4 + 3 * kBlock * 4 + 2 * kMaxTiles * 4;
}

template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads)
    prefill_kernel(const PrefillParams p, const T* queries, const T* keys, const T* values) {
  constexpr int kScratch = kDim > kBlock ? kDim : kBlock;
  extern __shared__ __align__(128) unsigned char shared[];
  T* query_s = reinterpret_cast<T*>(shared);  // [64][kDim]
  T* key_s = query_s + kBlock * kDim;         // [64][kDim]
  T* value_s = key_s + kBlock * kDim;         // [64][kDim]
  T* weight_s = value_s + kBlock * kDim;      // [warps][16][64]
  float* scratch_s =
      reinterpret_cast<float*>(weight_s + kWarps * 16 * kBlock);  // [warps][16][kScratch]
  float* out_s = scratch_s + kWarps * 16 * kScratch;              // [64][kDim]
  float* max_s = out_s + kBlock * kDim;                           // [64]
  float* sum_s = max_s + kBlock;                                  // [64]
  float* alpha_s = sum_s + kBlock;                                // [64]
  int* tiles_s = reinterpret_cast<int*>(alpha_s + kBlock);        // [kMaxTiles]
  int* chosen_s = tiles_s + kMaxTiles;                            // [kMaxTiles]
  __shared__ int tile_count_s;

  const int query_block = blockIdx.x, q_head = blockIdx.y, sequence = blockIdx.z;
  const int kv_head = q_head / p.group, length = p.lengths[sequence];
  const int row0 = query_block * kBlock;
  if (row0 >= length) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* query_rows =
      queries + (static_cast<int64_t>(sequence) * p.q_heads + q_head) * p.capacity * kDim;
  const int64_t kv_offset =
      (static_cast<int64_t>(sequence) * p.kv_heads + kv_head) * p.capacity * kDim;
  load_tile<T, kDim>(query_s, query_rows, row0, length);
  for (int i = threadIdx.x; i < kBlock * kDim; i += blockDim.x) out_s[i] = 0.0f;
  if (threadIdx.x < kBlock) {
    max_s[threadIdx.x] = -INFINITY;
    sum_s[threadIdx.x] = 0.0f;
  }
  if (threadIdx.x == 0) {  // the tiles to read, each once; chosen_s marks the chosen ones
    int count = 0;
    const auto add = [&](int tile, int chosen) {
      for (int i = 0; i < count; ++i)
        if (tiles_s[i] == tile) {
          chosen_s[i] |= chosen;
          return;
        }
      if (count < kMaxTiles) {
        tiles_s[count] = tile;
        chosen_s[count++] = chosen;
      }
    };
    for (int tile = 0; tile * kBlock < p.anchors && tile <= query_block; ++tile) add(tile, 0);
    const int32_t* mine =
        p.chosen +
        ((static_cast<int64_t>(sequence) * p.kv_heads + kv_head) * p.query_blocks + query_block) *
            p.top_blocks;
    for (int i = 0; i < p.top_blocks; ++i)
      if (mine[i] >= 0) add(mine[i], 1);
    const int first_window = p.window > 0 ? max(0, row0 - p.window + 1) / kBlock : query_block;
    for (int tile = first_window; tile <= query_block; ++tile) add(tile, 0);
    tile_count_s = count;
  }
  __syncthreads();

  float* scores = scratch_s + warp * 16 * kScratch;
  T* weights = weight_s + warp * 16 * kBlock;
  const int local_row = warp * 16 + lane / 2, half = lane % 2;
  const int i = row0 + local_row;  // this lane's query position
  for (int t = 0; t < tile_count_s; ++t) {
    const int tile = tiles_s[t];
    const bool chosen = chosen_s[t] != 0;
    load_tile<T, kDim>(key_s, keys + kv_offset, tile * kBlock, length);
    load_tile<T, kDim>(value_s, values + kv_offset, tile * kBlock, length);
    __syncthreads();
    // S = Q Kᵀ for this warp's 16 queries and the tile's 64 keys.
    for (int n = 0; n < kBlock / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int k = 0; k < kDim / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, query_s + warp * 16 * kDim + k * 16, kDim);
        wmma::load_matrix_sync(b, key_s + n * 16 * kDim + k * 16, kDim);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(scores + n * 16, acc, kScratch, wmma::mem_row_major);
    }
    __syncwarp();
    // Masked online softmax: two lanes per query row, 32 keys each.
    float row_scores[32];
    float tile_max = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < 32; ++jj) {
      const int column = half * 32 + jj, j = tile * kBlock + column;
      const bool allowed = i < length && j <= i &&
                           (j < p.anchors || j > i - p.window || tile == query_block || chosen);
      row_scores[jj] = allowed ? scores[(lane / 2) * kScratch + column] * p.scale : -INFINITY;
      tile_max = fmaxf(tile_max, row_scores[jj]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(detail::kFullMask, tile_max, 1));
    const float old_max = max_s[local_row], new_max = fmaxf(old_max, tile_max);
    float row_sum = 0.0f;
#pragma unroll
    for (int jj = 0; jj < 32; ++jj) {
      const T weight = detail::DeviceElement<T>::from(
          new_max == -INFINITY ? 0.0f : expf(row_scores[jj] - new_max));
      row_sum += static_cast<float>(weight);  // the rounded weight, as P V sees it
      weights[(lane / 2) * kBlock + half * 32 + jj] = weight;
    }
    row_sum += __shfl_xor_sync(detail::kFullMask, row_sum, 1);
    const float alpha = new_max == -INFINITY ? 1.0f : expf(old_max - new_max);
    __syncwarp();
    if (half == 0) {
      max_s[local_row] = new_max;
      sum_s[local_row] = sum_s[local_row] * alpha + row_sum;
      alpha_s[local_row] = alpha;
    }
    __syncwarp();
    // P V into the scratch (S is consumed), then O = alpha O + P V.
    for (int n = 0; n < kDim / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int k = 0; k < kBlock / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, weights + k * 16, kBlock);
        wmma::load_matrix_sync(b, value_s + k * 16 * kDim + n * 16, kDim);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(scores + n * 16, acc, kScratch, wmma::mem_row_major);
    }
    __syncwarp();
    for (int index = lane; index < 16 * kDim; index += 32) {
      const int r = index / kDim, c = index % kDim, row = warp * 16 + r;
      out_s[row * kDim + c] = fmaf(out_s[row * kDim + c], alpha_s[row], scores[r * kScratch + c]);
    }
    __syncthreads();  // the next tile overwrites keys and values
  }
  float* out = p.out + (static_cast<int64_t>(sequence) * p.q_heads + q_head) * p.capacity * kDim;
  for (int index = threadIdx.x; index < kBlock * kDim; index += blockDim.x) {
    const int r = index / kDim, c = index % kDim;
    if (row0 + r >= length) break;
    const float sum = sum_s[r];
    out[static_cast<int64_t>(row0 + r) * kDim + c] = sum > 0.0f ? out_s[index] / sum : 0.0f;
  }
}

// The chosen key blocks of one (query block, KV head, sequence): candidates are the blocks
// wholly before the window of the block's first query and not wholly anchors, ranked by the
// rule for the block's mean query (pooled over the KV head's query heads).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    select_prefill_kernel(const PrefillParams p, const T* queries, int32_t* chosen) {
  extern __shared__ float pooled_s[];  // [summary_blocks], then flags
  __shared__ float query_s[kMaxGroup][128];
  __shared__ float value_s[kWarps];
  __shared__ int index_s[kWarps];
  const int query_block = blockIdx.x, kv_head = blockIdx.y, sequence = blockIdx.z;
  const int length = p.lengths[sequence], row0 = query_block * kBlock, dim = p.dim;
  const int64_t head = static_cast<int64_t>(sequence) * p.kv_heads + kv_head;
  int32_t* mine = chosen + (head * p.query_blocks + query_block) * p.top_blocks;
  int* flags_s = reinterpret_cast<int*>(pooled_s + p.summary_blocks);
  const int first = p.anchors / kBlock;
  const int end = row0 >= length ? 0 : max(0, row0 - p.window + 1) / kBlock;
  const int candidates = max(0, end - first);
  if (candidates == 0) {
    for (int k = threadIdx.x; k < p.top_blocks; k += blockDim.x) mine[k] = -1;
    return;
  }
  const int rows = min(kBlock, length - row0);
  for (int index = threadIdx.x; index < p.group * dim; index += blockDim.x) {
    const int g = index / dim, c = index % dim;
    const T* column =
        queries +
        ((static_cast<int64_t>(sequence) * p.q_heads + kv_head * p.group + g) * p.capacity + row0) *
            dim +
        c;
    float sum = 0.0f;
    for (int r = 0; r < rows; ++r) sum += static_cast<float>(column[static_cast<int64_t>(r) * dim]);
    query_s[g][c] = sum / rows;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < candidates; b += kWarps) {
    const int64_t at = (head * p.summary_blocks + first + b) * dim;
    const float value = detail::pooled_block_value(p.centroid + at, p.minimum + at, p.maximum + at,
                                                   query_s, p.group, dim, p.scale, p.rule, nullptr);
    if (lane == 0) pooled_s[b] = value;
  }
  for (int b = threadIdx.x; b < candidates; b += blockDim.x) flags_s[b] = 0;
  __syncthreads();
  const int want = min(p.top_blocks, candidates);
  for (int k = 0; k < want; ++k) {
    const int best = detail::block_argmax(pooled_s, candidates, value_s, index_s);
    if (threadIdx.x == 0) {
      flags_s[best] = 1;
      pooled_s[best] = -INFINITY;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int at = 0;
    for (int b = 0; b < candidates; ++b)
      if (flags_s[b]) mine[at++] = first + b;
    for (; at < p.top_blocks; ++at) mine[at] = -1;
  }
}

PrefillParams prefill_params(const AttentionShape& shape, const DeviceArray<uint16_t>& queries,
                             const DeviceArray<int32_t>& lengths, const SparseSpec& spec) {
  shape.check();
  require(queries.size() == static_cast<size_t>(shape.sequences * shape.q_heads * shape.capacity *
                                                shape.head_dim),
          "GPU sparse prefill: queries need {sequences, q_heads, capacity, head_dim} elements");
  require(lengths.size() == static_cast<size_t>(shape.sequences),
          "GPU sparse prefill: ", shape.sequences, " lengths needed, got ", lengths.size());
  require(spec.anchors >= 0 && spec.window >= 0 && spec.top_k > 0,
          "GPU sparse prefill: anchors and window must not be negative and top_k must be "
          "positive");
  PrefillParams p{};
  p.q_heads = static_cast<int>(shape.q_heads);
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.group = static_cast<int>(shape.group());
  p.capacity = static_cast<int>(shape.capacity);
  p.query_blocks = static_cast<int>((shape.capacity + kBlock - 1) / kBlock);
  p.summary_blocks = p.query_blocks;
  p.top_blocks = static_cast<int>(spec.top_blocks(kBlock));
  p.anchors = static_cast<int>(std::min(spec.anchors, shape.capacity));
  p.window = static_cast<int>(std::min(spec.window, shape.capacity));
  p.dim = static_cast<int>(shape.head_dim);
  p.scale = shape.score_scale();
  p.rule = spec.rule;
  p.lengths = lengths.data();
  const int64_t tiles =
      (p.anchors + kBlock - 1) / kBlock + p.top_blocks + (p.window + kBlock - 1) / kBlock + 2;
  require(tiles <= kMaxTiles, "GPU sparse prefill: ", tiles, " key tiles per query block; at most ",
          kMaxTiles, " (fewer anchors, a shorter window or a smaller top_k)");
  return p;
}

void allow_shared(const void* kernel, size_t bytes) {
  VISIKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes)));
}

}  // namespace

void select_prefill(const AttentionShape& shape, const BlockSummariesGpu& summaries,
                    Element element, const DeviceArray<uint16_t>& queries,
                    const DeviceArray<int32_t>& lengths, const SparseSpec& spec,
                    DeviceArray<int32_t>& chosen) {
  PrefillParams p = prefill_params(shape, queries, lengths, spec);
  require(summaries.block_size == kBlock && summaries.blocks == p.query_blocks,
          "GPU sparse prefill: needs block summaries of block size ", kBlock, " for this shape");
  p.centroid = summaries.centroid.data();
  p.minimum = summaries.min.data();
  p.maximum = summaries.max.data();
  const size_t size =
      static_cast<size_t>(shape.sequences * shape.kv_heads * p.query_blocks * p.top_blocks);
  if (chosen.size() != size) chosen = DeviceArray<int32_t>(size);
  const dim3 grid(static_cast<unsigned>(p.query_blocks), static_cast<unsigned>(shape.kv_heads),
                  static_cast<unsigned>(shape.sequences));
  const size_t shared = static_cast<size_t>(p.summary_blocks) * 8;
  if (element == Element::BF16) {
    allow_shared(reinterpret_cast<const void*>(select_prefill_kernel<__nv_bfloat16>), shared);
    select_prefill_kernel<<<grid, kThreads, shared>>>(
        p, reinterpret_cast<const __nv_bfloat16*>(queries.data()), chosen.data());
  } else {
    allow_shared(reinterpret_cast<const void*>(select_prefill_kernel<__half>), shared);
    select_prefill_kernel<<<grid, kThreads, shared>>>(
        p, reinterpret_cast<const __half*>(queries.data()), chosen.data());
  }
  VISIKV_CUDA_LAUNCHED("select_prefill_kernel");
}

void sparse_prefill(const AttentionShape& shape, const DenseCache& cache,
                    const DeviceArray<uint16_t>& queries, const DeviceArray<int32_t>& lengths,
                    const SparseSpec& spec, const DeviceArray<int32_t>& chosen,
                    DeviceArray<float>& out) {
  PrefillParams p = prefill_params(shape, queries, lengths, spec);
  const size_t size =
      static_cast<size_t>(shape.sequences * shape.q_heads * shape.capacity * shape.head_dim);
  require(out.size() == size, "GPU sparse prefill: out needs ", size, " floats, got ", out.size());
  require(cache.keys.size() == static_cast<size_t>(shape.sequences * shape.kv_heads *
                                                   shape.capacity * shape.head_dim) &&
              cache.values.size() == cache.keys.size(),
          "GPU sparse prefill: the cache does not match the shape");
  require(chosen.size() ==
              static_cast<size_t>(shape.sequences * shape.kv_heads * p.query_blocks * p.top_blocks),
          "GPU sparse prefill: the chosen blocks do not match (run select_prefill with this spec)");
  p.chosen = chosen.data();
  p.out = out.data();
  const dim3 grid(static_cast<unsigned>(p.query_blocks), static_cast<unsigned>(shape.q_heads),
                  static_cast<unsigned>(shape.sequences));
  const auto launch = [&](auto kernel, size_t shared, const auto* element) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(element)>>;
    allow_shared(reinterpret_cast<const void*>(kernel), shared);
    kernel<<<grid, kThreads, shared>>>(p, reinterpret_cast<const T*>(queries.data()),
                                       reinterpret_cast<const T*>(cache.keys.data()),
                                       reinterpret_cast<const T*>(cache.values.data()));
  };
  const bool bf16 = cache.element == Element::BF16;
  if (shape.head_dim == 64) {
    if (bf16)
      launch(prefill_kernel<__nv_bfloat16, 64>, prefill_shared_bytes<64>(),
             static_cast<const __nv_bfloat16*>(nullptr));
    else
      launch(prefill_kernel<__half, 64>, prefill_shared_bytes<64>(),
             static_cast<const __half*>(nullptr));
  } else {
    if (bf16)
      launch(prefill_kernel<__nv_bfloat16, 128>, prefill_shared_bytes<128>(),
             static_cast<const __nv_bfloat16*>(nullptr));
    else
      launch(prefill_kernel<__half, 128>, prefill_shared_bytes<128>(),
             static_cast<const __half*>(nullptr));
  }
  VISIKV_CUDA_LAUNCHED("prefill_kernel");
}

}  // namespace visikv::cuda

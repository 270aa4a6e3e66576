// Decode attention (one query per head) over a dense or integer cache, split-K: each block of
// threads handles one (split, KV head, sequence), scores up to kTile keys at a time for all the
// query heads of the KV head (each key is read once per group), keeps a running max and sum per
// query head, and writes an unnormalised partial output; a combine kernel merges the splits.
#include <algorithm>

#include "visikv/cuda/common.cuh"

namespace visikv::cuda {

namespace {

using detail::kMaxGroup;

constexpr int kThreads = 128, kWarps = kThreads / 32, kTile = 256;

struct DecodeParams {
  int kv_heads, group, capacity, splits, tiles_per_split;
  float scale;
  const float* queries;      // {sequences, q_heads, d}
  const int32_t* lengths;    // {sequences}
  const int32_t* positions;  // null, or {sequences, kv_heads, max_support}
  const int32_t* counts;     // {sequences, kv_heads} with positions
  int max_support;
  float *partial_out, *partial_max, *partial_sum;  // {sequences, q_heads, splits, (d)}
  // HeadQ side code (side_rank == 0: none).
  const uint8_t* side_codes;
  const uint16_t* side_params;
  const float* basis;  // {kv_heads, side_rank, d}
  int side_rank, side_bits;
  float side_sign;
};

// Rows of a dense cache: row r holds elements [r·d, (r+1)·d).
template <typename T>
struct DenseRows {
  const T* data;
  __device__ __forceinline__ void load8(int64_t row, int c0, int dim, float (&x)[8]) const {
    detail::load8(data + row * dim + c0, x);
  }
};

// Rows of an integer cache (int_layout.h): codes of b bits, 8 per b bytes, and per group an
// interleaved fp16 (scale, zero); decoded exactly as the CPU stores do, fma(code, scale, zero).
struct IntRows {
  const uint8_t* codes;
  const uint16_t* params;
  int bits, row_bytes, groups, group;
  __device__ __forceinline__ void load8(int64_t row, int c0, int dim, float (&x)[8]) const {
    const uint8_t* at = codes + row * row_bytes + (c0 / 8) * bits;
    const uint32_t word = bits == 4 ? __ldg(reinterpret_cast<const uint32_t*>(at))
                                    : uint32_t{__ldg(reinterpret_cast<const uint16_t*>(at))};
    const uint32_t pair =
        __ldg(reinterpret_cast<const uint32_t*>(params + (row * groups + c0 / group) * 2));
    const float scale = __half2float(__ushort_as_half(static_cast<uint16_t>(pair & 0xffffu)));
    const float zero = __half2float(__ushort_as_half(static_cast<uint16_t>(pair >> 16)));
    const uint32_t mask = (1u << bits) - 1;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      x[i] = __fmaf_rn(static_cast<float>((word >> (bits * i)) & mask), scale, zero);
  }
};

template <typename Rows, int kDim>
__global__ void __launch_bounds__(kThreads)
    decode_split_kernel(const DecodeParams p, const Rows keys, const Rows values) {
  constexpr int kLanesPerRow = kDim / 8, kRowsPerWarp = 32 / kLanesPerRow;
  constexpr int kRowsPerPass = kWarps * kRowsPerWarp;
  __shared__ float query_s[kMaxGroup][kDim];
  __shared__ float projected_s[kMaxGroup][kDim / 8];
  __shared__ float weight_s[kMaxGroup][kTile];
  __shared__ float max_s[kMaxGroup], sum_s[kMaxGroup], alpha_s[kMaxGroup];
  __shared__ float reduce_s[kWarps][kMaxGroup][kDim];

  const int split = blockIdx.x, kv_head = blockIdx.y, sequence = blockIdx.z;
  const int group = p.group, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int head = sequence * p.kv_heads + kv_head;
  const int length = p.positions ? p.counts[head] : p.lengths[sequence];
  const int begin = split * p.tiles_per_split * kTile;
  const int end = min(length, begin + p.tiles_per_split * kTile);
  const int64_t first_query =
      static_cast<int64_t>(sequence) * p.kv_heads * group + static_cast<int64_t>(kv_head) * group;
  if (begin >= end) {  // nothing here: the combine skips a split with max -inf
    if (tid < group) {
      p.partial_max[(first_query + tid) * p.splits + split] = -INFINITY;
      p.partial_sum[(first_query + tid) * p.splits + split] = 0.0f;
    }
    return;
  }

  for (int i = tid; i < group * kDim; i += kThreads)
    query_s[i / kDim][i % kDim] = p.queries[first_query * kDim + i];
  if (tid < kMaxGroup) {
    max_s[tid] = -INFINITY;
    sum_s[tid] = 0.0f;
  }
  __syncthreads();
  if (p.side_rank > 0 && tid < group * p.side_rank) {  // sign · U_rᵀ q, once per block
    const int g = tid / p.side_rank, j = tid % p.side_rank;
    const float* row = p.basis + (static_cast<int64_t>(kv_head) * p.side_rank + j) * kDim;
    float dot = 0.0f;
    for (int c = 0; c < kDim; ++c) dot = fmaf(row[c], query_s[g][c], dot);
    projected_s[g][j] = p.side_sign * dot;
  }
  __syncthreads();

  const int sub = lane % kLanesPerRow, slot = warp * kRowsPerWarp + lane / kLanesPerRow;
  const int64_t head_row = static_cast<int64_t>(head) * p.capacity;
  const int32_t* positions =
      p.positions ? p.positions + static_cast<int64_t>(head) * p.max_support : nullptr;
  float acc[kMaxGroup][8];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;

  for (int tile = begin; tile < end; tile += kTile) {
    const int tile_length = min(kTile, end - tile);
    // Scores: kLanesPerRow lanes per key, 8 channels each; the pass bound is uniform so every
    // lane reaches the shuffles.
    for (int pass = 0; pass < tile_length; pass += kRowsPerPass) {
      const int r = pass + slot;
      const bool valid = r < tile_length;
      float k[8] = {};
      float side = 0.0f;
      int64_t row = 0;
      if (valid) {
        row = head_row + (positions ? positions[tile + r] : tile + r);
        keys.load8(row, sub * 8, kDim, k);
        if (p.side_rank > 0 && sub < p.side_rank) {
          const int bit = sub * p.side_bits;
          const uint8_t byte = p.side_codes[row * (p.side_rank * p.side_bits / 8) + (bit >> 3)];
          const uint32_t code = (byte >> (bit & 7)) & ((1u << p.side_bits) - 1);
          side = __fmaf_rn(static_cast<float>(code),
                           __half2float(__ushort_as_half(p.side_params[2 * row])),
                           __half2float(__ushort_as_half(p.side_params[2 * row + 1])));
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) break;
        float partial = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) partial = fmaf(k[i], query_s[g][sub * 8 + i], partial);
        if (p.side_rank > 0 && sub < p.side_rank)
          partial = fmaf(projected_s[g][sub], side, partial);
        partial = detail::segment_sum<kLanesPerRow>(partial);
        if (valid && sub == 0) weight_s[g][r] = partial * p.scale;
      }
    }
    __syncthreads();
    // Running softmax per query head: one warp per head.
    for (int g = warp; g < group; g += kWarps) {
      float tile_max = -INFINITY;
      for (int i = lane; i < tile_length; i += 32) tile_max = fmaxf(tile_max, weight_s[g][i]);
      tile_max = detail::warp_max(tile_max);
      const float old_max = max_s[g], new_max = fmaxf(old_max, tile_max);
      float sum = 0.0f;
      for (int i = lane; i < tile_length; i += 32) {
        const float e = expf(weight_s[g][i] - new_max);
        weight_s[g][i] = e;
        sum += e;
      }
      sum = detail::warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const float alpha = expf(old_max - new_max);  // 0 on the first tile
        sum_s[g] = sum_s[g] * alpha + sum;
        max_s[g] = new_max;
        alpha_s[g] = alpha;
      }
    }
    __syncthreads();
    // Values: the same key-to-lane map; acc holds 8 channels per query head.
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) break;
      const float alpha = alpha_s[g];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
    }
    for (int pass = 0; pass < tile_length; pass += kRowsPerPass) {
      const int r = pass + slot;
      if (r >= tile_length) break;
      float v[8];
      values.load8(head_row + (positions ? positions[tile + r] : tile + r), sub * 8, kDim, v);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) break;
        const float w = weight_s[g][r];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(w, v[i], acc[g][i]);
      }
    }
    __syncthreads();  // weight_s is rewritten by the next tile
  }

  // Sum the row slots of each warp (lanes with equal `sub`), then the warps.
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g >= group) break;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float x = acc[g][i];
#pragma unroll
      for (int offset = kLanesPerRow; offset < 32; offset *= 2)
        x += __shfl_xor_sync(detail::kFullMask, x, offset);
      if (lane < kLanesPerRow) reduce_s[warp][g][sub * 8 + i] = x;
    }
  }
  __syncthreads();
  for (int i = tid; i < group * kDim; i += kThreads) {
    const int g = i / kDim, c = i % kDim;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += reduce_s[w][g][c];
    p.partial_out[((first_query + g) * p.splits + split) * kDim + c] = total;
  }
  if (tid < group) {
    p.partial_max[(first_query + tid) * p.splits + split] = max_s[tid];
    p.partial_sum[(first_query + tid) * p.splits + split] = sum_s[tid];
  }
}

// out[q] = Σ_s e^{m_s - M} o_s / Σ_s e^{m_s - M} l_s over the splits of query head q.
__global__ void combine_kernel(const float* partial_out, const float* partial_max,
                               const float* partial_sum, int splits, int dim, float* out) {
  const int64_t query = blockIdx.x;
  const float* maxes = partial_max + query * splits;
  const float* sums = partial_sum + query * splits;
  float top = -INFINITY;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, maxes[s]);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float numerator = 0.0f, denominator = 0.0f;
    for (int s = 0; s < splits; ++s) {
      if (maxes[s] == -INFINITY) continue;
      const float w = expf(maxes[s] - top);
      numerator = fmaf(w, partial_out[(query * splits + s) * dim + c], numerator);
      denominator = fmaf(w, sums[s], denominator);
    }
    out[query * dim + c] = denominator > 0.0f ? numerator / denominator : 0.0f;
  }
}

void check_decode_inputs(const AttentionShape& shape, const DeviceArray<float>& queries,
                         const DeviceArray<int32_t>& lengths, const DeviceArray<float>& out,
                         const Support* support) {
  shape.check();
  const size_t query_size = static_cast<size_t>(shape.sequences * shape.q_heads * shape.head_dim);
  require(queries.size() == query_size && out.size() == query_size, "GPU decode: queries and out ",
          "need ", query_size, " floats, got ", queries.size(), " and ", out.size());
  require(lengths.size() == static_cast<size_t>(shape.sequences), "GPU decode: ", shape.sequences,
          " lengths needed, got ", lengths.size());
  if (support) {
    const size_t heads = static_cast<size_t>(shape.sequences * shape.kv_heads);
    require(support->max_support > 0 && support->counts.size() == heads &&
                support->positions.size() == heads * support->max_support,
            "GPU decode: the support does not match ", shape.sequences, " x ", shape.kv_heads,
            " KV heads");
  }
}

template <typename Rows>
void launch_decode(const AttentionShape& shape, const Rows& keys, const Rows& values,
                   DecodeParams p, const DeviceArray<float>& queries,
                   const DeviceArray<int32_t>& lengths, DeviceArray<float>& out,
                   Workspace& workspace, const Support* support) {
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.group = static_cast<int>(shape.group());
  p.capacity = static_cast<int>(shape.capacity);
  p.scale = shape.score_scale();
  p.queries = queries.data();
  p.lengths = lengths.data();
  p.positions = support ? support->positions.data() : nullptr;
  p.counts = support ? support->counts.data() : nullptr;
  p.max_support = support ? static_cast<int>(support->max_support) : 0;
  // Enough splits for about four blocks per multiprocessor, each at least one tile.
  const int64_t extent = support ? support->max_support : shape.capacity;
  const int64_t tiles = (extent + kTile - 1) / kTile;
  const int64_t heads = shape.sequences * shape.kv_heads;
  const int64_t wanted = std::max<int64_t>(1, 4 * detail::multiprocessors() / heads);
  p.tiles_per_split = static_cast<int>((tiles + wanted - 1) / wanted);
  p.splits = static_cast<int>((tiles + p.tiles_per_split - 1) / p.tiles_per_split);
  const size_t partials = static_cast<size_t>(shape.sequences * shape.q_heads * p.splits);
  workspace.partial_out.ensure(partials * shape.head_dim);
  workspace.partial_max.ensure(partials);
  workspace.partial_sum.ensure(partials);
  p.partial_out = workspace.partial_out.data();
  p.partial_max = workspace.partial_max.data();
  p.partial_sum = workspace.partial_sum.data();
  const dim3 grid(p.splits, static_cast<unsigned>(shape.kv_heads),
                  static_cast<unsigned>(shape.sequences));
  if (shape.head_dim == 64)
    decode_split_kernel<Rows, 64><<<grid, kThreads>>>(p, keys, values);
  else
    decode_split_kernel<Rows, 128><<<grid, kThreads>>>(p, keys, values);
  VISIKV_CUDA_LAUNCHED("decode_split_kernel");
  combine_kernel<<<static_cast<unsigned>(shape.sequences * shape.q_heads), 128>>>(
      p.partial_out, p.partial_max, p.partial_sum, p.splits, static_cast<int>(shape.head_dim),
      out.data());
  VISIKV_CUDA_LAUNCHED("combine_kernel");
}

}  // namespace

void decode_dense(const AttentionShape& shape, const DenseCache& cache,
                  const DeviceArray<float>& queries, const DeviceArray<int32_t>& lengths,
                  DeviceArray<float>& out, Workspace& workspace, const Support* support) {
  check_decode_inputs(shape, queries, lengths, out, support);
  const size_t cache_size =
      static_cast<size_t>(shape.sequences * shape.kv_heads * shape.capacity * shape.head_dim);
  require(cache.keys.size() == cache_size && cache.values.size() == cache_size,
          "GPU decode: the dense cache needs ", cache_size, " elements per side, got ",
          cache.keys.size(), " and ", cache.values.size());
  DecodeParams p{};
  if (cache.element == Element::BF16) {
    const auto* k = reinterpret_cast<const __nv_bfloat16*>(cache.keys.data());
    const auto* v = reinterpret_cast<const __nv_bfloat16*>(cache.values.data());
    launch_decode(shape, DenseRows<__nv_bfloat16>{k}, DenseRows<__nv_bfloat16>{v}, p, queries,
                  lengths, out, workspace, support);
  } else {
    const auto* k = reinterpret_cast<const __half*>(cache.keys.data());
    const auto* v = reinterpret_cast<const __half*>(cache.values.data());
    launch_decode(shape, DenseRows<__half>{k}, DenseRows<__half>{v}, p, queries, lengths, out,
                  workspace, support);
  }
}

void decode_int(const AttentionShape& shape, const IntCache& cache,
                const DeviceArray<float>& queries, const DeviceArray<int32_t>& lengths,
                DeviceArray<float>& out, Workspace& workspace, const Support* support) {
  check_decode_inputs(shape, queries, lengths, out, support);
  const IntLayout& layout = cache.layout;
  require(layout.head_dim == shape.head_dim, "GPU decode: the integer cache has head_dim ",
          layout.head_dim, ", the shape ", shape.head_dim);
  const size_t rows = static_cast<size_t>(shape.sequences * shape.kv_heads * shape.capacity);
  require(cache.key_codes.size() == rows * layout.key_row_bytes() &&
              cache.value_codes.size() == rows * layout.value_row_bytes() &&
              cache.side_codes.size() == rows * layout.side_row_bytes() &&
              cache.basis.size() ==
                  static_cast<size_t>(shape.kv_heads * layout.side_rank * layout.head_dim),
          "GPU decode: the integer cache does not hold ", rows, " rows of ", shape.sequences, " x ",
          shape.kv_heads, " x ", shape.capacity);
  DecodeParams p{};
  p.side_codes = cache.side_codes.data();
  p.side_params = cache.side_params.data();
  p.basis = cache.basis.data();
  p.side_rank = static_cast<int>(layout.side_rank);
  p.side_bits = layout.side_bits;
  p.side_sign = layout.side_sign;
  const IntRows keys{cache.key_codes.data(),
                     cache.key_params.data(),
                     layout.key_bits,
                     static_cast<int>(layout.key_row_bytes()),
                     static_cast<int>(layout.key_groups()),
                     static_cast<int>(layout.key_group)};
  const IntRows values{cache.value_codes.data(),
                       cache.value_params.data(),
                       layout.value_bits,
                       static_cast<int>(layout.value_row_bytes()),
                       static_cast<int>(layout.value_groups()),
                       static_cast<int>(layout.value_group)};
  launch_decode(shape, keys, values, p, queries, lengths, out, workspace, support);
}

}  // namespace visikv::cuda

// Shared by the .cu files: error checks and small device helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "visikv/core/error.h"
#include "visikv/cuda/attention.h"

namespace visikv::cuda::detail {

inline void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    fail("CUDA error in ", call, ": ", cudaGetErrorString(status), " (", cudaGetErrorName(status),
         ")");
}
#define VISIKV_CUDA_CHECK(call) ::visikv::cuda::detail::check((call), #call)
// After a launch: configuration errors surface here, execution errors at the next sync.
#define VISIKV_CUDA_LAUNCHED(kernel) ::visikv::cuda::detail::check(cudaGetLastError(), kernel)

int multiprocessors();  // of the current device, cached

constexpr int kMaxGroup = 8;  // query heads per KV head the kernels hold in registers
constexpr unsigned kFullMask = 0xffffffffu;

template <int kWidth>
__device__ __forceinline__ float segment_sum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}
__device__ __forceinline__ float warp_sum(float x) { return segment_sum<32>(x); }
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

template <typename T>
struct DeviceElement;
template <>
struct DeviceElement<__nv_bfloat16> {
  __device__ static float2 pair(uint32_t bits) {
    __nv_bfloat162 v;
    memcpy(&v, &bits, 4);
    return __bfloat1622float2(v);
  }
  __device__ static float one(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16(x); }
};
template <>
struct DeviceElement<__half> {
  __device__ static float2 pair(uint32_t bits) {
    __half2 v;
    memcpy(&v, &bits, 4);
    return __half22float2(v);
  }
  __device__ static float one(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static __half from(float x) { return __float2half(x); }
};

// Eight consecutive elements (16-byte aligned) widened to float.
template <typename T>
__device__ __forceinline__ void load8(const T* at, float (&x)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(at));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = DeviceElement<T>::pair(words[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// Quest-style bound (kernel form of attention/block_bounds.h: block_upper_bound, slack
// included): partial sums over the channels this lane holds; the caller reduces both.
struct BoundParts {
  float sum = 0.0f, magnitude = 0.0f;
  __device__ void add(float q, float lo, float hi) {
    sum += fmaxf(q * lo, q * hi);
    magnitude += fabsf(q) * fmaxf(fabsf(lo), fabsf(hi));
  }
  __device__ static float finish(float sum, float magnitude, int dim, float scale) {
    return scale * (sum + static_cast<float>(2 * dim + 4) * 0x1.0p-24f * magnitude);
  }
};

// The pooled ranking value of one block for the query heads in query_s (one warp).
__device__ inline float pooled_block_value(const float* centroid, const float* lo, const float* hi,
                                           const float (*query_s)[128], int group, int dim,
                                           float scale, BlockRule rule, float* per_head) {
  const int lane = threadIdx.x % 32;
  float pooled = -INFINITY;
  for (int g = 0; g < group; ++g) {
    float value;
    if (rule == BlockRule::Centroid) {
      float dot = 0.0f;
      for (int c = lane; c < dim; c += 32) dot = fmaf(centroid[c], query_s[g][c], dot);
      value = scale * warp_sum(dot);
    } else {
      BoundParts parts;
      for (int c = lane; c < dim; c += 32) parts.add(query_s[g][c], lo[c], hi[c]);
      value = BoundParts::finish(warp_sum(parts.sum), warp_sum(parts.magnitude), dim, scale);
    }
    if (per_head) per_head[g] = value;
    pooled = fmaxf(pooled, value);
  }
  return pooled;
}

// Block-wide argmax of values[0, count) (ties: lower index); returns -1 when all are -inf.
__device__ inline int block_argmax(const float* values, int count, float* value_s, int* index_s) {
  float best = -INFINITY;
  int best_index = -1;
  for (int i = threadIdx.x; i < count; i += blockDim.x)
    if (values[i] > best) {
      best = values[i];
      best_index = i;
    }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullMask, best, offset);
    const int other_index = __shfl_xor_sync(kFullMask, best_index, offset);
    if (other > best ||
        (other == best && other_index >= 0 && (best_index < 0 || other_index < best_index))) {
      best = other;
      best_index = other_index;
    }
  }
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
    value_s[warp] = best;
    index_s[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < warps; ++w)
      if (value_s[w] > value_s[0] || (value_s[w] == value_s[0] && index_s[w] >= 0 &&
                                      (index_s[0] < 0 || index_s[w] < index_s[0]))) {
        value_s[0] = value_s[w];
        index_s[0] = index_s[w];
      }
  }
  __syncthreads();
  const int result = index_s[0];
  __syncthreads();
  return result;
}

}  // namespace visikv::cuda::detail

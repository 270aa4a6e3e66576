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

// Quest-style bound (kernel form of attention/sparse_attention.h: block_upper_bound, slack
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

}  // namespace visikv::cuda::detail

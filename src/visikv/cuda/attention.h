// CUDA attention kernels (docs/CUDA.md): dense and integer-cache decode (split-K, flash-decoding
// style), sparse decode over anchors + window + selected blocks (and the certified mode), and
// sparse causal prefill on tensor cores. Plain C++: includers need no CUDA headers; the library
// target visikv_cuda links the CUDA runtime.
//
// Shapes (all row-major, on the device):
//   dense cache keys / values  {sequences, kv_heads, capacity, head_dim}  bf16 or fp16 bits
//   decode queries / outputs   {sequences, q_heads, head_dim}             float32
//   prefill queries            {sequences, q_heads, capacity, head_dim}   bf16 or fp16 bits
//   prefill outputs            {sequences, q_heads, capacity, head_dim}   float32
//   lengths                    {sequences}                                int32, 1..capacity
// Query head h reads KV head h / (q_heads / kv_heads) (GQA); a group has at most 8 query heads.
// head_dim is 64 or 128. Scores are scale · q·k with scale = 1/sqrt(head_dim) unless given;
// every sum is accumulated in float32. Decode is for the query at position length - 1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/cuda/int_layout.h"

namespace visikv::cuda {

// Devices the runtime sees; 0 when there is no device or no driver (never throws).
int device_count();
// "NVIDIA H200 (sm_90, 132 SMs, 140 GiB)" for the current device.
std::string device_description();
// Waits for all queued work; throws visikv::Error naming the failed call on a CUDA error.
void synchronize();

// Device memory owned by the object (cudaMalloc / cudaFree). Errors are visikv::Error with the
// CUDA error string and the call.
class DeviceBytes {
 public:
  DeviceBytes() = default;
  explicit DeviceBytes(size_t bytes);
  void* data() const { return memory_.get(); }
  size_t size() const { return size_; }
  void upload(const void* host, size_t bytes);
  void download(void* host, size_t bytes) const;
  void fill(uint8_t byte);

 private:
  struct Free {
    void operator()(void* memory) const noexcept;
  };
  std::unique_ptr<void, Free> memory_;
  size_t size_ = 0;
};

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) : bytes_(count * sizeof(T)), count_(count) {}
  explicit DeviceArray(std::span<const T> host) : DeviceArray(host.size()) { upload(host); }

  size_t size() const { return count_; }
  T* data() { return static_cast<T*>(bytes_.data()); }
  const T* data() const { return static_cast<const T*>(bytes_.data()); }
  void upload(std::span<const T> host) {
    require(host.size() == count_, "device upload: ", host.size(), " elements into an array of ",
            count_);
    if (count_ > 0) bytes_.upload(host.data(), host.size_bytes());
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    if (count_ > 0) bytes_.download(host.data(), count_ * sizeof(T));
    return host;
  }
  // All bytes 0xFF: NaN for float32, bf16 and fp16, -1 for integers.
  void poison() { fill_bytes(0xFF); }
  // Every byte set to `byte` (timing runs: 0x3C makes fp16 1.06 and bf16 0.0115).
  void fill_bytes(uint8_t byte) {
    if (count_ > 0) bytes_.fill(byte);
  }
  // Reallocates (contents lost) when smaller than `count`.
  void ensure(size_t count) {
    if (count_ < count) *this = DeviceArray(count);
  }

 private:
  DeviceBytes bytes_;
  size_t count_ = 0;
};

enum class Element { BF16, F16 };

struct AttentionShape {
  int64_t sequences = 1, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t capacity = 0;  // token slots per (sequence, KV head)
  float scale = 0.0f;    // 0: 1/sqrt(head_dim)

  int64_t group() const { return q_heads / kv_heads; }
  float score_scale() const;
  // Throws visikv::Error naming the problem unless the kernels can run this shape.
  void check() const;
};

struct DenseCache {
  Element element = Element::BF16;
  DeviceArray<uint16_t> keys, values;  // {sequences, kv_heads, capacity, head_dim}
};

// An integer cache in the layout of int_layout.h, on the device.
struct IntCache {
  IntLayout layout;
  DeviceArray<uint8_t> key_codes, side_codes, value_codes;
  DeviceArray<uint16_t> key_params, side_params, value_params;
  DeviceArray<float> basis;
  static IntCache upload(const IntCacheHost& host);
};

// The positions each (sequence, KV head) reads: positions[(s * kv_heads + h) * max_support + i]
// for i < counts[s * kv_heads + h], sorted ascending.
struct Support {
  int64_t max_support = 0;
  DeviceArray<int32_t> positions, counts;
};

// Split-K buffers, grown on demand and reused across calls.
struct Workspace {
  DeviceArray<float> partial_out, partial_max, partial_sum;
};

// out = softmax(scale · q Kᵀ) V over positions [0, length) of each sequence, or over `support`.
void decode_dense(const AttentionShape& shape, const DenseCache& cache,
                  const DeviceArray<float>& queries, const DeviceArray<int32_t>& lengths,
                  DeviceArray<float>& out, Workspace& workspace, const Support* support = nullptr);
// The same over an integer cache; scores read q·k̂ + sign · (U_rᵀ q)·ĉ when the layout has a
// HeadQ side code.
void decode_int(const AttentionShape& shape, const IntCache& cache,
                const DeviceArray<float>& queries, const DeviceArray<int32_t>& lengths,
                DeviceArray<float>& out, Workspace& workspace, const Support* support = nullptr);

// Per block of `block_size` positions of each (sequence, KV head): the mean key and the
// per-channel min and max of the keys stored so far ({sequences, kv_heads, blocks, head_dim},
// blocks = ceil(capacity / block_size)).
struct BlockSummariesGpu {
  int64_t block_size = 0, blocks = 0;
  DeviceArray<float> centroid, min, max;
};
void summarize_blocks(const AttentionShape& shape, const DenseCache& cache,
                      const DeviceArray<int32_t>& lengths, int64_t block_size,
                      BlockSummariesGpu& summaries);

enum class BlockRule { Centroid, Bound };

// The Condensate support of docs/SELECTOR_SPECS.md for the query at position length - 1:
// anchors, the tail (window and own block), and the ceil(top_k / B) candidate blocks with the
// highest centroid score or bound, pooled by the max over the KV head's query heads.
struct SparseSpec {
  int64_t anchors = 0, window = 0, top_k = 0;
  BlockRule rule = BlockRule::Bound;
  int64_t top_blocks(int64_t block_size) const { return (top_k + block_size - 1) / block_size; }
};
// Fills `support`; chosen (optional) gets the chosen block indices per (sequence, KV head),
// {sequences, kv_heads, top_blocks}, ascending, -1 where fewer exist.
void select_sparse(const AttentionShape& shape, const BlockSummariesGpu& summaries,
                   const DeviceArray<float>& queries, const DeviceArray<int32_t>& lengths,
                   const SparseSpec& spec, Support& support,
                   DeviceArray<int32_t>* chosen = nullptr);

// Certified mode: anchors + tail, then blocks in decreasing pooled bound until every query head
// of the KV head has δ = Ẑ / (Z_S + Ẑ) <= eps; delta gets δ per query head {sequences, q_heads}.
void select_certified(const AttentionShape& shape, const DenseCache& cache,
                      const BlockSummariesGpu& summaries, const DeviceArray<float>& queries,
                      const DeviceArray<int32_t>& lengths, int64_t anchors, int64_t window,
                      double eps, Support& support, DeviceArray<float>& delta);

// Sparse causal prefill with blocks of 64 positions (the summaries' block size must be 64).
// Query i of query block Q = floor(i / 64) reads key j <= i when j < anchors, i - j < window,
// floor(j / 64) == Q, or key block floor(j / 64) is among Q's chosen blocks: the top
// ceil(top_k / 64) blocks wholly before the window of Q's first query and not wholly anchors,
// ranked by the rule applied to the mean query of Q (pooled over the KV head's query heads).
constexpr int64_t kPrefillBlock = 64;
// chosen: {sequences, kv_heads, query blocks, top_blocks}, ascending, -1 padded.
void select_prefill(const AttentionShape& shape, const BlockSummariesGpu& summaries,
                    Element element, const DeviceArray<uint16_t>& queries,
                    const DeviceArray<int32_t>& lengths, const SparseSpec& spec,
                    DeviceArray<int32_t>& chosen);
void sparse_prefill(const AttentionShape& shape, const DenseCache& cache,
                    const DeviceArray<uint16_t>& queries, const DeviceArray<int32_t>& lengths,
                    const SparseSpec& spec, const DeviceArray<int32_t>& chosen,
                    DeviceArray<float>& out);

}  // namespace visikv::cuda

// Device memory, device queries and the shape checks shared by every kernel entry point.
#include <cmath>

#include "visikv/cuda/common.cuh"

namespace visikv::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" status
    return 0;
  }
  return count;
}

std::string device_description() {
  int device = 0;
  VISIKV_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp properties{};
  VISIKV_CUDA_CHECK(cudaGetDeviceProperties(&properties, device));
  return str_cat(properties.name, " (sm_", properties.major, properties.minor, ", ",
                 properties.multiProcessorCount, " SMs, ",
                 properties.totalGlobalMem / (1024 * 1024 * 1024), " GiB)");
}

void synchronize() { VISIKV_CUDA_CHECK(cudaDeviceSynchronize()); }

namespace detail {
int multiprocessors() {
  static const int count = [] {
    int device = 0, value = 0;
    VISIKV_CUDA_CHECK(cudaGetDevice(&device));
    VISIKV_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
    return value;
  }();
  return count;
}
}  // namespace detail

DeviceBytes::DeviceBytes(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  void* memory = nullptr;
  VISIKV_CUDA_CHECK(cudaMalloc(&memory, bytes));
  memory_.reset(memory);
}

void DeviceBytes::Free::operator()(void* memory) const noexcept { cudaFree(memory); }

void DeviceBytes::upload(const void* host, size_t bytes) {
  require(bytes <= size_, "device upload of ", bytes, " bytes into ", size_);
  VISIKV_CUDA_CHECK(cudaMemcpy(memory_.get(), host, bytes, cudaMemcpyHostToDevice));
}

void DeviceBytes::download(void* host, size_t bytes) const {
  require(bytes <= size_, "device download of ", bytes, " bytes from ", size_);
  VISIKV_CUDA_CHECK(cudaMemcpy(host, memory_.get(), bytes, cudaMemcpyDeviceToHost));
}

void DeviceBytes::fill(uint8_t byte) { VISIKV_CUDA_CHECK(cudaMemset(memory_.get(), byte, size_)); }

float AttentionShape::score_scale() const {
  return scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

void AttentionShape::check() const {
  require(sequences > 0 && q_heads > 0 && kv_heads > 0 && capacity > 0,
          "GPU attention: sequences, heads and capacity must be positive (", sequences, ", ",
          q_heads, ", ", kv_heads, ", ", capacity, ")");
  require(q_heads % kv_heads == 0 && q_heads / kv_heads <= detail::kMaxGroup,
          "GPU attention: ", q_heads, " query heads over ", kv_heads,
          " KV heads: need a whole group of at most ", detail::kMaxGroup);
  require(head_dim == 64 || head_dim == 128, "GPU attention: head_dim ", head_dim,
          " is not supported (64 or 128)");
  require(capacity <= (int64_t{1} << 30), "GPU attention: capacity ", capacity, " too large");
}

IntCache IntCache::upload(const IntCacheHost& host) {
  IntCache cache;
  cache.layout = host.layout();
  cache.key_codes = DeviceArray<uint8_t>(std::span<const uint8_t>(host.key_codes));
  cache.side_codes = DeviceArray<uint8_t>(std::span<const uint8_t>(host.side_codes));
  cache.value_codes = DeviceArray<uint8_t>(std::span<const uint8_t>(host.value_codes));
  cache.key_params = DeviceArray<uint16_t>(std::span<const uint16_t>(host.key_params));
  cache.side_params = DeviceArray<uint16_t>(std::span<const uint16_t>(host.side_params));
  cache.value_params = DeviceArray<uint16_t>(std::span<const uint16_t>(host.value_params));
  cache.basis = DeviceArray<float>(std::span<const float>(host.basis));
  return cache;
}

}  // namespace visikv::cuda

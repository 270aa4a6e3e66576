// An allocator for std::vector whose storage starts on a cache line (64 bytes), so that kernels
// may read rows of a buffer with aligned vector loads, none of them split over two lines.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace visikv {

inline constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheAlignedAllocator {
  using value_type = T;
  CacheAlignedAllocator() = default;
  template <typename U>
  CacheAlignedAllocator(const CacheAlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{kCacheLine}));
  }
  void deallocate(T* p, std::size_t) noexcept {
    ::operator delete (p, std::align_val_t{kCacheLine});
  }
  template <typename U>
  bool operator==(const CacheAlignedAllocator<U>&) const noexcept {
    return true;
  }
};

// Float scratch of the forward pass.
using AlignedFloats = std::vector<float, CacheAlignedAllocator<float>>;

}  // namespace visikv

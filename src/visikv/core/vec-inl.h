// Per-target vector helpers shared by the files that Highway compiles once per instruction set
// (core/vec.cpp, kv/row_kernels.cpp): reading half and bfloat16 rows as float lanes, and the
// transposed reduction that sums many rows' accumulators at once. Included after
// <hwy/foreach_target.h>, once per target (Highway's -inl.h convention, hence the toggle guard).
#if defined(VISIKV_CORE_VEC_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef VISIKV_CORE_VEC_INL_H_
#undef VISIKV_CORE_VEC_INL_H_
#else
#define VISIKV_CORE_VEC_INL_H_
#endif

#include <hwy/highway.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

HWY_BEFORE_NAMESPACE();
namespace visikv::vec {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Floats in the target's widest vector: the size of per-lane scratch blocks.
constexpr size_t kMaxFloatLanes = HWY_MAX_BYTES / sizeof(float);

// a · b + c in every lane, rounded once. Highway's MulAdd is a fused instruction on the SIMD
// targets, but on the portable ones (SCALAR, EMU128) a multiply and an add that the compiler
// may or may not contract, depending on the code around it; std::fma pins the bits there.
template <class D>
HWY_INLINE hn::Vec<D> Fma(D d, hn::Vec<D> a, hn::Vec<D> b, hn::Vec<D> c) {
#if HWY_TARGET == HWY_SCALAR || HWY_TARGET == HWY_EMU128
  HWY_ALIGN float x[kMaxFloatLanes], y[kMaxFloatLanes], z[kMaxFloatLanes];
  hn::Store(a, d, x);
  hn::Store(b, d, y);
  hn::Store(c, d, z);
  for (size_t k = 0; k < hn::Lanes(d); ++k) x[k] = std::fma(x[k], y[k], z[k]);
  return hn::Load(d, x);
#else
  return hn::MulAdd(a, b, c);
#endif
}

// Lanes(d) half numbers from p, widened to float (exactly).
template <class D>
HWY_INLINE hn::Vec<D> LoadHalfs(D d, const uint16_t* p) {
  const hn::Rebind<hwy::float16_t, D> dh;
  return hn::PromoteTo(d, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p)));
}

// Lanes(d) bfloat16 numbers from p, widened to float (exactly: the 16 bits become the high half).
template <class D>
HWY_INLINE hn::Vec<D> LoadBf16s(D d, const uint16_t* p) {
  const hn::Rebind<uint16_t, D> d16;
  const hn::RebindToUnsigned<D> d32;
  return hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(d32, hn::LoadU(d16, p))));
}

// Lanes(d) stored elements from p as floats: float32 rows, or half / bfloat16 ones.
template <class D>
HWY_INLINE hn::Vec<D> LoadRow(D d, const float* p) {
  return hn::LoadU(d, p);
}
template <class D>
HWY_INLINE hn::Vec<D> LoadRow(D d, const uint16_t* p, bool bf16) {
  return bf16 ? LoadBf16s(d, p) : LoadHalfs(d, p);
}

// v[0 .. Lanes(d)) are the accumulators of as many rows; on return lane k of the result is the
// sum of v[k]'s lanes. The order of additions in lane k depends only on v[k] (a fixed tree), so
// a row's sum is the same whichever lane and block it falls in. v is overwritten.
template <class D>
HWY_INLINE hn::Vec<D> TransposedSums(D d, hn::Vec<D>* v) {
#if HWY_TARGET == HWY_SCALAR
  (void)d;
  return v[0];
#elif HWY_TARGET == HWY_AVX2
  if constexpr (std::is_same_v<decltype(v[0].raw), __m256>) {
    // hadd within 128-bit halves, then the halves joined: lane k is
    // ((0+1)+(2+3)) + ((4+5)+(6+7)) of v[k].
    const __m256 p01 = _mm256_hadd_ps(v[0].raw, v[1].raw), p23 = _mm256_hadd_ps(v[2].raw, v[3].raw);
    const __m256 p45 = _mm256_hadd_ps(v[4].raw, v[5].raw), p67 = _mm256_hadd_ps(v[6].raw, v[7].raw);
    const __m256 q0123 = _mm256_hadd_ps(p01, p23), q4567 = _mm256_hadd_ps(p45, p67);
    return hn::Vec<D>{_mm256_add_ps(_mm256_permute2f128_ps(q0123, q4567, 0x20),
                                    _mm256_permute2f128_ps(q0123, q4567, 0x31))};
  }
#endif
#if HWY_TARGET != HWY_SCALAR
  // Pairwise sums: [a0+a1, a2+a3, .., b0+b1, ..]. After level l, vector i holds the sums of
  // 2^l-lane runs of rows i·2^l .. (i+1)·2^l - 1, row by row. The lane count is a constant of
  // the target, so the tree unrolls.
  constexpr size_t kLanes = hn::MaxLanes(D());
  for (size_t count = kLanes; count > 1; count /= 2)
    for (size_t i = 0; i < count / 2; ++i)
      v[i] = hn::Add(hn::ConcatEven(d, v[2 * i + 1], v[2 * i]),
                     hn::ConcatOdd(d, v[2 * i + 1], v[2 * i]));
  return v[0];
#endif
}

}  // namespace HWY_NAMESPACE
}  // namespace visikv::vec
HWY_AFTER_NAMESPACE();

#endif  // VISIKV_CORE_VEC_INL_H_

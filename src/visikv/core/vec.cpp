// The row functions of vec.h, compiled once per instruction set by Highway's foreach_target (as
// the weight kernels are) and chosen at run time by HWY_DYNAMIC_DISPATCH.
//
// exp is Highway's polynomial (contrib/math: at most a few ulp from the correctly rounded value
// over the range used here), which is elementwise the same computation on every target with fused
// multiply-adds; sums over a row are taken in vector lanes and then across them, so their bits
// depend on the target's vector width (as the weight products' do), not on the caller.
#include "visikv/core/simd_targets.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "visikv/core/vec.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// Highway's own headers must follow foreach_target.h.
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numbers>

#include "visikv/core/half.h"
#include "visikv/core/vec-inl.h"
#include "visikv/core/vec.h"

HWY_BEFORE_NAMESPACE();
namespace visikv::vec {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// exp(x) with NaN kept (Highway's Exp maps NaN to 0) and large arguments saturating to infinity
// (its range reduction is only valid up to about 104).
HWY_INLINE VF ExpChecked(DF d, VF x) {
  const VF y = hn::Exp(d, hn::Min(x, hn::Set(d, 88.5f)));
  const VF big = hn::IfThenElse(hn::Gt(x, hn::Set(d, 88.5f)),
                                hn::Set(d, std::numeric_limits<float>::infinity()), y);
  return hn::IfThenElse(hn::IsNaN(x), x, big);
}

// The last n < Lanes(d) values of a row as one vector (the other lanes zero), and back.
struct Tail {
  HWY_ALIGN float lanes[kMaxFloatLanes] = {};
};
HWY_INLINE VF LoadTail(DF d, const float* p, size_t n, Tail& tail) {
  std::copy_n(p, n, tail.lanes);
  return hn::Load(d, tail.lanes);
}
HWY_INLINE void StoreTail(DF d, VF v, float* p, size_t n, Tail& tail) {
  hn::Store(v, d, tail.lanes);
  std::copy_n(tail.lanes, n, p);
}

// Σ w[i] x[i] with two vector accumulators over whole vectors, the rest one at a time; `load`
// reads Lanes(d) elements of w as floats, `at` one.
template <typename W, typename Load, typename At>
HWY_INLINE float DotWith(const W* w, const float* x, int64_t n, const Load& load, const At& at) {
  const DF d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  VF acc0 = hn::Zero(d), acc1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 = Fma(d, load(d, w + i), hn::LoadU(d, x + i), acc0);
    acc1 = Fma(d, load(d, w + i + lanes), hn::LoadU(d, x + i + lanes), acc1);
  }
  for (; i + lanes <= n; i += lanes) acc0 = Fma(d, load(d, w + i), hn::LoadU(d, x + i), acc0);
  float sum = hn::GetLane(hn::SumOfLanes(d, hn::Add(acc0, acc1)));
  for (; i < n; ++i) sum += at(w[i]) * x[i];
  return sum;
}

float Dot(const float* w, const float* x, int64_t n) {
  return DotWith(
      w, x, n, [](DF d, const float* p) HWY_ATTR { return hn::LoadU(d, p); },
      [](float v) { return v; });
}

float DotHalf(const uint16_t* w, bool bf16, const float* x, int64_t n) {
  if (bf16)
    return DotWith(
        w, x, n, [](DF d, const uint16_t* p) HWY_ATTR { return LoadBf16s(d, p); },
        [](uint16_t v) { return bf16_to_float(v); });
  return DotWith(
      w, x, n, [](DF d, const uint16_t* p) HWY_ATTR { return LoadHalfs(d, p); },
      [](uint16_t v) { return fp16_to_float(v); });
}

template <typename X, typename Load, typename At>
HWY_INLINE void AxpyWith(float a, const X* x, float* y, int64_t n, const Load& load, const At& at) {
  const DF d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const VF av = hn::Set(d, a);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes)
    hn::StoreU(Fma(d, av, load(d, x + i), hn::LoadU(d, y + i)), d, y + i);
  for (; i < n; ++i) y[i] = std::fma(a, at(x[i]), y[i]);
}

void Axpy(float a, const float* x, float* y, int64_t n) {
  AxpyWith(
      a, x, y, n, [](DF d, const float* p) HWY_ATTR { return hn::LoadU(d, p); },
      [](float v) { return v; });
}

void AxpyHalf(float a, const uint16_t* x, bool bf16, float* y, int64_t n) {
  if (bf16)
    return AxpyWith(
        a, x, y, n, [](DF d, const uint16_t* p) HWY_ATTR { return LoadBf16s(d, p); },
        [](uint16_t v) { return bf16_to_float(v); });
  AxpyWith(
      a, x, y, n, [](DF d, const uint16_t* p) HWY_ATTR { return LoadHalfs(d, p); },
      [](uint16_t v) { return fp16_to_float(v); });
}

BoxSums BoxSumsOf(const float* q, const float* lo, const float* hi, int64_t n) {
  const DF d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  VF total = hn::Zero(d), magnitude = hn::Zero(d);
  int64_t c = 0;
  for (; c + lanes <= n; c += lanes) {
    const VF qv = hn::LoadU(d, q + c);
    const VF a = hn::Mul(qv, hn::LoadU(d, lo + c)), b = hn::Mul(qv, hn::LoadU(d, hi + c));
    total = hn::Add(total, hn::Max(a, b));
    magnitude = hn::Add(magnitude, hn::Max(hn::Abs(a), hn::Abs(b)));
  }
  BoxSums sums{hn::GetLane(hn::SumOfLanes(d, total)), hn::GetLane(hn::SumOfLanes(d, magnitude))};
  for (; c < n; ++c) {
    const float a = q[c] * lo[c], b = q[c] * hi[c];
    sums.total += std::max(a, b);
    sums.magnitude += std::max(std::abs(a), std::abs(b));
  }
  return sums;
}

float MaxValue(const float* values, size_t n) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  float max = -std::numeric_limits<float>::infinity();
  size_t i = 0;
  if (n >= lanes) {
    VF m = hn::LoadU(d, values);
    VF nan = hn::Zero(d);  // all bits set in a lane that saw a NaN
    for (; i + lanes <= n; i += lanes) {
      const VF v = hn::LoadU(d, values + i);
      nan = hn::Or(nan, hn::VecFromMask(d, hn::IsNaN(v)));
      m = hn::Max(m, v);
    }
    if (!hn::AllFalse(d, hn::MaskFromVec(nan))) return std::numeric_limits<float>::quiet_NaN();
    max = hn::GetLane(hn::MaxOfLanes(d, m));
  }
  for (; i < n; ++i) {
    if (std::isnan(values[i])) return std::numeric_limits<float>::quiet_NaN();
    max = std::max(max, values[i]);
  }
  return max;
}

float ExpShifted(float* values, size_t n, float shift) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const VF s = hn::Set(d, shift);
  VF sum = hn::Zero(d);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const VF e = ExpChecked(d, hn::Sub(hn::LoadU(d, values + i), s));
    hn::StoreU(e, d, values + i);
    sum = hn::Add(sum, e);
  }
  if (i < n) {  // the tail as one partial vector, computed as the full ones are
    const size_t rest = n - i;
    Tail tail;
    const VF e = ExpChecked(d, hn::Sub(LoadTail(d, values + i, rest, tail), s));
    StoreTail(d, e, values + i, rest, tail);
    sum = hn::Add(sum, hn::IfThenElseZero(hn::FirstN(d, rest), e));
  }
  return hn::GetLane(hn::SumOfLanes(d, sum));
}

double SumExpShifted(const float* values, size_t n, float shift) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const VF s = hn::Set(d, shift);
#if HWY_TARGET == HWY_SCALAR
  const hn::Rebind<double, DF> dd;
  auto sum = hn::Zero(dd);
  const auto add = [&](VF e) HWY_ATTR { sum = hn::Add(sum, hn::PromoteTo(dd, e)); };
#else
  const hn::Half<DF> dh;
  const hn::Repartition<double, DF> dd;
  auto sum = hn::Zero(dd);
  const auto add = [&](VF e) HWY_ATTR {
    sum = hn::Add(sum, hn::PromoteTo(dd, hn::LowerHalf(dh, e)));
    sum = hn::Add(sum, hn::PromoteTo(dd, hn::UpperHalf(dh, e)));
  };
#endif
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) add(ExpChecked(d, hn::Sub(hn::LoadU(d, values + i), s)));
  if (i < n) {
    const size_t rest = n - i;
    Tail tail;
    add(hn::IfThenElseZero(hn::FirstN(d, rest),
                           ExpChecked(d, hn::Sub(LoadTail(d, values + i, rest, tail), s))));
  }
  return hn::GetLane(hn::SumOfLanes(dd, sum));
}

void Silu(float* values, size_t n) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const VF one = hn::Set(d, 1.0f);
  const auto silu = [&](VF v)
                        HWY_ATTR { return hn::Div(v, hn::Add(one, ExpChecked(d, hn::Neg(v)))); };
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(silu(hn::LoadU(d, values + i)), d, values + i);
  if (i < n) {
    Tail tail;
    StoreTail(d, silu(LoadTail(d, values + i, n - i, tail)), values + i, n - i, tail);
  }
}

// GELU with the tanh approximation: 0.5 v (1 + tanh(u)) with u = sqrt(2 / pi) (v + 0.044715 v^3),
// written as v / (1 + exp(-2 u)) (the same function: 0.5 (1 + tanh(u)) is the logistic of 2 u), so
// that it is one vector exponential and one division, as SiLU. (Scalar tanh took 8.5% of
// Gemma-3-270M's one-thread prefill.)
void GeluTanh(float* values, size_t n) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const VF one = hn::Set(d, 1.0f), cubic = hn::Set(d, 0.044715f);
  const VF minus_two_k = hn::Set(d, static_cast<float>(-2.0 * std::sqrt(2.0 / std::numbers::pi)));
  const auto gelu = [&](VF v) HWY_ATTR {
    const VF u = hn::Mul(minus_two_k, hn::MulAdd(hn::Mul(cubic, v), hn::Mul(v, v), v));
    return hn::Div(v, hn::Add(one, ExpChecked(d, u)));
  };
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(gelu(hn::LoadU(d, values + i)), d, values + i);
  if (i < n) {
    Tail tail;
    StoreTail(d, gelu(LoadTail(d, values + i, n - i, tail)), values + i, n - i, tail);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace visikv::vec
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace visikv::vec {

HWY_EXPORT(Dot);
HWY_EXPORT(DotHalf);
HWY_EXPORT(Axpy);
HWY_EXPORT(AxpyHalf);
HWY_EXPORT(BoxSumsOf);
HWY_EXPORT(MaxValue);
HWY_EXPORT(ExpShifted);
HWY_EXPORT(SumExpShifted);
HWY_EXPORT(Silu);
HWY_EXPORT(GeluTanh);

float dot(const float* w, const float* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(Dot)(w, x, n); }

float dot(const uint16_t* w, bool bf16, const float* x, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotHalf)(w, bf16, x, n);
}

void axpy(float a, const float* x, float* y, int64_t n) { HWY_DYNAMIC_DISPATCH(Axpy)(a, x, y, n); }

void axpy(float a, const uint16_t* x, bool bf16, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyHalf)(a, x, bf16, y, n);
}

BoxSums box_sums(const float* q, const float* lo, const float* hi, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(BoxSumsOf)(q, lo, hi, n);
}

float max_value(std::span<const float> values) {
  return HWY_DYNAMIC_DISPATCH(MaxValue)(values.data(), values.size());
}

float exp_shifted(std::span<float> values, float shift) {
  return HWY_DYNAMIC_DISPATCH(ExpShifted)(values.data(), values.size(), shift);
}

double log_sum_exp(std::span<const float> values) {
  const float max = max_value(values);
  if (std::isnan(max) || std::isinf(max)) return max;  // NaN, or every value infinite
  return static_cast<double>(max) +
         std::log(HWY_DYNAMIC_DISPATCH(SumExpShifted)(values.data(), values.size(), max));
}

void silu(std::span<float> values) { HWY_DYNAMIC_DISPATCH(Silu)(values.data(), values.size()); }
void gelu_tanh(std::span<float> values) {
  HWY_DYNAMIC_DISPATCH(GeluTanh)(values.data(), values.size());
}

}  // namespace visikv::vec
#endif  // HWY_ONCE

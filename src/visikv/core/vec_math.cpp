// The row functions of vec_math.h, compiled once per instruction set by Highway's foreach_target
// (as the weight kernels are) and chosen at run time by HWY_DYNAMIC_DISPATCH.
//
// exp is Highway's polynomial (contrib/math: at most a few ulp from the correctly rounded value
// over the range used here), which is elementwise the same computation on every target with fused
// multiply-adds; sums over a row are taken in vector lanes and then across them, so their bits
// depend on the target's vector width (as the weight products' do), not on the caller.
#include "visikv/core/simd_targets.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "visikv/core/vec_math.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// Highway's own headers must follow foreach_target.h.
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

#include "visikv/core/vec_math.h"

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
  HWY_ALIGN float lanes[HWY_MAX_BYTES / sizeof(float)] = {};
};
HWY_INLINE VF LoadTail(DF d, const float* p, size_t n, Tail& tail) {
  std::copy_n(p, n, tail.lanes);
  return hn::Load(d, tail.lanes);
}
HWY_INLINE void StoreTail(DF d, VF v, float* p, size_t n, Tail& tail) {
  hn::Store(v, d, tail.lanes);
  std::copy_n(tail.lanes, n, p);
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

}  // namespace HWY_NAMESPACE
}  // namespace visikv::vec
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace visikv::vec {

HWY_EXPORT(MaxValue);
HWY_EXPORT(ExpShifted);
HWY_EXPORT(SumExpShifted);
HWY_EXPORT(Silu);

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

}  // namespace visikv::vec
#endif  // HWY_ONCE

// The instruction sets that the files compiled per target by Highway's foreach_target
// (model/weight_kernels.cpp, core/vec.cpp, kv/row_kernels.cpp) leave out, included by each
// before <hwy/foreach_target.h> so that all dispatch over the same list: SSSE3/SSE4 would add nothing
// between the portable fallback and AVX2, and the SVE targets have no fixed vector length (the
// kernels assume one).
#pragma once

#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS \
  (HWY_SSSE3 | HWY_SSE4 | HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128)
#endif

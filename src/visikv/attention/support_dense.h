// Dense attention as a Support: every position the model lets the query see.
#pragma once

#include "visikv/attention/support.h"

namespace visikv {

class DenseSupport final : public Support {
 public:
  DenseSupport() : Support(SelectorSpec{}) {}
  // Dense attention has no rule to fit to the cache, and any scale will do.
  void prepare(const KVCache&, const AttentionSpec&) override {}
  ChosenSupport choose(const SupportQuery& query, SupportScratch& scratch,
                       SparseQueryStats& stats) override;
  bool chooses_visible_ranges() const override { return true; }
};

}  // namespace visikv

// Anchors + window + the k candidate positions with the highest score (the exact top-k rule,
// the quality reference), pooled over the slot's queries by the maximum; without a rule, anchors
// + window only (StreamingLLM-style). The scores read to choose are the ones attention uses.
#pragma once

#include "visikv/attention/support_parts.h"

namespace visikv {

class TopKSupport final : public RefreshingSupport {
 public:
  using RefreshingSupport::RefreshingSupport;

 protected:
  void choose_items(const SupportQuery& query, const Region& r, SupportScratch& scratch,
                    SparseQueryStats& stats) override;
  bool reuse_scores(const SupportQuery& query, const Region& r, const PositionSet& support,
                    SupportScratch& scratch, const SparseQueryStats& stats) override;
};

}  // namespace visikv

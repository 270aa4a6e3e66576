// Anchors + window + the ceil(k/B) summary blocks meeting the candidate range with the highest
// centroid score scale * q·c_b (centroid) or upper bound u_b (bound), pooled over the slot's
// queries by the maximum. Reads n / B summaries and no key to choose.
#pragma once

#include "visikv/attention/support_parts.h"

namespace visikv {

class BlockSupport final : public RefreshingSupport {
 public:
  using RefreshingSupport::RefreshingSupport;

 protected:
  void choose_items(const SupportQuery& query, const Region& r, SupportScratch& scratch,
                    SparseQueryStats& stats) override;
};

}  // namespace visikv

// The certified mode: anchors + tail + candidate blocks added in decreasing upper bound u_b until
// the bound delta on the attention mass outside the support is <= eps for every query of the slot
// (support_certified.cpp has the claim and its proof). Every key it reads to decide is a key of
// the support, and the attention uses those scores.
#pragma once

#include "visikv/attention/support.h"

namespace visikv {

class CertifiedSupport final : public Support {
 public:
  using Support::Support;
  void prepare(const KVCache& cache, const AttentionSpec& attention) override;
  ChosenSupport choose(const SupportQuery& query, SupportScratch& scratch,
                       SparseQueryStats& stats) override;

 private:
  // The certified choice from position sketches (SelectorSpec::sketch_bits).
  ChosenSupport choose_positions(const SupportQuery& query, SupportScratch& scratch,
                                 SparseQueryStats& stats);

  int64_t block_ = 1;  // the cache's summary block size
};

}  // namespace visikv

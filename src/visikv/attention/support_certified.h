// The certified mode: anchors + tail + candidates chosen until the bound delta on the attention
// mass outside the support is <= eps for every query of the slot (support_certified.cpp has the
// claim and its proof). Three ways to bound the candidates' scores: block summaries (blocks added
// in decreasing upper bound u_b), position sketches (pP), or every score (exact). The scores read
// to decide serve the attention.
#pragma once

#include "visikv/attention/support.h"
#include "visikv/attention/support_parts.h"

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
  // The certified choice from every candidate's score (SelectorRule::Exact).
  ChosenSupport choose_scored(const SupportQuery& query, SupportScratch& scratch,
                              SparseQueryStats& stats);
  // The common end of both: of the candidates read, the values the certificate needs.
  ChosenSupport keep_heaviest(const SupportQuery& query, const Region& r, double dropped,
                              SupportScratch& scratch, SparseQueryStats& stats);

  int64_t block_ = 1;  // the cache's summary block size
};

}  // namespace visikv

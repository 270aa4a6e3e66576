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

  // The choice from position sketches (SelectorSpec::sketch_bits) is made in steps: set-up (the
  // fixed part's scores, the split queries), the bound pass in parts of 2048 positions, the cut
  // and the list of keys to read, the scores of those keys in parts of 1024; finish_choice()
  // keeps the values the certificate needs.
  int choice_steps() const override;
  int64_t choice_units(int step, const SupportQuery& query,
                       const SupportScratch& scratch) const override;
  int64_t most_choice_units(int step, const SupportQuery& query) const override;
  void run_choice_unit(int step, int64_t unit, const SupportQuery& query, SupportScratch& scratch,
                       SparseQueryStats& stats) override;
  ChosenSupport finish_choice(const SupportQuery& query, SupportScratch& scratch,
                              SparseQueryStats& stats) override;

 private:
  bool chooses_from_sketches() const {
    return spec().sketch_bits > 0 && spec().rule != SelectorRule::Exact;
  }
  Region region(const SupportQuery& query) const {
    return make_region(query.position, query.model_window, spec(), block_);
  }
  // The cut of the choice from position sketches: from the bounds, which candidates' keys to read.
  void choose_keys(const SupportQuery& query, SupportScratch& scratch, SparseQueryStats& stats);
  // The certified choice from every candidate's score (SelectorRule::Exact).
  ChosenSupport choose_scored(const SupportQuery& query, SupportScratch& scratch,
                              SparseQueryStats& stats);
  // The common end of both: of the candidates read, the values the certificate needs.
  ChosenSupport keep_heaviest(const SupportQuery& query, const Region& r,
                              std::span<const double> dropped, SupportScratch& scratch,
                              SparseQueryStats& stats);

  int64_t block_ = 1;  // the cache's summary block size
};

}  // namespace visikv

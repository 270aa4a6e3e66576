// The parts the sparse supports share (support.h describes the support): the split of a query's
// visible range into anchors, candidates and tail, candidate blocks, ranking, the sorted support
// list, the raw scores of the fixed part, and the refresh rule's memory of earlier choices.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "visikv/attention/support.h"

namespace visikv {

// The parts of one query's visible range: anchors [visible_begin, anchors_end), candidates
// [anchors_end, tail_begin), tail [tail_begin, end).
struct Region {
  int64_t visible_begin, anchors_end, tail_begin, end;
  int64_t candidates() const { return tail_begin - anchors_end; }
  int64_t anchors() const { return anchors_end - visible_begin; }
  int64_t tail() const { return end - tail_begin; }
};

// own_block: the summary block size whose block holding the query joins the tail (1: the query
// alone, for rules that read no summaries).
Region make_region(int64_t position, int64_t model_window, const SelectorSpec& spec,
                   int64_t own_block);

struct BlockRange {
  int64_t first = 0, count = 0;  // blocks meeting the candidate range
};

BlockRange candidate_blocks(const Region& r, int64_t block);

// The part of block b inside the candidate range.
std::pair<int64_t, int64_t> block_part(const Region& r, int64_t b, int64_t block);

// Keeps the `keep` best of scratch.order by scratch.pooled (higher first, ties to the lower
// index), then sorts the kept indices ascending.
void keep_best(SupportScratch& scratch, int64_t keep);

// anchors ∪ dynamic (scratch.items: positions, or block indices when `blocks`) ∪ tail as a
// sorted list (disjoint by construction), in scratch.support; a range when it covers every
// visible position, so full support reads exactly what dense attention reads. `dynamic`
// receives the count of dynamic positions.
PositionSet build_support(const Region& r, bool blocks, int64_t block, SupportScratch& scratch,
                          int64_t& dynamic);

// Raw scores of the fixed part (anchors, then tail) of every query of `query`, into
// scratch.fixed_scores ({group, anchors + tail}).
void score_fixed_part(const SupportQuery& query, const Region& r, SupportScratch& scratch);

// Assembles the raw scores of `support` (anchors ∪ dynamic ∪ tail of r) into scratch.scores,
// {group, support size}: anchors and tail from scratch.fixed_scores, dynamic positions from
// scratch.selection ({group, candidates}, column j - anchors_end for position j). A key's score
// does not depend on which other positions a KVCache::score call reads, so these are the bits
// scoring the support afresh would give.
void gather_support_scores(const Region& r, const PositionSet& support, int64_t group,
                           SupportScratch& scratch);

// Anchors + window + a dynamic choice under the refresh rule: a decode step re-chooses every R
// positions and otherwise reuses the last choice per (layer, slot), minus what is no longer a
// candidate. Subclasses say how a fresh choice is made.
class RefreshingSupport : public Support {
 public:
  using Support::Support;
  void reset() override { choices_.clear(); }
  void prepare(const KVCache& cache, const AttentionSpec& attention) override;
  ChosenSupport choose(const SupportQuery& query, SupportScratch& scratch,
                       SparseQueryStats& stats) final;

 protected:
  // The cache's summary block size, known after prepare().
  int64_t block() const { return block_; }
  bool chooses_blocks() const { return spec().uses_blocks(); }

  // A fresh dynamic choice into scratch.items: positions, or block indices for block rules.
  virtual void choose_items(const SupportQuery& query, const Region& r, SupportScratch& scratch,
                            SparseQueryStats& stats) = 0;

  // After a fresh choice: fills scratch.scores with the raw scores of `support` and returns
  // true when the choice already read them.
  virtual bool reuse_scores(const SupportQuery& /*query*/, const Region& /*r*/,
                            const PositionSet& /*support*/, SupportScratch& /*scratch*/,
                            const SparseQueryStats& /*stats*/) {
    return false;
  }

 private:
  // A choice made at `position`: dynamic positions or block indices.
  struct Choice {
    int64_t position = -1;
    std::vector<int32_t> items;
  };
  int64_t block_ = 1;
  int64_t slots_per_layer_ = 0;
  std::vector<Choice> choices_;  // {layers, slots_per_layer}
};

}  // namespace visikv

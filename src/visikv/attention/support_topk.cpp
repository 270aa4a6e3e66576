#include "visikv/attention/support_topk.h"

#include <algorithm>
#include <numeric>

namespace visikv {

// Reads every candidate's score (that is the rule's definition).
void TopKSupport::choose_items(const SupportQuery& query, const Region& r, SupportScratch& scratch,
                               SparseQueryStats& stats) {
  const int64_t n = r.candidates(), k = spec().top_k, group = query.group;
  scratch.items.clear();
  if (spec().rule == SelectorRule::None || n <= 0) return;
  if (k >= n) {  // clamped: every candidate, nothing to rank
    for (int64_t j = r.anchors_end; j < r.tail_begin; ++j)
      scratch.items.push_back(static_cast<int32_t>(j));
    return;
  }
  scratch.selection.resize(static_cast<size_t>(group * n));
  query.cache.score(query.layer, query.kv_head, query.queries,
                    PositionSet::range(r.anchors_end, r.tail_begin), scratch.selection);
  stats.selection_scores = n;
  scratch.pooled.assign(scratch.selection.begin(), scratch.selection.begin() + n);
  for (int64_t g = 1; g < group; ++g)
    for (int64_t i = 0; i < n; ++i)
      scratch.pooled[i] = std::max(scratch.pooled[i], scratch.selection[g * n + i]);
  scratch.order.resize(static_cast<size_t>(n));
  std::iota(scratch.order.begin(), scratch.order.end(), 0);
  keep_best(scratch, k);
  for (int32_t i : scratch.order) scratch.items.push_back(static_cast<int32_t>(r.anchors_end + i));
}

bool TopKSupport::reuse_scores(const SupportQuery& query, const Region& r,
                               const PositionSet& support, SupportScratch& scratch,
                               const SparseQueryStats& stats) {
  // Nothing was scored to choose (no rule, or clamped to every candidate): the body scores.
  if (stats.selection_scores == 0) return false;
  score_fixed_part(query, r, scratch);
  gather_support_scores(r, support, query.group, scratch);
  return true;
}

}  // namespace visikv

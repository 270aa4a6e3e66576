#include "visikv/attention/support_blocks.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "visikv/attention/block_bounds.h"

namespace visikv {

void BlockSupport::choose_items(const SupportQuery& query, const Region& r, SupportScratch& scratch,
                                SparseQueryStats& stats) {
  const BlockRange blocks = candidate_blocks(r, block());
  const int64_t want = (spec().top_k + block() - 1) / block(), group = query.group;
  scratch.items.clear();
  if (blocks.count == 0) return;
  if (want >= blocks.count) {
    for (int64_t b = 0; b < blocks.count; ++b)
      scratch.items.push_back(static_cast<int32_t>(blocks.first + b));
    return;
  }
  // One pass over the contiguous summaries of the candidate blocks, every query of the slot.
  scratch.bounds.resize(static_cast<size_t>(blocks.count * group));
  const BlockSummaryTable table = query.cache.summaries(query.layer, query.kv_head);
  if (spec().rule == SelectorRule::Centroid)
    block_centroid_scores(table, blocks.first, blocks.count, query.queries, query.scale,
                          scratch.bounds);
  else
    block_upper_bounds(table, blocks.first, blocks.count, query.queries, query.scale,
                       scratch.bounds, spec().frame_rank > 0);
  scratch.pooled.resize(static_cast<size_t>(blocks.count));
  for (int64_t b = 0; b < blocks.count; ++b) {
    float best = -INFINITY;
    for (int64_t g = 0; g < group; ++g)
      best = std::max(best, static_cast<float>(scratch.bounds[b * group + g]));
    scratch.pooled[b] = best;
  }
  stats.summaries_read = blocks.count;
  scratch.order.resize(static_cast<size_t>(blocks.count));
  std::iota(scratch.order.begin(), scratch.order.end(), 0);
  keep_best(scratch, want);
  for (int32_t i : scratch.order) scratch.items.push_back(static_cast<int32_t>(blocks.first + i));
}

}  // namespace visikv

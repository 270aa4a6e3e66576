#include "visikv/attention/support_parts.h"

#include <algorithm>

#include "visikv/attention/attention.h"

namespace visikv {

Region make_region(int64_t position, int64_t model_window, const SelectorSpec& spec,
                   int64_t own_block) {
  const PositionSet visible = visible_positions(position, model_window);
  const int64_t lo = visible.begin(), end = visible.end();
  const int64_t anchors_end = std::clamp(spec.anchors, lo, end);
  const int64_t window_begin = std::max(lo, end - std::min(spec.window, end));
  const int64_t own_begin = (position / own_block) * own_block;
  const int64_t tail_begin = std::max(anchors_end, std::min(window_begin, own_begin));
  return {lo, anchors_end, tail_begin, end};
}

BlockRange candidate_blocks(const Region& r, int64_t block) {
  if (r.candidates() <= 0) return {};
  const int64_t first = r.anchors_end / block, last = (r.tail_begin - 1) / block;
  return {first, last - first + 1};
}

std::pair<int64_t, int64_t> block_part(const Region& r, int64_t b, int64_t block) {
  return {std::max(r.anchors_end, b * block), std::min(r.tail_begin, (b + 1) * block)};
}

void keep_best(SupportScratch& scratch, int64_t keep) {
  const auto better = [&](int32_t a, int32_t b) {
    return scratch.pooled[a] > scratch.pooled[b] ||
           (scratch.pooled[a] == scratch.pooled[b] && a < b);
  };
  std::nth_element(scratch.order.begin(), scratch.order.begin() + keep, scratch.order.end(),
                   better);
  scratch.order.resize(static_cast<size_t>(keep));
  std::sort(scratch.order.begin(), scratch.order.end());
}

PositionSet build_support(const Region& r, bool blocks, int64_t block, SupportScratch& scratch,
                          int64_t& dynamic) {
  std::vector<int32_t>& support = scratch.support;
  support.clear();
  for (int64_t j = r.visible_begin; j < r.anchors_end; ++j)
    support.push_back(static_cast<int32_t>(j));
  for (int32_t x : scratch.items) {
    if (!blocks) {
      support.push_back(x);
      continue;
    }
    const auto [begin, end] = block_part(r, x, block);
    for (int64_t j = begin; j < end; ++j) support.push_back(static_cast<int32_t>(j));
  }
  dynamic = static_cast<int64_t>(support.size()) - r.anchors();
  for (int64_t j = r.tail_begin; j < r.end; ++j) support.push_back(static_cast<int32_t>(j));
  if (static_cast<int64_t>(support.size()) == r.end - r.visible_begin)
    return PositionSet::range(r.visible_begin, r.end);
  return PositionSet::list(support);
}

void score_fixed_part(const SupportQuery& query, const Region& r, SupportScratch& scratch) {
  scratch.fixed.clear();
  for (int64_t j = r.visible_begin; j < r.anchors_end; ++j)
    scratch.fixed.push_back(static_cast<int32_t>(j));
  for (int64_t j = r.tail_begin; j < r.end; ++j) scratch.fixed.push_back(static_cast<int32_t>(j));
  scratch.fixed_scores.resize(scratch.fixed.size() * static_cast<size_t>(query.group));
  query.cache.score(query.layer, query.kv_head, query.queries, PositionSet::list(scratch.fixed),
                    scratch.fixed_scores);
}

void gather_support_scores(const Region& r, const PositionSet& support, int64_t group,
                           SupportScratch& scratch) {
  const int64_t n = support.size(), fixed = r.anchors() + r.tail();
  const int64_t candidates = std::max<int64_t>(0, r.candidates());
  scratch.scores.resize(static_cast<size_t>(group * n));
  for (int64_t g = 0; g < group; ++g) {
    const float* fixed_row = scratch.fixed_scores.data() + g * fixed;
    const float* selection_row = scratch.selection.data() + g * candidates;
    float* out = scratch.scores.data() + g * n;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = support[i];
      if (j < r.anchors_end)
        out[i] = fixed_row[j - r.visible_begin];
      else if (j >= r.tail_begin)
        out[i] = fixed_row[r.anchors() + (j - r.tail_begin)];
      else
        out[i] = selection_row[j - r.anchors_end];
    }
  }
}

void RefreshingSupport::prepare(const KVCache& cache, const AttentionSpec& attention) {
  Support::prepare(cache, attention);
  block_ = cache.block_size();
  const CacheShape& shape = cache.shape();
  const int64_t slots = spec().gqa == GqaChoice::PerHead ? attention.heads : shape.kv_heads;
  if (slots_per_layer_ != slots || static_cast<int64_t>(choices_.size()) != shape.layers * slots) {
    choices_.assign(static_cast<size_t>(shape.layers * slots), {});
    slots_per_layer_ = slots;
  }
}

namespace {

// Drops from a reused choice what is no longer a candidate (the window and the own block move
// forward; a sliding-window model's visible range moves too).
void keep_candidates(std::span<const int32_t> previous, const Region& r, bool blocks, int64_t block,
                     std::vector<int32_t>& items) {
  items.clear();
  for (int32_t x : previous) {
    const bool inside = blocks ? x * block < r.tail_begin && (x + 1) * block > r.anchors_end
                               : x >= r.anchors_end && x < r.tail_begin;
    if (inside) items.push_back(x);
  }
}

}  // namespace

ChosenSupport RefreshingSupport::choose(const SupportQuery& query, SupportScratch& scratch,
                                        SparseQueryStats& stats) {
  const SelectorSpec& s = spec();
  // Exact top-k uses no summaries, so it needs no own-block rule: its tail is the window plus
  // the query itself.
  const int64_t own_block = chooses_blocks() ? block_ : 1;
  const Region r = make_region(query.position, query.model_window, s, own_block);
  Choice& choice = choices_[query.layer * slots_per_layer_ + query.slot];
  // Only a single-token call reads the slot's memory; a multi-token call's one writer is its
  // last token, so concurrent queries of one slot never race.
  const bool reuse = query.decode && s.refresh > 1 && choice.position >= 0 &&
                     choice.position < query.position &&
                     query.position - choice.position < s.refresh;
  if (reuse) {
    keep_candidates(choice.items, r, chooses_blocks(), block_, scratch.items);
    stats.refreshed = false;
  } else {
    choose_items(query, r, scratch, stats);
    if (query.keeps_choice) {
      choice.position = query.position;
      choice.items = scratch.items;
    }
  }
  if (chooses_blocks()) stats.blocks_read = static_cast<int64_t>(scratch.items.size());
  const PositionSet support = build_support(r, chooses_blocks(), block_, scratch, stats.dynamic);
  const bool scored = !reuse && reuse_scores(query, r, support, scratch, stats);
  return {support, scored};
}

}  // namespace visikv

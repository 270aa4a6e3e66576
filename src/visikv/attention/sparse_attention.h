// Sparse causal attention (Condensate-style anchors + window + dynamic positions, and the
// certified mode): a selector turns the cache's block summaries (or, for the exact reference, all
// scores) into a PositionSet per query, and attention scores and accumulates only that support
// through KVCache::score / accumulate. The spec grammar is in selector_spec.h and
// docs/SELECTOR_SPECS.md.
//
// The support of the query at position t, with visible positions V = [lo, t] (lo > 0 only for a
// sliding-window model), is the disjoint, sorted union of
//   anchors  [lo, min(A, t + 1)),
//   dynamic  positions chosen from the candidate range C = [max(lo, A), tail_begin),
//   tail     [tail_begin, t]: the window [t - W + 1, t] and, for the block rules and certified,
//            the query's own (partial) summary block.
// The own block is always read because during prefill its summary already holds keys written
// after t: ranking it would let later tokens steer the choice, and reading it keeps prefill and
// decode choices identical. With W >= B it lies inside the window anyway. Blocks partially
// covered by anchors or the tail contribute only their positions inside C.
//
// Rules: exact = the k positions of C with the highest score (pooled, see gqa); centroid / bound
// = the ceil(k/B) blocks meeting C with the highest q·c_b or u_b (ties: lower position first);
// certified = blocks in decreasing u_b until the bound delta on the dropped mass is <= eps.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "visikv/attention/attention.h"
#include "visikv/attention/selector_spec.h"
#include "visikv/kv/cache.h"

namespace visikv {

// What one query head read, for evaluation and the benchmark.
struct SparseQueryStats {
  int64_t support = 0;           // positions scored and accumulated for the output
  int64_t dynamic = 0;           // of which chosen by the rule (inside the candidate range)
  int64_t blocks_read = 0;       // block rules and certified: dynamic blocks whose keys were read
  int64_t summaries_read = 0;    // block summaries examined to make the choice
  int64_t selection_scores = 0;  // keys scored only to choose (exact: every candidate)
  bool refreshed = true;         // false: a previous decode step's choice was reused
  double delta = NAN;            // certified: bound on the attention mass outside the support
};

// Quest-style upper bound on scale * q·k over every key inside the block's per-channel box
// [min, max]: scale * sum_c max(q_c min_c, q_c max_c), plus a slack covering float32 rounding of
// this sum and of the cache's score arithmetic: (2d + 4) 2^-24 sum_c |q_c| max(|min_c|, |max_c|)
// + 4 d sqrt(d) 2^-24 ||q|| max_j ||k_j|| (sparse_attention.cpp says why). Needs scale > 0.
// The box is over the keys in their stored form (the form scores read), so the bound holds for
// quantized and HeadQ caches as well as dense ones.
double block_upper_bound(const BlockSummary& block, std::span<const float> query, double scale);

// scale * q·c_b with the block's mean key c_b.
double block_centroid_score(const BlockSummary& block, std::span<const float> query, double scale);

// The same for `count` blocks from `first` of a head's summary table and every query of
// `queries` ({group, head_dim}) in one pass over the contiguous summaries:
// out[b * group + g] for block first + b and query g.
void block_upper_bounds(const BlockSummaryTable& table, int64_t first, int64_t count,
                        std::span<const float> queries, double scale, std::span<double> out);
void block_centroid_scores(const BlockSummaryTable& table, int64_t first, int64_t count,
                           std::span<const float> queries, double scale, std::span<double> out);

class SparseSelector;

// Like attend_causal (same AttentionSpec; queries and out {tokens, heads, head_dim} for positions
// first_position.., whose keys and values are already in the cache), reading only the selected
// support of each query. With tokens == 1 (decode) the refresh rule may reuse the previous choice;
// with more tokens (prefill) every query chooses afresh and the last one's choice is kept for the
// decode steps that follow. stats: empty, or tokens * heads entries ([t * heads + h]) to fill.
// The observer sees the support as `positions`. Requires scale > 0 for every rule but dense.
void attend_sparse(const KVCache& cache, int64_t layer, std::span<const float> queries,
                   int64_t tokens, int64_t first_position, const AttentionSpec& spec,
                   SparseSelector& selector, std::span<float> out,
                   std::span<SparseQueryStats> stats = {}, AttentionObserver* observer = nullptr);

// A parsed spec plus the state the refresh rule needs: the last dynamic choice per (layer, KV
// head) — or per (layer, query head) with gqa=head — and the position it was made at. One
// selector serves one sequence; reset() it (or let positions restart) for the next.
class SparseSelector {
 public:
  explicit SparseSelector(const SelectorSpec& spec) : spec_(spec) {}
  explicit SparseSelector(std::string_view spec) : spec_(parse_selector_spec(spec)) {}

  const SelectorSpec& spec() const { return spec_; }
  void reset() { choices_.clear(); }

  // A choice made at `position`: dynamic positions (exact) or block indices (block rules).
  struct Choice {
    int64_t position = -1;
    std::vector<int32_t> items;
  };

 private:
  friend void attend_sparse(const KVCache&, int64_t, std::span<const float>, int64_t, int64_t,
                            const AttentionSpec&, SparseSelector&, std::span<float>,
                            std::span<SparseQueryStats>, AttentionObserver*);
  SelectorSpec spec_;
  int64_t slots_per_layer_ = 0;
  std::vector<Choice> choices_;  // {layers, slots_per_layer}
};

}  // namespace visikv

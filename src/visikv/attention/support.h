// The support of an attention query: which positions it reads. attend() (attention.h) is the one
// attention body (score -> scale -> softmax -> observe -> accumulate); a Support is the small part
// that differs between dense attention, the Condensate-style sparse rules and the certified mode.
// The spec grammar is in selector_spec.h and docs/SELECTOR_SPECS.md.
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
// Rules, one class and file each: dense (support_dense.h) = V; exact top-k (support_topk.h) =
// the k positions of C with the highest score (pooled, see gqa); centroid / bound
// (support_blocks.h) = the ceil(k/B) blocks meeting C with the highest q·c_b or u_b (ties: lower
// position first); certified (support_certified.h) = blocks in decreasing u_b until the bound
// delta on the dropped mass is <= eps. A rule that scored keys to choose hands those scores to
// the body, so no key is scored twice.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "visikv/attention/block_bounds.h"
#include "visikv/attention/selector_spec.h"
#include "visikv/kv/cache.h"

namespace visikv {

struct AttentionSpec;
struct HeadqBasisVectors;

// What one query head read, for evaluation and the benchmark.
struct SparseQueryStats {
  int64_t support = 0;           // positions scored and accumulated for the output
  int64_t dynamic = 0;           // of which chosen by the rule (inside the candidate range)
  int64_t blocks_read = 0;       // block rules and certified: dynamic blocks whose keys were read
  int64_t summaries_read = 0;    // block summaries examined to make the choice
  int64_t selection_scores = 0;  // keys scored to make the choice (exact: every candidate); the
                                 // chosen ones' scores are reused by the attention, not recomputed
  bool refreshed = true;         // false: a previous decode step's choice was reused
  double delta = NAN;            // certified: bound on the attention mass outside the support
};

// Positions whose keys one query head's choice and attention scored under `spec`: the support's,
// and those scored only to choose. Exact top-k scores every candidate, the chosen ones among them
// (counted once); certified with position sketches or `exact` also scores keys whose values it
// then leaves out.
int64_t keys_read(const SelectorSpec& spec, const SparseQueryStats& stats);

// One choice of support: the queries that share it (a KV head's group of query heads, or one
// query head with gqa=head) at one position.
struct SupportQuery {
  const KVCache& cache;
  int64_t layer = 0, kv_head = 0;
  int64_t slot = 0;  // which choice of the layer this is: the KV head, or the query head
  int64_t position = 0;
  std::span<const float> queries;  // {group, head_dim}
  int64_t group = 0;
  int64_t model_window = 0;   // the model's sliding window (0: none)
  double scale = 0;           // multiplies q·k
  bool decode = false;        // a single-token call: the refresh rule may reuse a choice
  bool keeps_choice = false;  // the call's last token: the one writer of the slot's refresh state
};

// Scratch reused across the queries one thread handles, so choosing and attending allocate
// nothing per query once warm.
struct SupportScratch {
  std::vector<float> scores;         // {group, support}: raw (unscaled) scores of the support
  std::vector<float> selection;      // {group, candidates}: raw scores read to choose
  std::vector<float> block_scores;   // {group, block part}: one block's raw scores, certified
  std::vector<float> fixed_scores;   // {group, anchors + tail}: raw scores of the fixed part
  std::vector<int32_t> fixed;        // the fixed part (anchors, tail) as positions
  std::vector<float> pooled;         // one ranking value per candidate position or block
  std::vector<int32_t> order;        // candidate indices being ranked
  std::vector<int32_t> items;        // the dynamic choice: positions or block indices
  std::vector<int32_t> support;      // the support as a sorted position list
  std::vector<double> bounds;        // {blocks, group}: scores or bounds of the candidate blocks
  std::vector<double> suffix;        // {blocks + 1, group}, certified
  std::vector<double> ranking;       // pooled bound per block, certified
  std::vector<double> partition;     // Z_S per query, certified
  std::vector<double> reference;     // m per query, certified
  std::vector<double> deltas;        // {group}: certified's delta per query, NaN otherwise
  std::vector<double> left_out;      // {group}: mass of the read keys left out, position sketches
  std::vector<int32_t> low_buckets;  // {candidates}: buckets of the lower bounds, position sketches
  std::vector<int16_t> query_buckets;  // {2, group, candidates}: each query's buckets, sketches
  SketchQueries sketch_queries;        // the queries split for the position bounds
  std::vector<double> part_maxima;     // {parts, group}: largest upper bound per part of a pass
  std::vector<double> dropped;  // {group}: the bound on the unread candidates' mass, certified
};

// What a Support hands the attention body.
struct ChosenSupport {
  PositionSet positions;
  // true: SupportScratch::scores already holds the raw scores of `positions`, {group, size},
  // computed while choosing, bit for bit what KVCache::score gives, so the body does not score
  // them again.
  bool scored = false;
};

class Support {
 public:
  explicit Support(const SelectorSpec& spec) : spec_(spec) {}
  virtual ~Support() = default;
  Support(const Support&) = delete;
  Support& operator=(const Support&) = delete;

  const SelectorSpec& spec() const { return spec_; }

  // Forgets the state a rule keeps across calls (the refresh rule's last choices): one Support
  // serves one sequence; reset() it (or let positions restart) for the next.
  virtual void reset() {}

  // Before the queries of one attend() call: checks that the rule fits the cache and the
  // attention, and sizes the state kept across calls.
  virtual void prepare(const KVCache& cache, const AttentionSpec& attention);

  // Query heads sharing one choice, out of a KV head's `group`.
  int64_t heads_per_choice(int64_t group) const {
    return spec_.gqa == GqaChoice::PerHead ? 1 : group;
  }

  // The support of `query`, and the statistics of the choice (dynamic, blocks_read,
  // summaries_read, selection_scores, refreshed; certified fills scratch.deltas). The returned
  // list may point into `scratch`. Called from worker threads, each with its own scratch; calls
  // for different slots may run concurrently.
  virtual ChosenSupport choose(const SupportQuery& query, SupportScratch& scratch,
                               SparseQueryStats& stats) = 0;

  // A rule may make its choice in steps, so that a decode step can share one slot's long passes
  // (over every candidate, or every key it reads) among the threads: the steps run one after the
  // other; step s is choice_units(s, ...) units, each writing its own part of the slot's scratch,
  // which may run in any order on any thread (a step of one unit may also fill `stats`); then
  // finish_choice() ends the choice. choice_units(s, ...) reads only what earlier steps wrote,
  // and no unit of step s changes it (threads count a step's units while others run them). Such
  // a rule's choose() runs the same steps on one thread in order, so both give the same bits.
  // With no steps (choice_steps() == 0), finish_choice() is the whole choice: choose().
  virtual int choice_steps() const { return 0; }
  virtual int64_t choice_units(int /*step*/, const SupportQuery& /*query*/,
                               const SupportScratch& /*scratch*/) const {
    return 1;
  }
  // The most units step s can have for `query`, known before any step runs (decode hands out
  // that many per slot and step; those past choice_units() do nothing). A rule with steps of
  // more than one unit overrides it; choose_in_steps() checks it.
  virtual int64_t most_choice_units(int /*step*/, const SupportQuery& /*query*/) const { return 1; }
  virtual void run_choice_unit(int /*step*/, int64_t /*unit*/, const SupportQuery& /*query*/,
                               SupportScratch& /*scratch*/, SparseQueryStats& /*stats*/) {}
  virtual ChosenSupport finish_choice(const SupportQuery& query, SupportScratch& scratch,
                                      SparseQueryStats& stats) {
    return choose(query, scratch, stats);
  }

  // True when every choice is the query's whole visible range, unscored (dense attention): the
  // queries of a prefill may then share the reads of the positions they all see.
  virtual bool chooses_visible_ranges() const { return false; }

 protected:
  // choose() of a rule that chooses in steps: every step's units in order, then finish_choice().
  ChosenSupport choose_in_steps(const SupportQuery& query, SupportScratch& scratch,
                                SparseQueryStats& stats);

 private:
  SelectorSpec spec_;
};

// The Support a spec names.
std::unique_ptr<Support> make_support(const SelectorSpec& spec);
std::unique_ptr<Support> make_support(std::string_view spec);

// Gives an empty `cache` the summaries `spec` reads beyond the plain block summaries: position
// sketches (SelectorSpec::sketch_bits), and the summary frame of SelectorSpec::frame_rank R: per
// head, the top R query directions of the calibrated `basis` (kv/headq.h), orthonormalized again
// in float64 so the bound's identity holds to float64 rounding. Does nothing for a spec that
// needs neither; throws visikv::Error naming the selector when `basis` is null or holds fewer
// than R directions per head, or does not match the cache's shape.
void prepare_summaries(KVCache& cache, const SelectorSpec& spec, const HeadqBasisVectors* basis);

}  // namespace visikv

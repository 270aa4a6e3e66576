// Causal attention, written against the KV cache interface: for each query the cache scores the
// positions of its support from their stored form, and accumulates values with the softmax
// weights. One body serves every support rule (support.h): dense attention is the support that
// reads every visible position.
#pragma once

#include <cstdint>
#include <span>

#include "visikv/attention/support.h"
#include "visikv/kv/cache.h"

namespace visikv {

struct AttentionSpec {
  int64_t heads = 0;  // query heads
  int64_t head_dim = 0;
  double scale = 0;            // multiplies q·k (Config::score_scale())
  int64_t sliding_window = 0;  // 0: every earlier position; W: the last W positions
};

// One query head's attention, as an observer sees it: the query, the positions it read and the
// softmax weights over them. Observers are called from worker threads and must be thread-safe.
struct AttentionEvent {
  int64_t layer, head, kv_head, position;
  std::span<const float> query;
  const PositionSet& positions;
  std::span<const float> scores;   // scaled logits over `positions`
  std::span<const float> weights;  // softmax of scores
};

class AttentionObserver {
 public:
  virtual ~AttentionObserver() = default;
  virtual void observe(const AttentionEvent& event) = 0;
};

// The positions a query at `position` may read under the model's causal (and sliding-window) rule.
PositionSet visible_positions(int64_t position, int64_t sliding_window);

// queries: {tokens, heads, head_dim} for positions first_position .., whose keys and values are
// already in the cache. out: {tokens, heads, head_dim}. Each query reads the positions `support`
// chooses: score -> scale -> softmax -> observe -> accumulate. With tokens == 1 (decode) the
// refresh rule may reuse the previous choice; with more tokens (prefill) every query chooses
// afresh and the last one's choice is kept for the decode steps that follow. stats: empty, or
// tokens * heads entries ([t * heads + h]) to fill. The observer sees the support as
// `positions`. Every rule but dense requires scale > 0.
void attend(const KVCache& cache, int64_t layer, std::span<const float> queries, int64_t tokens,
            int64_t first_position, const AttentionSpec& spec, Support& support,
            std::span<float> out, std::span<SparseQueryStats> stats = {},
            AttentionObserver* observer = nullptr);

// attend() over every visible position (DenseSupport).
void attend_causal(const KVCache& cache, int64_t layer, std::span<const float> queries,
                   int64_t tokens, int64_t first_position, const AttentionSpec& spec,
                   std::span<float> out, AttentionObserver* observer = nullptr);

// Softmax in place over `values` with max subtraction; returns log of the normaliser
// (log-sum-exp).
double softmax_in_place(std::span<float> values);

}  // namespace visikv

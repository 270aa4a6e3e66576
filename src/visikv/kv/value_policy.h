// Value bit policies (METHODS.md, "Values"): online attention accounting per stored token and a
// value store that holds each token at one of two or three integer widths (levels 0 = L, (1 = M,)
// K = H), chosen from that accounting under an average bit budget. The spec grammar is in
// kv/value_policy_spec.h and docs/CACHE_SPECS.md; make_cache builds a CodecCache whose value
// stores are ValuePolicyStores.
//
// Accounting. For each stored token j of one (layer, KV head): A¹_j = Σ_t Σ_h a_{t,h,j} and
// A²_j = w_j = Σ_t Σ_h a_{t,h,j}², over every query t that read j and every query head h of the
// group, from the softmax weights attention actually used (KVCache::record_attention; the decoder
// forwards them). Sums are in double.
//
// Policy. The budget fixes the steps above L that all tokens hold together
// (ValuePolicySpec::raised_steps; the window counts against it); the policy chooses which tokens
// hold them, by the surrogate readout error Σ_j w_j ||v_j - v̂_j||² (METHODS.md: the output error
// of independent zero-mean value errors). A token's step k (level k-1 -> k) is worth
//
//   gain_j(k) = weight_j · drop_j(k)
//
// weight_j being the rule's score (A² w_j for a2 and a2e, A¹ for a1, the position for recency)
// and drop_j(k) the squared error the step removes: for a2e token j's own, measured when it
// arrives, ||v_j - v̂_j(k-1)||² - ||v_j - v̂_j(k)||² with v̂_j(k) the reading it would have at
// level k (reached by demotions from H, as below); for the other rules a model of it that is the
// same for every token, D(b_{k-1}) - D(b_k) with D(b) = 1 / (2^b - 1)² (a uniform error of step
// range / (2^b - 1)), divided by the top step's so that the top step is worth the score itself.
// Minimising the surrogate under the budget is then a knapsack of unit-cost steps whose gains
// fall from step to step (for the model, by 5.7 from int2->int3 to int3->int4), which taking the
// largest gains first solves; demoting the smallest gain first, one step at a time, is the same
// rule run backwards, online. So with two widths a2 and a1 keep the tokens of largest score at H
// (as the two-level policy always did), and with three widths a token goes to int4 only where its
// weight is about 5.7 times that of a token left at int2.
//
// Online: appending token n (so n + 1 are stored) first lets the tokens older than the newest
// W_{n+1} (W, or less under :ramp; kv/value_policy_spec.h) leave the window, at most one: they
// join the set S of tokens outside the window above level 0. S may hold at most
// cap = raised_steps(n + 1) - K·min(n + 1, W_{n+1}) steps; while it holds more, the member whose
// top step has the smallest gain drops one level for good (ties: the newest of them). Then token n
// is stored at H bits. So after every append exactly raised_steps(n + 1) steps are held, and at
// most K steps are given back per append. Scores keep growing while tokens are read, so S is always
// the top of the tokens not yet demoted, not of all tokens: a step given back never comes back.
//
// Storage. A token is stored once, as its H-bit code, when it arrives; a demoted token is
// re-quantized from its current code (its reconstruction), never from the float value, which is
// not kept: keeping the float originals of the window would hold W·d floats per head beyond the
// reported budget (at W = 64, d = 64 more than half a 1024-token int3 value cache), and one path
// serves demotions at the window edge and later ones alike. The cost is repeated rounding: a token
// demoted from H to L is within (step_H + step_L) / 2 of its value per element instead of
// step_L / 2 (through M, + step_M / 2 more). a2e's measured drops include that cost. With L == H
// demotion keeps the code as it is, so the store reads exactly like the plain int<L>:g<G>:tok
// codec. The fromfloat control (kv/value_policy_spec.h) keeps the float values beside the codes,
// uncounted, and re-quantizes those instead, so a demoted token reads as the plain codec of its
// level would read it (a2e's drops likewise). Rows of each width live in slots that demoted tokens
// free and new rows reuse: stored_bytes() is exactly codec_stored_bits(spec, d, size()). The
// ranking state (the account, a2e's K drops per token) is not counted in the bits, as no attention
// statistic is.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/kv/cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/vector_store.h"

namespace visikv {

// Per stored token of one head: the attention mass A¹ and the squared mass A² it has received.
class AttentionAccount {
 public:
  // A new token, not yet read.
  void add_token() {
    mass_.push_back(0.0);
    squared_mass_.push_back(0.0);
  }
  // One query head's softmax weights over `positions` (weights.size() == positions.size(),
  // positions < size()).
  void record(std::span<const float> weights, const PositionSet& positions);

  int64_t size() const { return static_cast<int64_t>(mass_.size()); }
  double mass(int64_t position) const { return mass_[position]; }                  // A¹
  double squared_mass(int64_t position) const { return squared_mass_[position]; }  // A² (w_j)
  void clear() {
    mass_.clear();
    squared_mass_.clear();
  }

 private:
  std::vector<double> mass_, squared_mass_;
};

class ValuePolicyStore final : public ValueStore {
 public:
  // `spec`: an integer codec with `policy` set (per-token groups, G % 8 == 0, G | head_dim).
  ValuePolicyStore(const CodecSpec& spec, int64_t head_dim, int64_t reserve_tokens);

  int64_t dim() const override { return dim_; }
  int64_t size() const override { return static_cast<int64_t>(where_.size()); }
  int64_t quantized_size() const override { return size(); }
  void append(std::span<const float> vector) override;
  void accumulate(std::span<const float> weights, const PositionSet& positions,
                  std::span<float> out) const override;
  void reconstruct(int64_t position, std::span<float> out) const override;
  int64_t stored_bytes() const override;
  void clear() override;
  bool records_attention() const override { return true; }
  void record_attention(std::span<const float> weights, const PositionSet& positions) override;

  const CodecSpec& spec() const { return spec_; }
  const AttentionAccount& account() const { return account_; }
  // The level (0 = L .. K = H) of the token at `position` now.
  int level(int64_t position) const { return where_[position].level; }
  bool is_high(int64_t position) const { return level(position) == policy_.steps(); }
  // Tokens held at `level` now (default: H).
  int64_t level_count(int level) const;
  int64_t high_count() const { return level_count(policy_.steps()); }
  // Steps above L held by all tokens now: raised_steps(size()).
  int64_t raised_steps() const;
  // Steps given back so far (one level each, at the window edge or later).
  int64_t demotions() const { return demotions_; }
  // gain_j(level(j)): what giving back token j's top step would cost in the surrogate (0 at
  // level 0).
  double gain(int64_t position) const;

 private:
  struct Pool {  // rows of packed codes plus per-group fp16 scales, then zeros
    int bits = 0;
    int64_t code_bytes = 0;
    std::vector<uint8_t> codes;
    std::vector<uint16_t> params;
    std::vector<int32_t> free_slots;
    int64_t slots() const;
  };
  struct Where {
    int8_t level;
    int32_t slot;
  };

  int32_t store_row(Pool& pool, const float* x);
  void decode(const Pool& pool, int32_t slot, float* out) const;
  void decode(int64_t position, float* out) const;
  double weight(int64_t position) const;
  void record_drops(std::span<const float> value);
  void demote(int64_t position);

  CodecSpec spec_;
  ValuePolicySpec policy_;
  int64_t dim_, group_, groups_;
  std::vector<Pool> pools_;          // one per level, L first
  std::vector<double> model_drops_;  // the modelled drop of step k at [k - 1] (not a2e)
  std::vector<Where> where_;
  std::vector<int32_t> kept_;  // S: tokens outside the window above level 0, oldest first
  int64_t kept_steps_ = 0;
  int64_t left_ =
      0;  // tokens that have left the window: positions [0, left_)        // the steps S holds
  std::vector<double> drops_;     // a2e: token j's measured drop of step k at [j K + k - 1]
  std::vector<float> originals_;  // fromfloat: token j's float value at [j d, (j + 1) d)
  AttentionAccount account_;
  int64_t demotions_ = 0;
  std::vector<float> row_, probe_;  // append-time scratch (append is not const)
  std::vector<uint8_t> codes_;
};

}  // namespace visikv

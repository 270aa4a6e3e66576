// Value bit policies (METHODS.md, "Values"): online attention accounting per stored token and a
// value store that holds each token at a low (L) or high (H) integer width, chosen from that
// accounting under an average bit budget. The spec grammar is in kv/value_policy_spec.h and
// docs/CACHE_SPECS.md; make_cache builds a CodecCache whose value stores are ValuePolicyStores.
//
// Accounting. For each stored token j of one (layer, KV head): A¹_j = Σ_t Σ_h a_{t,h,j} and
// A²_j = w_j = Σ_t Σ_h a_{t,h,j}², over every query t that read j and every query head h of the
// group, from the softmax weights attention actually used (KVCache::record_attention; the decoder
// forwards them). Sums are in double.
//
// Policy. Appending token n (so n + 1 are stored) first lets token n - W leave the window: it
// joins the set S of tokens outside the window that are still high. S may hold at most
// cap = high_tokens(n + 1) - min(n + 1, W) tokens (ValuePolicySpec::high_tokens: the window
// counts against the budget); when it holds one more, the member with the lowest score is
// demoted to L bits for good (ties: the newest of them). Scores: A² w_j (a2), A¹ (a1), the
// position (recency: the oldest goes, so the newest high_tokens(n) tokens stay high). Then token
// n is stored at H bits. So after every append exactly high_tokens(n + 1) tokens are high, and at
// most one token is re-quantized per append. Scores keep growing while tokens are read, so S is
// always the top of the tokens not yet demoted, not of all tokens: a token demoted early never
// comes back.
//
// Storage. A token is stored once, as its H-bit code, when it arrives; a demoted token is
// re-quantized to L bits from that H-bit code (its reconstruction), never from the float value,
// which is not kept: keeping the float originals of the window would hold W·d floats per head
// beyond the reported budget (at W = 64, d = 64 more than half a 1024-token int3 value cache),
// and one path serves demotions at the window edge and later ones alike. The cost is double
// rounding: a demoted token is within (step_H + step_L) / 2 of its value per element instead of
// step_L / 2. With L == H demotion keeps the code as it is, so the store reads exactly like the
// plain int<L>:g<G>:tok codec. H-bit rows live in slots that demoted tokens free and new tokens
// reuse; L-bit rows are appended: stored_bytes() is exactly codec_stored_bits(spec, d, size()).
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
  // Whether the token at `position` is held at H bits now.
  bool is_high(int64_t position) const { return where_[position].high; }
  int64_t high_count() const;
  // Tokens re-quantized from H to L bits so far (at the window edge or later).
  int64_t demotions() const { return demotions_; }

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
    bool high;
    int32_t slot;
  };

  int32_t store_row(Pool& pool, const float* x);
  void decode(const Pool& pool, int32_t slot, float* out) const;
  void decode(int64_t position, float* out) const;
  double score(int64_t position) const;
  void demote(int64_t position);

  CodecSpec spec_;
  ValuePolicySpec policy_;
  int64_t dim_, group_, groups_;
  Pool high_, low_;
  std::vector<Where> where_;
  std::vector<int32_t> kept_;  // S: tokens outside the window still at H bits
  AttentionAccount account_;
  int64_t demotions_ = 0;
  std::vector<float> row_;  // append-time scratch (append is not const)
  std::vector<uint8_t> codes_;
};

}  // namespace visikv

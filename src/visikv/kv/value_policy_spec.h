// Value bit policies (METHODS.md, "Values"; docs/CACHE_SPECS.md, "Value policies"): a value codec
// that holds each token at one of two or three integer widths, chosen online from the attention
// the token has received. The spec grammar:
//
//   <rule>:int<L>[/int<M>]/int<H>:g<G>[:w<W>]:avg<A>[:ramp][:fromfloat]
//
//   rule      a2       weight w_j = Σ_t Σ_heads a_{t,j}² (A²) times a modelled error drop
//             a2e      w_j times token j's own measured error drop (the readout error it causes)
//             a1       attention mass Σ_t Σ_heads a_{t,j} (A¹) times a modelled error drop
//             recency  keep the newest tokens (two widths only)
//             uniform  the plain codec int<A>:g<G>:tok at the budget's bits (no policy; A must
//                      be 2, 3, 4 or 8, and :w is not taken)
//   L, M, H   the code widths (2, 3, 4, 8; L <= H; with a middle width L < M < H and equal steps,
//             M - L = H - M, i.e. int2/int3/int4), per-token groups of G channels with an fp16
//             scale and zero each, as int<b>:g<G>:tok
//   W         new tokens stay at H bits while they are among the newest W (all but recency need
//             W >= 1)
//   A         the average code bits, a decimal with at most three fraction digits, L <= A <= H
//   ramp      the window grows with the budget: the newest W_n = min(W, max(1, floor(S_n / 2K)))
//             tokens (S_n below) are held at H instead of the newest W, so that the window never
//             takes more than half the budget and the first tokens are ranked like later ones
//             instead of all being demoted while the window alone holds the budget
//   fromfloat a control, not a codec: the store also holds every token's float value (32 d bits
//             per token, not in the reported bits) and demotions re-quantize it instead of the
//             token's current code, which measures what the repeated rounding costs
//
// Budget. The widths are levels 0 (L) .. K (H), K = 1 or 2, one step s = (H - L) / K bits apart.
// A token at level k holds k steps above L; the budget fixes the steps held by all tokens, the
// window included: after n appends exactly raised_steps(n) = (n <= W_n ? K n : max(K W_n, S_n))
// with S_n = floor((A - L) n / s) and W_n the window (W, or as under `ramp`). So the bits per
// value, scales and zeros included, are d (A + 32/G) whenever (A - L) n / s is an integer
// >= K W_n and at most that otherwise (n >= K W s / (A - L); under ramp from n >= 2).
// With two widths the raised steps are the H-bit tokens, ρ n with ρ = (A - L) / (H - L). Which
// tokens hold the steps is the policy's choice (kv/value_policy.h); the total is not, which is
// why three widths need equal steps: every demotion then frees exactly one step.
//
// The canonical spelling of a policy spec is the one above with every field present (":w0" for
// recency without a window; ":ramp" and ":fromfloat" only where set).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace visikv {

struct CodecSpec;

struct ValuePolicySpec {
  enum class Rule { Recency, A1, A2, A2E };
  Rule rule = Rule::A2;
  int middle_bits = 0;        // M, 0 for two widths (the codec's own `bits` is L)
  int high_bits = 0;          // H
  int64_t window = 0;         // W
  int64_t average_milli = 0;  // A in thousandths of a bit
  bool ramp = false;          // the window grows with the budget (see above)
  bool from_float = false;    // the fromfloat control (see above)

  // K: the steps from L to H (1, or 2 with a middle width).
  int steps() const { return middle_bits == 0 ? 1 : 2; }
  // The code width of level k = 0..steps(): L, (M,) H.
  int level_bits(int level, int low_bits) const {
    return level == 0 ? low_bits : level == steps() ? high_bits : middle_bits;
  }
  // s: the bits one step adds (0 when L == H).
  int step_bits(int low_bits) const { return (high_bits - low_bits) / steps(); }
  // The window W_n after `tokens` appends (see above): the newest W_n tokens are held at H.
  int64_t window_at(int64_t tokens, int low_bits) const;
  // Steps above L held by all tokens after `tokens` appends (see above), computed in integers;
  // with two widths, the tokens held at H bits.
  int64_t raised_steps(int64_t tokens, int low_bits) const;
  // "a2", "a2e", "a1", "recency".
  std::string rule_name() const;
  // "avg3", "avg2.5".
  std::string average_text() const;
};

// Whether `text` starts with a value-policy rule name (a2, a2e, a1, recency, uniform).
bool is_value_policy_spec(std::string_view text);

// Parses a value-policy spec into the codec spec it stands for: an integer per-token codec at L
// bits with `policy` set, or, for `uniform`, the plain codec int<A>:g<G>:tok. Throws
// visikv::Error naming the spec and the problem.
CodecSpec parse_value_policy_spec(std::string_view text);

}  // namespace visikv

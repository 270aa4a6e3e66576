// Value bit policies (METHODS.md, "Values"; docs/CACHE_SPECS.md, "Value policies"): a value codec
// that holds each token at one of two integer widths, chosen online from the attention the token
// has received. The spec grammar:
//
//   <rule>:int<L>/int<H>:g<G>[:w<W>]:avg<A>
//
//   rule      a2       keep the tokens with the largest w_j = Σ_t Σ_heads a_{t,j}² (A²)
//             a1       keep the tokens with the largest attention mass Σ_t Σ_heads a_{t,j} (A¹)
//             recency  keep the newest tokens
//             uniform  the plain codec int<A>:g<G>:tok at the budget's bits (no policy; A must
//                      be 2, 3, 4 or 8, and :w is not taken)
//   L, H      the low and high code widths (2, 3, 4, 8; L <= H), per-token groups of G channels
//             with an fp16 scale and zero each, as int<b>:g<G>:tok
//   W         new tokens stay at H bits while they are among the newest W (a1 and a2 need W >= 1)
//   A         the average code bits, a decimal with at most three fraction digits, L <= A <= H
//
// The fraction of tokens held at H bits is ρ = (A - L) / (H - L), the window included: after n
// appends exactly high_tokens(n) = (n <= W ? n : max(W, floor(ρ n))) are high, so the bits per
// value, scales and zeros included, are d (A + 32/G) whenever ρ n is an integer >= W and at most
// that otherwise (n >= W / ρ). The canonical spelling of a policy spec is the one above with
// every field present (":w0" for recency without a window).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace visikv {

struct CodecSpec;

struct ValuePolicySpec {
  enum class Rule { Recency, A1, A2 };
  Rule rule = Rule::A2;
  int high_bits = 0;          // H (the codec's own `bits` is L)
  int64_t window = 0;         // W
  int64_t average_milli = 0;  // A in thousandths of a bit

  // Tokens held at H bits after `tokens` appends (see above), computed in integers.
  int64_t high_tokens(int64_t tokens, int low_bits) const;
  // "a2", "a1", "recency".
  std::string rule_name() const;
  // "avg3", "avg2.5".
  std::string average_text() const;
};

// Whether `text` starts with a value-policy rule name (a2, a1, recency, uniform).
bool is_value_policy_spec(std::string_view text);

// Parses a value-policy spec into the codec spec it stands for: an integer per-token codec at L
// bits with `policy` set, or, for `uniform`, the plain codec int<A>:g<G>:tok. Throws
// visikv::Error naming the spec and the problem.
CodecSpec parse_value_policy_spec(std::string_view text);

}  // namespace visikv

// Cache codec specs: one readable string says how one side (keys or values) of a KV cache is
// stored. docs/CACHE_SPECS.md is the full reference; in short:
//
//   f32 | f16 | bf16                       dense (fp32 and fp16 are accepted spellings)
//   int<b>:g<G>:tok[:r<R>]                 per-token groups: G consecutive channels of one token
//                                          share an fp16 scale and zero point
//   int<b>:g<G>:chan[:r<R>]                per-channel groups (KIVI): G consecutive tokens of one
//                                          channel share an fp16 scale and zero point
//   ...[:had]                              Hadamard rotation before storing (any of the above)
//   <int spec>+headq:r<r>:s<b>[:wrongsign][:random|:keypca]
//                                          keys only: HeadQ side code (kv/headq.h) of r numbers
//                                          at b bits (2, 3, 4, 8; 16 = fp16, 32 = float32
//                                          values) in a calibrated query basis
//   <rule>:int<L>/int<H>:g<G>[:w<W>]:avg<A>
//                                          values only: a value bit policy (kv/value_policy_spec.h)
//   qbasis:b<B>:g<G>:tok|chan[:r<R>][:random|:keypca|:weighted][:iid|:fisher]
//                                          keys only: query-basis quantization (kv/qbasis.h) at
//                                          B bits per channel, scales and zeros included
//
// b is 2, 3, 4 or 8. `:r<R>` keeps the most recent R tokens in fp16 (for `chan`, also the current
// partial group of fewer than G tokens, which always stays fp16 until the group is complete).
// `:had` multiplies every stored vector by a fixed orthonormal matrix H = W·S/sqrt(d) (W the
// Walsh-Hadamard matrix, S a seeded random ±1 diagonal); scores use q·k = (Hq)·(Hk) and value
// sums are rotated back, so the rotation changes only where the quantization error falls.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "visikv/kv/dense_format.h"
#include "visikv/kv/value_policy_spec.h"

namespace visikv {

// The HeadQ side code added to an integer key codec (METHODS.md, HeadQ): the base quantizer's
// residual e = k - k̂, projected on r basis vectors, stored at `bits` bits per number with one
// fp16 scale and zero per key (2, 3, 4, 8 bits), or as fp16 (16) or float32 (32) numbers
// without scale. Scores add sign · (U_rᵀ q)·ĉ.
struct HeadqSpec {
  enum class Basis {
    Query,   // top-r eigenvectors of E[q qᵀ] from the basis file (HeadQ proper)
    Random,  // seeded random orthonormal basis (control)
    KeyPca,  // top-r eigenvectors of E[k kᵀ] from the basis file (control)
  };
  int64_t rank = 0;
  int bits = 0;
  Basis basis = Basis::Query;
  bool wrong_sign = false;  // control: subtract the correction

  bool quantized() const { return bits <= 8; }
  // Side-code bits per key per head: r·b plus one fp16 scale and zero (32 bits) when quantized.
  int64_t bits_per_vector() const { return rank * bits + (quantized() ? 32 : 0); }
  std::string text() const;  // "headq:r8:s4:wrongsign"
};

// Query-basis key quantization (kv/qbasis.h, docs/KEY_QUANTIZATION.md): each key is rotated into
// its KV head's calibrated query eigenbasis and each direction gets its own bit width from
// reverse water-filling on (query energy) x (key variance), zero bits where the queries barely
// look. The budget is bits per key channel with every scale and zero counted; the store holds
// exactly budget·d bits per key (what the allocation leaves unused is padding).
struct QBasisSpec {
  enum class Basis {
    Query,   // eigenvectors of E[q qᵀ] (the method)
    Random,  // seeded random orthonormal basis, bits by the same rule (control)
    KeyPca,  // eigenvectors of E[k kᵀ], bits by the same rule (control)
    // The key PCA of Σ_q^{1/2} k (`:weighted`): the transform that diagonalizes the expected
    // squared score error and the key covariance together, not orthonormal
    // (docs/KEY_QUANTIZATION.md, "Which basis").
    Weighted,
  };
  static constexpr int64_t kBases = 4;
  int64_t budget_milli = 0;  // bits per key channel x 1000 ("b2.5" -> 2500)
  Basis basis = Basis::Query;
  // `:iid` (control): per-channel groups allocate as if a direction's values in a group of G tokens
  // were independent draws of its whole spread (range² / 12 = κ(G) σ²), ignoring the calibrated
  // within-group spread (docs/KEY_QUANTIZATION.md, "Within-group spread").
  bool iid_groups = false;
  // `:fisher`: per-channel groups allocate by the attention-weighted score error of coding each
  // direction, measured at calibration with the model's own queries and attention
  // (docs/KEY_QUANTIZATION.md, "Fisher-measured allocation").
  bool fisher = false;

  double budget() const { return static_cast<double>(budget_milli) / 1000.0; }
  std::string budget_text() const;  // "b2.5"
};

struct CodecSpec {
  enum class Kind { Dense, Int, QBasis };
  // Tokens: a group is G channels of one token. Channels: a group is G tokens of one channel.
  enum class Axis { Tokens, Channels };

  Kind kind = Kind::Dense;
  DenseFormat dense = DenseFormat::F32;  // Kind::Dense only
  Axis axis = Axis::Tokens;              // Kind::Int and Kind::QBasis
  int bits = 0;                          // Kind::Int: 2, 3, 4 or 8
  int64_t group = 0;                     // Kind::Int: G; Kind::QBasis: directions (tok) or tokens
  int64_t window = 0;                    // R, most recent tokens kept in fp16
  std::optional<QBasisSpec> qbasis;      // Kind::QBasis (keys only)
  bool hadamard = false;
  std::optional<HeadqSpec> headq;  // Kind::Int keys only
  // Kind::Int values only: per-token groups whose tokens are held at `bits` (L),
  // policy->middle_bits (M, when set) or policy->high_bits (H) bits (kv/value_policy.h). No window
  // (`window` is 0) and no rotation.
  std::optional<ValuePolicySpec> policy;

  bool is_dense() const { return kind == Kind::Dense; }
  bool is_qbasis() const { return kind == Kind::QBasis; }
  // Tokens quantized together: 1 for per-token groups, G for per-channel groups.
  int64_t token_group() const { return axis == Axis::Tokens ? 1 : group; }
  // The canonical spelling, e.g. "int2:g32:chan:r128:had", "int2:g64:tok+headq:r8:s4".
  std::string text() const;
};

// Parses a spec; throws visikv::Error naming the spec and the problem.
CodecSpec parse_codec_spec(std::string_view text);

// A codec for the key side of a cache: any spec but a value bit policy. Evaluations take keys in
// this form, so an option of the other side fails where the text is read, before any model time.
struct KeyCodecSpec {
  CodecSpec codec;  // f32 by default
  std::string text() const { return codec.text(); }
};

// A codec for the value side of a cache: any spec but one with a HeadQ side code or a
// query-basis key codec.
struct ValueCodecSpec {
  CodecSpec codec;  // f32 by default
  std::string text() const { return codec.text(); }
};

// Parse a spec for one side; throw visikv::Error naming the spec and the option that belongs to
// the other side (e.g. "key codec 'a2:...': the value bit policy 'a2' is for values only").
KeyCodecSpec parse_key_codec_spec(std::string_view text);
ValueCodecSpec parse_value_codec_spec(std::string_view text);
// The same checks for a spec built in code.
KeyCodecSpec key_codec_spec(CodecSpec spec);
ValueCodecSpec value_codec_spec(CodecSpec spec);

// Throws visikv::Error when the spec cannot store vectors of `head_dim` channels (integer codecs
// need head_dim % 8 == 0, per-token groups need G to divide head_dim, `:had` needs a power of
// two, a HeadQ rank must not exceed head_dim, a query-basis budget B·head_dim must be a whole
// number of bits per key).
void check_codec_fits(const CodecSpec& spec, int64_t head_dim);

// Bits one side of one KV head costs. The quantized part is exact: codes plus the fp16 scale and
// zero of each group, amortised over the group's elements. The fp16 window is the steady-state
// exception and is reported separately: after n >= window_max_tokens appends, between
// window_min_tokens and window_max_tokens of the most recent tokens are held at
// window_bits_per_element (exactly window_min_tokens for per-token groups).
struct CodecBits {
  double bits_per_element = 0;      // quantized (or dense) part, HeadQ side code included
  double bits_per_vector = 0;       // head_dim * bits_per_element: bits per key (or value) per head
  double side_bits_per_vector = 0;  // of which the HeadQ side code (r·b_s + scale and zero)
  int64_t window_min_tokens = 0, window_max_tokens = 0;
  double window_bits_per_element = 16;
};

CodecBits codec_bits(const CodecSpec& spec, int64_t head_dim);

// Tokens of `tokens` appended that are held in quantized form (the rest are in the fp16 window).
int64_t quantized_tokens(const CodecSpec& spec, int64_t tokens);

// Exact bits held for `tokens` appended vectors of one head: codes, scales and zeros, and the
// fp16 window, and the HeadQ side codes of the quantized tokens.
int64_t codec_stored_bits(const CodecSpec& spec, int64_t head_dim, int64_t tokens);

// "int2:g64:tok (2.5 bits/elt)", "int2:g32:chan:r128 (3 bits/elt; 128-159 newest tokens f16)".
std::string describe_codec(const CodecSpec& spec, int64_t head_dim);

}  // namespace visikv

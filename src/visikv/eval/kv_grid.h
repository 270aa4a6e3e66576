// The HeadQ paper's K-only decode-perplexity grid (METHODS.md, "K-only decode perplexity"):
// every row is one decode-order perplexity run (each key quantized when written, every query
// reading the stored form as it stands after its own token's append) over the same tokens,
// differing only in the key and value codecs. By default the runs use the decode-batched mode
// (eval/perplexity.h); PerplexityMode::Decode is the token-by-token reference.
//
// The rows, for head dimension d (names are what `visikv eval kv --rows` accepts):
//
//   dense                       f32 keys and values (the reference)
//   k<b>-tok                    int<b>:g<Gt>:tok keys, b = 2, 3, 4; Gt = 64, or the largest
//                               divisor of d below 64 that is a multiple of 8 when 64 does not
//                               divide d
//   k<b>-chan                   int<b>:g32:chan:r128 keys (KIVI-style: 32-token groups per
//                               channel, the newest 128..159 tokens in fp16)
//   k2-<axis>+hq-r<r>           the 2-bit row plus the HeadQ side code at rank r, 4 bits
//   k2-<axis>+hq-r<c>-wrongsign the controls at the control rank c (8 when 8 is among the ranks,
//   k2-<axis>+hq-r<c>-random    else the largest rank): subtracted correction, seeded random
//   k2-<axis>+hq-r<c>-keypca    basis, key-PCA basis
//   budget-<axis>-r<r>          the same-budget plain quantizer of k2-<axis>+hq-r<r>: the plain
//                               integer codec on the same axis (and, for chan, the same fp16
//                               window) with the most bits per key that do not exceed HeadQ's;
//                               ties go to the wider code (int3:g32 over int2:g16: the stronger
//                               baseline). Candidates: b in {2, 3, 4, 8}, G in {8, 16, ..., 256}
//                               (dividing d for tok). For d = 64 this is exact at r8 (int3:g64:tok,
//                               224 bits) and r16 (int3:g32:tok, 256 bits) and 16 bits short at r4
//                               (int2:g32:tok, 192 of 208 bits).
//   v-int2, v-int4              values only (f32 keys): plain int2:g<Gt>:tok, int4:g<Gt>:tok
//   v3-uniform                  values only at 3 code bits on average (3 + 32/Gt bits per
//   v3-recency                  element, scales included): plain int3:g<Gt>:tok, and the value
//   v3-a1                       bit policies (kv/value_policy.h, METHODS.md "Values") over
//   v3-a2                       int2/int4 with the newest 64 tokens at int4, keeping the newest
//                               tokens, the largest attention mass A¹, or the largest A² w_j
//                               high: <rule>:int2/int4:g<Gt>:w64:avg3
//   v3-a2-3lvl                  values only at 3 code bits on average, the readout-error
//   v3-a2e                      policies: A² weight times a modelled error drop over
//   v3-a2e-3lvl                 int2/int3/int4, A² weight times each token's measured error drop
//                               over int2/int4 and over int2/int3/int4 (newest 64 at int4)
//   v3-<policy>-fromfloat       controls for v3-a2 and the three rows above: the same policy with
//                               demotions re-quantizing the float values, held beside the codes
//                               and not counted (<spec>:fromfloat), which measures what the
//                               repeated rounding of demoted tokens costs
//   v<A>-<policy>-ramp          for A = 3 and 2.5: v<A>-a2 and the three rows above with the
//                               window growing with the budget (<spec>:ramp): the newest
//                               min(64, half the budget's steps / K) tokens at int4
//   v2.5-plain                  values only at 2.5 code bits on average (d·(2.5 + 32/Gt) bits,
//   v2.5-a2                     192 at d = 64): the plain per-token codec of the most bits not
//   v2.5-a2-3lvl                above it (int2:g32:tok at d = 64; absent when that is v-int2's
//                               codec), the two-width A² policy, and
//   v2.5-a2e                    the three readout-error policies above at that budget
//   v2.5-a2e-3lvl
//   kv2-<axis>                  full KV at 2 bits: the 2-bit key row with int2:g<Gt>:tok values
//   kv2-<axis>+hq-r<c>          the same with HeadQ keys at the control rank
//   kv2-<axis>+hq-r<c>+a2       HeadQ keys with A² values a2:int2/int4:g<Gt>:w64:avg2.5 (d·(2.5 +
//                               32/Gt) bits per value: 192 at d = 64)
//   kv2-<axis>+hq-r<c>+v<bits>  HeadQ keys with the plain per-token value codec of the most bits
//                               per value not above the A² row's (int2:g32:tok, 192, at d = 64;
//                               absent when that is int2:g<Gt>:tok, the plain row's values)
//
// Values stay f32 in every row but the v and kv2 rows. The value policies rank tokens by the
// attention they receive in decode order; decode-batched runs them with attention token by token
// inside each chunk (model/decoder.h, decode_order_chunk). "Excess PPL removed" is (PPL_base -
// PPL_row) / (PPL_base - PPL_dense) for the HeadQ rows (controls included) against their base row
// (k2-<axis>, or kv2-<axis> for the composition rows, whatever their values); other rows have none.
//
// Every row but the dense one is also compared position by position with the dense row's model
// (PerplexityOptions::reference: KL(dense || row) of the next-token distribution, its 99th
// percentile and the top-1 agreement). The dense row is the reference itself and has none.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/eval/perplexity.h"
#include "visikv/kv/codec_spec.h"

namespace visikv {

struct HeadqBasis;
class Decoder;

enum class KvGridRowKind {
  Dense,
  Plain,
  Headq,
  Control,
  SameBudget,
  Values,       // f32 keys, plain integer values
  ValuePolicy,  // f32 keys, values at an average budget: uniform or a value bit policy
  FullKv,
  FullKvHeadq,
  FullKvHeadqValues,  // HeadQ keys with A2 values or plain values of the same bits
};

struct KvGridRow {
  std::string name;  // unique, as `--rows` takes it
  KvGridRowKind kind = KvGridRowKind::Dense;
  KeyCodecSpec key_codec;      // docs/CACHE_SPECS.md; tables show the canonical text
  ValueCodecSpec value_codec;  //
  std::string base;            // HeadQ rows: the row their excess removed is measured against
  std::string note;            // e.g. the budget a same-budget row matches
  NamedSelectorSpec selector;  // attention selector (docs/SELECTOR_SPECS.md), dense by default
};

struct KvGridSpec {
  std::vector<int64_t> ranks = {4, 8, 16};  // HeadQ ranks of the main rows
  int side_bits = 4;                        // bits per side-code number
};

// Per-token group size: `largest` channels (64, the paper's setting), or the largest multiple of 8
// below it that divides d (codes are packed 8 at a time, so d % 8 == 0 is needed anyway). Throws
// visikv::Error when none does.
int64_t token_group(int64_t head_dim, int64_t largest = 64);

// The rank of the controls and of the full-KV composition: 8 when listed, else the largest.
int64_t kv_grid_control_rank(const KvGridSpec& spec);

// Every row of the grid for heads of `head_dim` channels, in table order. Throws visikv::Error
// for an empty rank list, a rank outside 1..head_dim, or side bits other than 2, 3, 4, 8.
std::vector<KvGridRow> kv_grid_rows(int64_t head_dim, const KvGridSpec& spec);

// The rows named in `names` (in table order), plus what their figures need: the dense row and
// the base row of each HeadQ row. Throws visikv::Error naming an unknown row and listing the
// known ones. Empty `names`: every row.
std::vector<KvGridRow> select_kv_grid_rows(const std::vector<KvGridRow>& rows,
                                           const std::vector<std::string>& names);

// The basis rank the rows need from a calibrated basis (query or key PCA; the random HeadQ
// control needs none; a query-basis key codec, any of its bases, needs all `head_dim` vectors);
// 0 when no row needs one.
int64_t kv_grid_basis_rank(const std::vector<KvGridRow>& rows, int64_t head_dim = 0);

// `rows` followed by one row per key codec of `key_codecs` (`visikv eval kv --keys`): the codec
// with f32 values, named by its canonical spec. Throws visikv::Error for a name given twice.
std::vector<KvGridRow> with_key_codec_rows(std::vector<KvGridRow> rows,
                                           const std::vector<KeyCodecSpec>& key_codecs);

// The plain codec (same axis, same fp16 window as `base`) with the most bits per key not above
// `budget_bits` (ties: more code bits); std::nullopt when none fits.
std::optional<CodecSpec> same_budget_codec(const CodecSpec& base, double budget_bits,
                                           int64_t head_dim);

// The K-only sparse decode-perplexity grid (`visikv eval sparse-ppl`; METHODS.md "K-only decode
// perplexity" with a selector): "dense" (f32 keys and values, dense attention), then each selector
// with f32 keys (row named by its spec), then for each key codec the codec with dense attention
// (named by its canonical spec) and with each selector ("<codec> + <selector>"). Values stay
// f32. Throws visikv::Error for a row given twice.
std::vector<KvGridRow> kv_grid_sparse_rows(const std::vector<NamedSelectorSpec>& selectors,
                                           const std::vector<KeyCodecSpec>& key_codecs);

struct KvGridOptions {
  PerplexityMode mode = PerplexityMode::DecodeBatched;  // Decode or DecodeBatched
  int64_t window = 1024;                                // tokens per window (BOS included)
  int64_t max_tokens = 0;                               // scored tokens; 0: the whole text
  std::optional<int32_t> bos;
};

struct KvGridResult {
  KvGridRow row;
  CodecBits key_bits, value_bits;  // per key (value) per head
  PerplexityResult ppl;            // with `divergence` from the dense row, except for dense itself
  std::optional<double> excess_removed;  // HeadQ rows only (and only when the base differs)
  double delta_ppl = 0;                  // PPL - PPL_dense
  // The earlier row with the same key codec, value codec and selector whose run this row
  // reports (computed once, reported twice); empty when this row had its own run.
  std::string same_run_as;
};

// progress(run index from 0, runs, row, tokens scored so far, tokens to score). Rows with the
// same key and value codecs and selector run once.
using KvGridProgress = std::function<void(int64_t run, int64_t runs, const KvGridRow& row,
                                          int64_t done, int64_t total)>;

// The runs run_kv_grid makes for `rows`: rows with the same key codec, value codec and selector
// share one.
int64_t kv_grid_run_count(const std::vector<KvGridRow>& rows);

// Lets a caller keep finished runs across invocations (`--resume`) and save rows as they finish.
struct KvGridJournal {
  // The result of a run kept from an earlier invocation, asked for with the first row that has
  // the run; std::nullopt runs it.
  std::function<std::optional<PerplexityResult>(const KvGridRow& row)> kept;
  // After each run, kept or new: every row whose figures are complete so far, in table order.
  std::function<void(const std::vector<KvGridResult>& rows)> finished;
};

// Runs the rows in decode mode over `text_tokens` (no BOS; PerplexityOptions protocol). `basis`
// may be null when no row needs one. The rows must include "dense" and every HeadQ row's base
// (select_kv_grid_rows sees to it). Runs go in table order, dense first.
std::vector<KvGridResult> run_kv_grid(Decoder& decoder, std::span<const int32_t> text_tokens,
                                      const std::vector<KvGridRow>& rows,
                                      const KvGridOptions& options, const HeadqBasis* basis,
                                      const KvGridProgress& progress = {},
                                      const KvGridJournal& journal = {});

}  // namespace visikv

// Selector specs: the text that names a sparse-attention support rule (Condensate-style anchors +
// window + dynamic positions, or the certified mode), parsed once and checked for sense.
//
// Grammar (fields after the kind are separated by ':' and may come in any order, each once):
//
//   spec      := "dense"
//              | "sparse"    { ":" field }
//              | "certified" { ":" field }
//   field     := "a" INT      anchors: positions 0..A-1 (default 0)
//              | "w" INT      window: the last W positions up to and including the query
//                             (default 0)
//              | "k" INT      dynamic positions (sparse only; >= 1; needs a rule)
//              | "b" INT      summary block size (>= 1); must equal the cache's block size,
//                             defaults to it (block rules and certified only)
//              | "exact"      rule: the k highest scores among all candidates (reads every score);
//                             with certified: every candidate scored, the bound is exact and only
//                             the values of the certified support are read
//              | "centroid"   rule: ceil(k/B) blocks ranked by the centroid score q·c_b
//              | "bound"      rule: ceil(k/B) blocks ranked by the Quest-style upper bound
//                             u_b = scale * sum_c max(q_c m_{b,c}, q_c M_{b,c})
//              | "gqa=shared" one dynamic choice per KV head, pooled over its query heads by the
//                             max of the per-head scores / bounds (default)
//              | "gqa=head"   one dynamic choice per query head
//              | "r" INT      refresh: a decode step re-chooses every R positions and reuses the
//                             previous choice in between (sparse only; >= 1; default 1)
//              | "eps" REAL   certified only, required, 0 < eps < 1: add blocks in decreasing u_b
//                             until the bound on the dropped attention mass is <= eps
//              | "p" INT      position sketches (certified only; 2..8 bits): instead of block
//                             bounds, bound every candidate's score from a BITS-bit sketch of
//                             its key and read the positions whose bounds could matter
//              | "q" INT      query frame (certified and the bound rule; >= 1): u_b is also
//                             bounded in the top-Q calibrated query directions of the head
//                             plus a residual term, and the smaller bound is used; the cache
//                             must keep summaries in that frame (KVCache::set_summary_frames)
//
// Examples: "sparse:a1:w64:k32:exact", "sparse:a1:w64:k32:b16:centroid:gqa=head:r8",
// "certified:a1:w64:b16:eps0.01".
//
// Sizes larger than the context are clamped, never an error: the support is always a subset of
// the positions the model lets the query see, and when anchors + window + k cover them all the
// support is the whole visible range (dense attention).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace visikv {

enum class SelectorKind { Dense, Sparse, Certified };
enum class SelectorRule { None, Exact, Centroid, Bound };
enum class GqaChoice { Shared, PerHead };

struct SelectorSpec {
  SelectorKind kind = SelectorKind::Dense;
  SelectorRule rule = SelectorRule::None;
  GqaChoice gqa = GqaChoice::Shared;
  int64_t anchors = 0;
  int64_t window = 0;
  int64_t top_k = 0;       // dynamic positions (sparse with a rule)
  int64_t block_size = 0;  // 0: the cache's
  int64_t refresh = 1;
  double epsilon = 0;       // certified
  int64_t frame_rank = 0;   // q: query directions of the summary frame (0: none)
  int64_t sketch_bits = 0;  // p: bits of the position sketches (0: none)

  // The block size a cache keeps its summaries at for this selector: its own, else 32.
  int64_t cache_block_size() const { return block_size > 0 ? block_size : 32; }

  bool uses_blocks() const {
    return (kind == SelectorKind::Certified && rule != SelectorRule::Exact) ||
           rule == SelectorRule::Centroid || rule == SelectorRule::Bound;
  }
};

// Throws visikv::Error naming the offending field for unknown names, repeated fields, missing or
// out-of-range numbers and fields that do not belong to the kind.
SelectorSpec parse_selector_spec(std::string_view text);

// The canonical text of a spec (every field spelled out), parseable again.
std::string describe(const SelectorSpec& spec);

// A selector with the text it was given as: tables and JSON name rows by that text.
struct NamedSelectorSpec {
  std::string text = "dense";
  SelectorSpec spec;
};

inline NamedSelectorSpec parse_named_selector_spec(std::string_view text) {
  return {std::string(text), parse_selector_spec(text)};
}

}  // namespace visikv

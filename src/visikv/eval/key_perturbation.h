// Key specs of `visikv analyze`: any cache key codec (docs/CACHE_SPECS.md), or one of the two
// controls of METHODS.md "HeadQ" that say what key MSE misses (grammar in docs/CACHE_SPECS.md,
// "Analysis controls"):
//
//   null[:a<A>]          null-space intervention (control 4): every key k_j gets a perturbation
//                        p_j of length A·||k_j|| (default A = 1) in a seeded random direction
//                        orthogonal to the query span of its head: large key MSE, while a query
//                        inside the span sees exactly the same scores.
//   span:query:<codec>   same-budget counterexample (control 5): the key error e_j of <codec> (an
//   span:null:<codec>    integer cache codec, as stored once every token is written) keeps its
//                        length per key, so both have the key MSE of <codec>, but points in a
//                        seeded random direction inside the query span (`query`: large F) or
//                        orthogonal to it (`null`: F near 0).
//
// The query span of a head is spanned by the fewest top eigenvectors of its calibrated query
// second moment E[q qᵀ] (calibration/headq_basis.h: HeadqBasis) whose eigenvalues hold at least a fraction
// `energy` (default 0.999) of the total, m of the d dimensions; where m = d the orthogonal side
// is the last eigenvector (the span is cut to d - 1), so that every key is perturbed and moved
// errors keep their length. Perturbed keys are stored in f32.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/kv/codec_spec.h"

namespace visikv {

struct HeadqBasis;

struct AnalyzeKeySpec {
  enum class Kind { Codec, NullSpace, SpanMoved };
  enum class Target { QuerySpan, NullSpace };  // SpanMoved: where the moved error points

  Kind kind = Kind::Codec;
  CodecSpec codec;       // Codec: the cache codec; SpanMoved: the codec whose error is moved
  double amplitude = 1;  // NullSpace: ||p_j|| / ||k_j||
  Target target = Target::QuerySpan;

  // Canonical spelling: "int2:g64:tok", "null:a1", "span:query:int2:g64:tok".
  std::string text() const;
  // Whether it reads a calibrated basis (the controls, and HeadQ codecs on a calibrated basis).
  bool needs_basis() const;
  // The rank a basis must hold for it, given the basis's eigenvalues: for the controls the
  // largest query-span rank over all heads, for a HeadQ codec its rank; 0 if none.
  int64_t needed_rank(const HeadqBasis& basis, double energy) const;
};

// Throws visikv::Error naming the spec and the problem.
AnalyzeKeySpec parse_analyze_key_spec(std::string_view text);

// The fewest leading eigenvalues (given in descending order) whose sum reaches `energy` of the
// total; eigenvalues below 0 (rounding) count as 0. Throws for energy outside (0, 1].
int64_t query_span_rank(std::span<const double> eigenvalues, double energy);

// x minus its projection on the orthonormal rows {m, d} (complement = true), or that projection
// (complement = false), in double.
std::vector<double> project_span(std::span<const double> rows, std::span<const double> x,
                                 bool complement);

// A seeded random unit vector of `rows`' span (or of its orthogonal complement), the same on
// every run for the same seed; all zeros when that space is {0}.
std::vector<double> random_unit_in_span(std::span<const double> rows, int64_t dim, bool complement,
                                        uint64_t seed);

// The seed of the control perturbation of one key.
uint64_t key_perturbation_seed(int64_t layer, int64_t kv_head, int64_t position);

// The keys of one layer ({tokens, kv_heads, d}) as the control `spec` (NullSpace or SpanMoved)
// stores them. `base_errors`: for SpanMoved, the base codec's key errors e_j = k_j - k̂_j in the
// same layout (ignored otherwise). `span_ranks`, when set, receives the query-span rank used for
// each KV head (at most d - 1 on the orthogonal side). Throws visikv::Error when the basis holds
// fewer vectors than a head's span needs.
std::vector<float> perturbed_keys(const AnalyzeKeySpec& spec, std::span<const float> keys,
                                  std::span<const float> base_errors, int64_t kv_heads,
                                  int64_t head_dim, int64_t layer, const HeadqBasis& basis,
                                  double energy, std::vector<int64_t>* span_ranks = nullptr);

}  // namespace visikv

#include "visikv/attention/support_certified.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "visikv/attention/attention.h"
#include "visikv/attention/block_bounds.h"
#include "visikv/attention/sketch_kernels.h"
#include "visikv/attention/support_parts.h"

namespace visikv {

void CertifiedSupport::prepare(const KVCache& cache, const AttentionSpec& attention) {
  Support::prepare(cache, attention);
  block_ = cache.block_size();
}

// With S the support, m any reference score, Z_S = sum_{j in S} exp(s_j - m) and
// Ẑ = sum over candidate blocks b not chosen of |b ∩ C| exp(u_b - m), where every unselected
// position j of block b has s_j <= u_b (block_upper_bound), so the true unselected mass
// Z_out = sum_{j not in S} exp(s_j - m) <= Ẑ.
//
// Claim: ||o_S - o|| <= 2 δ max_j ||v_j|| with δ = Ẑ / (Z_S + Ẑ).
// Proof. The dropped fraction ρ = Z_out / (Z_S + Z_out) <= δ, since x / (Z_S + x) grows with x.
// For j in S the dense weight is a_j = exp(s_j - m) / (Z_S + Z_out) = (1 - ρ) a^S_j, with a^S the
// softmax restricted to S, whose output is o_S = sum_{j in S} a^S_j v_j. Then
//   o = (1 - ρ) o_S + sum_{j not in S} a_j v_j,   so   o_S - o = ρ o_S - sum_{j not in S} a_j v_j,
// and, as o_S is a convex combination of values and sum_{j not in S} a_j = ρ,
//   ||o_S - o|| <= ρ ||o_S|| + ρ max_j ||v_j|| <= 2 ρ max_j ||v_j|| <= 2 δ max_j ||v_j||.  ∎
//
// Blocks are added in decreasing pooled u_b (max over the slot's queries) until every query of
// the slot has δ <= ε; the support is anchors ∪ chosen blocks' candidate parts ∪ tail, so a block
// partly covered by anchors or the tail is counted in Ẑ only for its positions inside C. m is the
// largest of the known scores and bounds, so every exp() is <= 1 (no overflow); Ẑ is a suffix
// sum in increasing order of the terms (no cancellation).
ChosenSupport CertifiedSupport::choose(const SupportQuery& query, SupportScratch& scratch,
                                       SparseQueryStats& stats) {
  if (spec().rule == SelectorRule::Exact) return choose_scored(query, scratch, stats);
  if (chooses_from_sketches()) return choose_in_steps(query, scratch, stats);
  const int64_t group = query.group, block = block_;
  const Region r = make_region(query.position, query.model_window, spec(), block);
  // Raw scores of the fixed part (anchors and tail), scaled exactly as the attention scales them.
  score_fixed_part(query, r, scratch);
  const int64_t fixed = static_cast<int64_t>(scratch.fixed.size());
  const double scale = query.scale;
  const auto scaled = [scale](float raw) { return static_cast<float>(raw * scale); };

  const BlockRange blocks = candidate_blocks(r, block);
  const int64_t nb = blocks.count;
  scratch.bounds.resize(static_cast<size_t>(nb * group));
  scratch.ranking.resize(static_cast<size_t>(nb));
  scratch.reference.assign(static_cast<size_t>(group), -INFINITY);  // m per query
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      scratch.reference[g] =
          std::max<double>(scratch.reference[g], scaled(scratch.fixed_scores[g * fixed + i]));
  if (nb > 0)
    block_upper_bounds(query.cache.summaries(query.layer, query.kv_head), blocks.first, nb,
                       query.queries, scale, scratch.bounds, spec().frame_rank > 0);
  for (int64_t b = 0; b < nb; ++b) {
    double best = -INFINITY;
    for (int64_t g = 0; g < group; ++g) {
      const double u = scratch.bounds[b * group + g];
      scratch.reference[g] = std::max(scratch.reference[g], u);
      best = std::max(best, u);
    }
    scratch.ranking[b] = best;
  }
  stats.summaries_read = nb;

  // Blocks in the order they would be added: decreasing pooled bound, ties to the lower block.
  scratch.order.resize(static_cast<size_t>(nb));
  std::iota(scratch.order.begin(), scratch.order.end(), 0);
  std::sort(scratch.order.begin(), scratch.order.end(), [&](int32_t a, int32_t b) {
    return scratch.ranking[a] > scratch.ranking[b] ||
           (scratch.ranking[a] == scratch.ranking[b] && a < b);
  });
  // suffix[i * group + g]: Ẑ_g when the first i blocks of `order` have been read.
  scratch.suffix.assign(static_cast<size_t>((nb + 1) * group), 0.0);
  for (int64_t i = nb - 1; i >= 0; --i) {
    const int64_t b = scratch.order[i];
    const auto [begin, end] = block_part(r, blocks.first + b, block);
    for (int64_t g = 0; g < group; ++g)
      scratch.suffix[i * group + g] =
          scratch.suffix[(i + 1) * group + g] +
          static_cast<double>(end - begin) *
              std::exp(scratch.bounds[b * group + g] - scratch.reference[g]);
  }
  scratch.partition.assign(static_cast<size_t>(group), 0.0);  // Z_S per query
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      scratch.partition[g] +=
          std::exp(scaled(scratch.fixed_scores[g * fixed + i]) - scratch.reference[g]);

  const auto delta = [&](int64_t read, int64_t g) {
    const double rest = scratch.suffix[read * group + g];
    return rest > 0 ? rest / (scratch.partition[g] + rest) : 0.0;
  };
  // The raw scores of every block read, kept (column j - anchors_end) for the attention.
  const int64_t candidates = std::max<int64_t>(0, r.candidates());
  scratch.selection.resize(static_cast<size_t>(group * candidates));
  int64_t read = 0;
  for (; read < nb; ++read) {
    double worst = 0;
    for (int64_t g = 0; g < group; ++g) worst = std::max(worst, delta(read, g));
    if (worst <= spec().epsilon) break;
    const auto [begin, end] = block_part(r, blocks.first + scratch.order[read], block);
    const int64_t n = end - begin;
    scratch.block_scores.resize(static_cast<size_t>(group * n));
    query.cache.score(query.layer, query.kv_head, query.queries, PositionSet::range(begin, end),
                      scratch.block_scores);
    for (int64_t g = 0; g < group; ++g) {
      const float* raw = scratch.block_scores.data() + g * n;
      std::copy(raw, raw + n, scratch.selection.begin() + g * candidates + (begin - r.anchors_end));
      for (int64_t i = 0; i < n; ++i)
        scratch.partition[g] += std::exp(scaled(raw[i]) - scratch.reference[g]);
    }
  }
  for (int64_t g = 0; g < group; ++g) scratch.deltas[g] = delta(read, g);
  scratch.items.clear();
  for (int64_t i = 0; i < read; ++i)
    scratch.items.push_back(static_cast<int32_t>(blocks.first + scratch.order[i]));
  std::sort(scratch.items.begin(), scratch.items.end());
  stats.blocks_read = static_cast<int64_t>(scratch.items.size());
  const PositionSet support = build_support(r, true, block, scratch, stats.dynamic);
  gather_support_scores(r, support, group, scratch);
  return {support, true};
}

namespace {

// Position-bound buckets: width 1/8 nat below the largest bound, the last one open below.
constexpr double kBucketWidth = 0.125;
constexpr int64_t kBuckets = 320;
// The share of ε the unread candidates may take in the pooled cut (support_certified.cpp, the
// choice from position sketches), which bounds where the per-query cut is searched.
constexpr double kPooledShare = 0.5;

// exp(-k h) (an upper bound on exp(v) in bucket k) and exp(-(k + 1) h) (a lower bound; 0 for the
// open last bucket), each nudged outward past its own rounding.
struct BucketExps {
  double ceiling[kBuckets], floor[kBuckets];
  BucketExps() {
    for (int64_t k = 0; k < kBuckets; ++k) {
      ceiling[k] = std::exp(-static_cast<double>(k) * kBucketWidth) * (1 + 1e-12);
      floor[k] = k + 1 < kBuckets
                     ? std::exp(-static_cast<double>(k + 1) * kBucketWidth) * (1 - 1e-12)
                     : 0.0;
    }
  }
};
const BucketExps kBucketExps;

// A raw score scaled exactly as the attention scales it (in float), widened.
double scaled_score(float raw, double scale) {
  return static_cast<double>(static_cast<float>(raw * scale));
}

// Folds the fixed part's scaled scores into m_g (scratch.reference, which holds the candidates'
// largest score or bound) and sets scratch.partition to Z_fixed,g = sum exp(s - m_g).
void fold_fixed_part(int64_t group, double scale, SupportScratch& scratch) {
  const int64_t fixed = static_cast<int64_t>(scratch.fixed.size());
  std::vector<double>& m = scratch.reference;
  std::vector<double>& z = scratch.partition;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      m[g] = std::max(m[g], scaled_score(scratch.fixed_scores[g * fixed + i], scale));
  z.assign(static_cast<size_t>(group), 0.0);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      z[g] += std::exp(scaled_score(scratch.fixed_scores[g * fixed + i], scale) - m[g]);
}

}  // namespace

// Position sketches give every candidate j bounds l_jg <= s_jg <= u_jg on each query's scaled
// score (position_bounds). The claim and proof above hold with singleton "blocks":
// δ_g = Ẑ_g / (Z_S,g + Ẑ_g) for any Ẑ_g >= sum over unread candidates of exp(s_jg - m_g).
//
// With v_j = max_g (u_jg - m_g) and w_j = min_g (l_jg - m_g), candidate j falls in the pooled
// bucket k(v_j) (width h below 0), and the choice reads every candidate of the buckets above a
// cut (one list for all queries of the slot). First the pooled cut c0, with half of ε:
//   Ẑ(c) = sum_{k >= c} count_k exp(-k h) >= sum_{unread} exp(v_j) >= Ẑ_g, and
//   Zlow(c) = Z_fixed,g + sum_{j read} exp(-(k(w_j) + 1) h) <= Z_S,g,
// the first c with Ẑ <= ε/2 (Zlow + Ẑ) for every g. Then each query's own masses, for the
// candidates above c0 only (the rest stay in Ẑ(c0)): for c <= c0,
//   Ẑ_g(c) = Ẑ(c0) + sum_{j: c <= k(v_j) < c0} exp(-k(u_jg - m_g) h) >= sum_{unread} exp(s_jg -
//   m_g), Zlow_g(c) = Z_fixed,g + sum_{j: k(v_j) < c} exp(-(k(l_jg - m_g) + 1) h) <= Z_S,g,
// and the cut is the first c at which Ẑ_g(c) <= ε (Zlow_g(c) + Ẑ_g(c)) for every g (c0 always
// qualifies: Ẑ_g(c0) <= Ẑ(c0) and Zlow_g(c0) >= Zlow(c0)). That proves δ_g <= ε before any key is
// read; δ_g is reported with the exact Z_S,g of the support. Each query's own bounds matter
// because the queries of a KV head look at different keys: a key one query needs is far below
// the others' maxima, so the pooled v_j and w_j overstate the unread mass and understate the read
// mass (at 8K on the default model the per-query cut reads 40% fewer keys for the same values).
// Histograms replace sorting, and no exponential is taken per candidate.
//
// The steps (support.h): the bound pass and the scoring of the chosen keys run in parts (of
// positions at fixed multiples of kBoundPart, and of kKeyPart keys), whose bits do not depend on
// how the range is cut; the cut, which sums histograms, runs whole.
namespace {

enum SketchStep : int { kSetUp, kBounds, kCut, kScoreKeys, kSketchSteps };
constexpr int64_t kBoundPart = 2048;  // positions per part of the bound pass
constexpr int64_t kKeyPart = 1024;    // keys per part of the chosen keys' scoring

// The parts of the bound pass over the candidates of r: [max(begin, p K), min(end, (p + 1) K)).
int64_t first_bound_part(const Region& r) { return r.anchors_end / kBoundPart; }
// The parts of the scoring of `keys` chosen keys.
int64_t key_parts(int64_t keys) { return (keys + kKeyPart - 1) / kKeyPart; }
int64_t bound_parts(const Region& r) {
  return r.candidates() <= 0 ? 0 : (r.tail_begin - 1) / kBoundPart - first_bound_part(r) + 1;
}

}  // namespace

int CertifiedSupport::choice_steps() const { return chooses_from_sketches() ? kSketchSteps : 0; }

int64_t CertifiedSupport::choice_units(int step, const SupportQuery& query,
                                       const SupportScratch& scratch) const {
  if (step == kBounds) return bound_parts(region(query));
  if (step == kScoreKeys) return key_parts(static_cast<int64_t>(scratch.items.size()));
  return 1;
}

int64_t CertifiedSupport::most_choice_units(int step, const SupportQuery& query) const {
  const Region r = region(query);
  if (step == kBounds) return bound_parts(r);
  if (step == kScoreKeys) return key_parts(std::max<int64_t>(0, r.candidates()));
  return 1;
}

void CertifiedSupport::run_choice_unit(int step, int64_t unit, const SupportQuery& query,
                                       SupportScratch& scratch, SparseQueryStats& stats) {
  const int64_t group = query.group;
  const Region r = region(query);
  const int64_t n = std::max<int64_t>(0, r.candidates());
  switch (step) {
    case kSetUp:
      score_fixed_part(query, r, scratch);
      scratch.bounds.resize(static_cast<size_t>(n * group));  // upper bounds
      scratch.suffix.resize(static_cast<size_t>(n * group));  // lower bounds
      scratch.part_maxima.assign(static_cast<size_t>(bound_parts(r) * group), -INFINITY);
      if (n > 0)
        split_sketch_queries(query.cache.summaries(query.layer, query.kv_head), query.queries,
                             scratch.sketch_queries);
      return;
    case kBounds: {
      const int64_t part = first_bound_part(r) + unit;
      const int64_t lo = std::max(r.anchors_end, part * kBoundPart);
      const int64_t hi = std::min(r.tail_begin, (part + 1) * kBoundPart);
      const size_t column = static_cast<size_t>(lo - r.anchors_end);
      position_bounds(query.cache.summaries(query.layer, query.kv_head), block_, lo, hi - lo,
                      scratch.sketch_queries, query.scale,
                      std::span(scratch.bounds).subspan(column),
                      std::span(scratch.suffix).subspan(column), n,
                      std::span(scratch.part_maxima).subspan(static_cast<size_t>(unit * group)));
      return;
    }
    case kCut:
      choose_keys(query, scratch, stats);
      return;
    case kScoreKeys: {
      const int64_t chosen = static_cast<int64_t>(scratch.items.size());
      const int64_t first = unit * kKeyPart, count = std::min(kKeyPart, chosen - first);
      const PositionSet keys = PositionSet::list(std::span(scratch.items).subspan(first, count));
      if (count == chosen) {
        query.cache.score(query.layer, query.kv_head, query.queries, keys, scratch.block_scores);
        return;
      }
      thread_local std::vector<float> part;  // grown, never shrunk
      part.resize(static_cast<size_t>(group * count));
      query.cache.score(query.layer, query.kv_head, query.queries, keys, part);
      for (int64_t g = 0; g < group; ++g)
        std::copy_n(part.begin() + g * count, count,
                    scratch.block_scores.begin() + g * chosen + first);
      return;
    }
    default:
      return;
  }
}

ChosenSupport CertifiedSupport::finish_choice(const SupportQuery& query, SupportScratch& scratch,
                                              SparseQueryStats& stats) {
  if (!chooses_from_sketches()) return choose(query, scratch, stats);
  return keep_heaviest(query, region(query), scratch.dropped, scratch, stats);
}

// After the bound pass: m_g, the buckets and the cut, the list of keys to read (scratch.items)
// and room for their scores; scratch.dropped = Ẑ.
void CertifiedSupport::choose_keys(const SupportQuery& query, SupportScratch& scratch,
                                   SparseQueryStats& stats) {
  const int64_t group = query.group;
  const Region r = region(query);
  const double scale = query.scale;
  const int64_t n = std::max<int64_t>(0, r.candidates());

  std::vector<double>& upper = scratch.bounds;
  std::vector<double>& lower = scratch.suffix;
  std::vector<double>& m = scratch.reference;  // per query: the largest score or bound
  m.assign(static_cast<size_t>(group), -INFINITY);
  for (size_t p = 0; p < scratch.part_maxima.size(); p += static_cast<size_t>(group))
    for (int64_t g = 0; g < group; ++g) m[g] = std::max(m[g], scratch.part_maxima[p + g]);
  stats.summaries_read = n;
  fold_fixed_part(group, scale, scratch);
  const std::vector<double>& z = scratch.partition;  // Z_fixed per query
  // counts[k]: candidates in pooled bucket k(v_j); below[k]: their pooled lower masses,
  // sum exp(-(k(w_j) + 1) h). (Behind them, four interleaved histograms of each, summed into them
  // after the pass: runs of candidates in one bucket, most fall in the last, open one, would
  // otherwise chain every update on the one before through memory.)
  std::vector<double>& counts = scratch.ranking;
  counts.assign(10 * kBuckets, 0.0);
  double* below = counts.data() + kBuckets;
  std::vector<int32_t>& pooled = scratch.order;  // k(v_j) of each candidate
  pooled.resize(static_cast<size_t>(n));
  std::vector<int32_t>& low_bucket = scratch.low_buckets;  // k(w_j)
  low_bucket.resize(static_cast<size_t>(n));
  std::vector<int16_t>& own = scratch.query_buckets;  // {2, group, n}: k(u_jg - m_g), k(l_jg - m_g)
  own.resize(static_cast<size_t>(2 * group * n));
  const int16_t* own_upper = own.data();
  const int16_t* own_lower = own.data() + group * n;
  if (n > 0)
    sketch_kernels::buckets(upper.data(), lower.data(), n, m, 1 / kBucketWidth, kBuckets - 1,
                            pooled.data(), low_bucket.data(), own.data(), own.data() + group * n);
  {
    double* c4 = counts.data() + 2 * kBuckets;
    double* b4 = c4 + 4 * kBuckets;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      for (int64_t l = 0; l < 4; ++l) {
        const int32_t k = pooled[i + l];
        c4[l * kBuckets + k] += 1;
        b4[l * kBuckets + k] += kBucketExps.floor[low_bucket[i + l]];
      }
    for (; i < n; ++i) {
      const int32_t k = pooled[i];
      c4[k] += 1;
      b4[k] += kBucketExps.floor[low_bucket[i]];
    }
    for (int64_t k = 0; k < kBuckets; ++k) {
      counts[k] = (c4[k] + c4[kBuckets + k]) + (c4[2 * kBuckets + k] + c4[3 * kBuckets + k]);
      below[k] = (b4[k] + b4[kBuckets + k]) + (b4[2 * kBuckets + k] + b4[3 * kBuckets + k]);
    }
  }
  const double epsilon = spec().epsilon * (1 - 1e-9);

  // The pooled cut, with half of ε: Zlow_g differs between queries only by Z_fixed,g there.
  double dropped = 0;
  for (int64_t k = 0; k < kBuckets; ++k) dropped += counts[k] * kBucketExps.ceiling[k];
  const double least_fixed = *std::min_element(z.begin(), z.end());
  double read_low = 0;
  int64_t pooled_cut = 0;
  for (; pooled_cut < kBuckets; ++pooled_cut) {
    if (dropped <= kPooledShare * epsilon * (least_fixed + read_low + dropped)) break;
    dropped = pooled_cut + 1 < kBuckets
                  ? dropped - counts[pooled_cut] * kBucketExps.ceiling[pooled_cut]
                  : 0.0;
    read_low += below[pooled_cut];
  }
  if (dropped < 0) dropped = 0;  // float64 cancellation in the running difference

  // Its candidates (without a branch: most candidates are not read).
  std::vector<int32_t>& listed = scratch.items;  // candidate indices, then positions
  listed.resize(static_cast<size_t>(n));
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    listed[count] = static_cast<int32_t>(i);
    count += pooled[i] < pooled_cut;
  }

  // Per query, over the pooled cut's candidates (the rest stay in the pooled Ẑ): above[g][k] and
  // beneath[g][k], their upper and lower masses for query g in pooled bucket k.
  const int64_t cuts = pooled_cut;
  std::vector<double>& masses = scratch.left_out;  // {2, group, cuts}
  masses.assign(static_cast<size_t>(2 * group * cuts), 0.0);
  double* above = masses.data();
  double* beneath = masses.data() + group * cuts;
  for (int64_t c = 0; c < count; ++c) {
    const int32_t i = listed[c], k = pooled[i];
    for (int64_t g = 0; g < group; ++g) {
      above[g * cuts + k] += kBucketExps.ceiling[own_upper[g * n + i]];
      beneath[g * cuts + k] += kBucketExps.floor[own_lower[g * n + i]];
    }
  }
  // Ẑ_g(cut) = Ẑ + sum_{cut <= k < pooled cut} above[g][k], as suffix sums in place (from the
  // smallest terms, no cancellation). The cut is the first at which every query's certificate
  // holds with the whole of ε; the pooled cut itself qualifies (there Ẑ_g <= Ẑ, Zlow_g >= Zlow,
  // and half of ε sufficed).
  for (int64_t g = 0; g < group; ++g)
    for (int64_t k = cuts - 1; k >= 0; --k)
      above[g * cuts + k] += k + 1 < cuts ? above[g * cuts + k + 1] : dropped;
  const auto unread = [&](int64_t g, int64_t at) {
    return at < cuts ? above[g * cuts + at] : dropped;
  };
  std::vector<double>& low = scratch.deltas;  // {group}: Zlow_g at the cut (until keep_heaviest)
  low.assign(z.begin(), z.end());
  const auto holds = [&](int64_t at) {
    for (int64_t g = 0; g < group; ++g)
      if (unread(g, at) > epsilon * (low[g] + unread(g, at))) return false;
    return true;
  };
  int64_t cut = 0;
  for (; cut < cuts && !holds(cut); ++cut)
    for (int64_t g = 0; g < group; ++g) low[g] += beneath[g * cuts + cut];
  std::vector<double>& unread_mass = scratch.dropped;  // {group}: Ẑ_g at the cut
  unread_mass.resize(static_cast<size_t>(group));
  for (int64_t g = 0; g < group; ++g) unread_mass[g] = unread(g, cut);

  // Read the chosen candidates' keys (their scores serve the attention).
  int64_t chosen = 0;
  for (int64_t c = 0; c < count; ++c) {
    const int32_t i = listed[c];
    listed[chosen] = static_cast<int32_t>(r.anchors_end + i);
    chosen += pooled[i] < cut;
  }
  listed.resize(static_cast<size_t>(chosen));
  scratch.block_scores.resize(static_cast<size_t>(group * chosen));
}

// Every candidate scored with the cache's own scores in one pass (as dense attention scores
// them): the bounds are the scores, nothing is left unread (Ẑ = 0), and only the values the
// certificate needs are read.
ChosenSupport CertifiedSupport::choose_scored(const SupportQuery& query, SupportScratch& scratch,
                                              SparseQueryStats& stats) {
  const int64_t group = query.group;
  const Region r = make_region(query.position, query.model_window, spec(), 1);
  score_fixed_part(query, r, scratch);
  const int64_t n = std::max<int64_t>(0, r.candidates());
  scratch.items.resize(static_cast<size_t>(n));
  std::iota(scratch.items.begin(), scratch.items.end(), static_cast<int32_t>(r.anchors_end));
  scratch.block_scores.resize(static_cast<size_t>(group * n));
  if (n > 0)
    query.cache.score(query.layer, query.kv_head, query.queries,
                      PositionSet::range(r.anchors_end, r.tail_begin), scratch.block_scores);
  stats.summaries_read = 0;
  // m_g: the largest scaled score, so that every exp() below is <= 1 (the scale is positive).
  std::vector<double>& m = scratch.reference;
  m.assign(static_cast<size_t>(group), -INFINITY);
  for (int64_t g = 0; g < group && n > 0; ++g) {
    const float* raw = scratch.block_scores.data() + g * n;
    m[g] = scaled_score(*std::max_element(raw, raw + n), query.scale);
  }
  fold_fixed_part(group, query.scale, scratch);
  scratch.dropped.assign(static_cast<size_t>(group), 0.0);
  return keep_heaviest(query, r, scratch.dropped, scratch, stats);
}

// The read candidates are scratch.items, their raw scores scratch.block_scores ({group, chosen});
// scratch.reference holds m_g (no scaled score of a read key above it), scratch.partition
// Z_fixed,g, and dropped[g] is Ẑ_g, the bound on the unread candidates' mass for query g.
ChosenSupport CertifiedSupport::keep_heaviest(const SupportQuery& query, const Region& r,
                                              std::span<const double> dropped,
                                              SupportScratch& scratch, SparseQueryStats& stats) {
  const int64_t group = query.group;
  const double scale = query.scale;
  const double epsilon = spec().epsilon * (1 - 1e-9);
  const int64_t chosen = static_cast<int64_t>(scratch.items.size());
  std::vector<double>& m = scratch.reference;
  std::vector<double>& z = scratch.partition;
  // weights[g * chosen + c] = exp(s_cg - m_g) of the read candidates; z becomes Z_C.
  std::vector<double>& weights = scratch.suffix;
  weights.resize(static_cast<size_t>(chosen * group));
  if (chosen > 0)
    sketch_kernels::exponentials(scratch.block_scores.data(), chosen, scale, m, weights.data(),
                                 z.data());
  // Of the read candidates, leave out the lightest while every query keeps δ_g <= ε, with
  // δ_g = (Z_D,g + Ẑ_g) / (Z_C,g + Ẑ_g) for the left-out set D (its scores are known; the proof
  // above holds with the dropped mass Z_D,g + Z_unread,g <= Z_D,g + Ẑ_g): their values are not
  // read. The budget per query is ε (Z_C,g + Ẑ_g) - Ẑ_g >= 0 (the cut ensured it).
  std::vector<double>& budget = scratch.deltas;
  budget.resize(static_cast<size_t>(group));
  for (int64_t g = 0; g < group; ++g) budget[g] = epsilon * (z[g] + dropped[g]) - dropped[g];
  // Lightest first, by buckets of the pooled share of the budget, share_c = max_g weight / budget
  // (1/8-nat steps of log share below 1, no sort): whole buckets are left out, from the lightest
  // up, while every query's left-out mass fits its budget.
  std::vector<int32_t>& bucket = scratch.order;  // per read candidate; kBuckets: never left out
  bucket.resize(static_cast<size_t>(chosen));
  std::vector<double>& mass = scratch.ranking;  // {kBuckets, group}: weight per bucket and query
  mass.assign(static_cast<size_t>(kBuckets * group), 0.0);
  // share >= 1 never fits; else bucket k holds log share in (-(k+1) h, -k h], the last open.
  if (chosen > 0)
    sketch_kernels::share_buckets(weights.data(), chosen, budget, 1 / kBucketWidth, kBuckets - 1,
                                  bucket.data());
  for (int64_t c = 0; c < chosen; ++c) {
    const int64_t k = bucket[c];
    if (k < kBuckets)
      for (int64_t g = 0; g < group; ++g) mass[k * group + g] += weights[g * chosen + c];
  }
  std::vector<double>& left_out = scratch.left_out;
  left_out.assign(static_cast<size_t>(group), 0.0);
  int64_t lightest_kept = kBuckets;  // buckets >= this are left out
  for (int64_t k = kBuckets - 1; k >= 0; --k) {
    bool fits = true;
    for (int64_t g = 0; g < group && fits; ++g)
      fits = left_out[g] + mass[k * group + g] <= budget[g];
    if (!fits) break;
    for (int64_t g = 0; g < group; ++g) left_out[g] += mass[k * group + g];
    lightest_kept = k;
  }
  for (int64_t g = 0; g < group; ++g) {
    const double out = left_out[g] + dropped[g];
    scratch.deltas[g] = out > 0 ? out / (z[g] + dropped[g]) : 0.0;
  }
  // The kept candidates, in position order (bucket[i] becomes the read index of the i-th kept,
  // never ahead of the one read next).
  int64_t kept = 0;
  for (int64_t c = 0; c < chosen; ++c) {
    const bool keep = bucket[c] < lightest_kept || bucket[c] == kBuckets;
    scratch.items[kept] = scratch.items[c];
    bucket[kept] = static_cast<int32_t>(c);
    kept += keep;
  }
  stats.selection_scores = chosen - kept;
  scratch.items.resize(static_cast<size_t>(kept));
  const PositionSet support = build_support(r, false, block_, scratch, stats.dynamic);
  // The support's raw scores, {group, anchors + kept + tail} in position order.
  const int64_t anchors = r.anchors(), tail = r.tail(), size = anchors + kept + tail;
  scratch.scores.resize(static_cast<size_t>(group * size));
  for (int64_t g = 0; g < group; ++g) {
    const float* fixed = scratch.fixed_scores.data() + g * (anchors + tail);
    const float* read = scratch.block_scores.data() + g * chosen;
    float* out = std::copy_n(fixed, anchors, scratch.scores.data() + g * size);
    for (int64_t i = 0; i < kept; ++i) out[i] = read[bucket[i]];
    std::copy_n(fixed + anchors, tail, out + kept);
  }
  return {support, true};
}

}  // namespace visikv

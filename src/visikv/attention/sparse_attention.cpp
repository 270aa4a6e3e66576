#include "visikv/attention/sparse_attention.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "visikv/core/error.h"
#include "visikv/core/vec.h"

namespace visikv {

namespace {

constexpr double kUnitRoundoff = 0x1p-24;

// sum_c max(q_c lo_c, q_c hi_c) and sum_c max(|q_c lo_c|, |q_c hi_c|), in float32 (AVX2).
struct BoxSums {
  float total, magnitude;
};

inline BoxSums box_sums(const float* q, const float* lo, const float* hi, int64_t d) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 sum = _mm256_setzero_ps(), magnitude = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    const __m256 a = _mm256_mul_ps(qv, _mm256_loadu_ps(lo + c));
    const __m256 b = _mm256_mul_ps(qv, _mm256_loadu_ps(hi + c));
    sum = _mm256_add_ps(sum, _mm256_max_ps(a, b));
    magnitude = _mm256_add_ps(magnitude,
                              _mm256_max_ps(_mm256_andnot_ps(sign, a), _mm256_andnot_ps(sign, b)));
  }
  float total = vec::horizontal_sum(sum), size = vec::horizontal_sum(magnitude);
  for (; c < d; ++c) {
    const float a = q[c] * lo[c], b = q[c] * hi[c];
    total += std::max(a, b);
    size += std::max(std::abs(a), std::abs(b));
  }
  return {total, size};
}

// For each channel, q_c k_c over k_c in [m_c, M_c] is linear in k_c, so its maximum sits at an
// end: max(q_c m_c, q_c M_c). Summing the per-channel maxima bounds q·k for every key in the
// box, hence for every stored key of the block. Two slack terms make the bound dominate the
// float32 logits the attention computes:
//  - the box sum and a plain float32 dot product of q with a stored key are each within
//    d u sum_c |q_c| max(|m_c|, |M_c|) of their exact values (u = 2^-24, any summation order,
//    with or without fused multiply-add), and the logit's rounding adds one u: (2d + 4) u times
//    that magnitude covers it with margin (a proof for the dense caches);
//  - codecs compute the score another way than q·k̂ with the reconstructed key: dequantization
//    inside the dot product (scale * q·code + zero * sum q), HeadQ's second product (U_rᵀ q)·ĉ,
//    the Hadamard rotation of the query. Each is a few float32 sums of d products whose terms
//    are bounded by ||q||_1 ||k||_inf <= sqrt(d) ||q||_2 ||k||_2, which the term
//    4 d sqrt(d) u ||q||_2 max_j ||k_j||_2 covers with margin (typical rounding is ~sqrt(d) u
//    times the terms). This second term is a margin argued per codec path, not a machine-checked
//    proof for every kernel; tests check the certificate on quantized and HeadQ caches.
inline double bound_from_sums(BoxSums sums, double query_norm, double key_norm, int64_t d,
                              double scale) {
  const double dd = static_cast<double>(d);
  const double slack = (2 * dd + 4) * kUnitRoundoff * sums.magnitude +
                       4 * dd * std::sqrt(dd) * kUnitRoundoff * query_norm * key_norm;
  return scale * (static_cast<double>(sums.total) + slack);
}

double euclidean_norm(std::span<const float> x) {
  double sum = 0;
  for (float v : x) sum += static_cast<double>(v) * v;
  return std::sqrt(sum);
}

}  // namespace

double block_upper_bound(const BlockSummary& block, std::span<const float> query, double scale) {
  const int64_t d = static_cast<int64_t>(query.size());
  return bound_from_sums(box_sums(query.data(), block.min.data(), block.max.data(), d),
                         euclidean_norm(query), block.norm, d, scale);
}

double block_centroid_score(const BlockSummary& block, std::span<const float> query, double scale) {
  return scale * vec::dot(block.centroid.data(), query.data(), static_cast<int64_t>(query.size()));
}

void block_upper_bounds(const BlockSummaryTable& table, int64_t first, int64_t count,
                        std::span<const float> queries, double scale, std::span<double> out) {
  const int64_t d = table.head_dim, group = static_cast<int64_t>(queries.size()) / d;
  require(first >= 0 && count >= 0 && first + count <= table.blocks &&
              static_cast<int64_t>(out.size()) >= count * group,
          "block bounds: blocks [", first, ", ", first + count, ") of ", table.blocks);
  std::vector<double> norms(static_cast<size_t>(group));
  for (int64_t g = 0; g < group; ++g) norms[g] = euclidean_norm(queries.subspan(g * d, d));
  const float* lo = table.mins.data() + first * d;
  const float* hi = table.maxs.data() + first * d;
  for (int64_t b = 0; b < count; ++b, lo += d, hi += d) {
    const double key_norm = table.norms[first + b];
    for (int64_t g = 0; g < group; ++g)
      out[b * group + g] = bound_from_sums(box_sums(queries.data() + g * d, lo, hi, d), norms[g],
                                           key_norm, d, scale);
  }
}

void block_centroid_scores(const BlockSummaryTable& table, int64_t first, int64_t count,
                           std::span<const float> queries, double scale, std::span<double> out) {
  const int64_t d = table.head_dim, group = static_cast<int64_t>(queries.size()) / d;
  require(first >= 0 && count >= 0 && first + count <= table.blocks &&
              static_cast<int64_t>(out.size()) >= count * group,
          "block centroid scores: blocks [", first, ", ", first + count, ") of ", table.blocks);
  // One matrix-vector product per query over the contiguous {blocks, d} centroid rows.
  const float* row = table.centroids.data() + first * d;
  for (int64_t b = 0; b < count; ++b, row += d)
    for (int64_t g = 0; g < group; ++g)
      out[b * group + g] = scale * vec::dot(row, queries.data() + g * d, d);
}

namespace {

// The parts of one query's visible range (see the header): anchors [visible_begin, anchors_end),
// candidates [anchors_end, tail_begin), tail [tail_begin, end).
struct Region {
  int64_t visible_begin, anchors_end, tail_begin, end;
  int64_t candidates() const { return tail_begin - anchors_end; }
};

Region make_region(int64_t position, int64_t model_window, const SelectorSpec& spec,
                   int64_t own_block) {
  const PositionSet visible = visible_positions(position, model_window);
  const int64_t lo = visible.begin(), end = visible.end();
  const int64_t anchors_end = std::clamp(spec.anchors, lo, end);
  const int64_t window_begin = std::max(lo, end - std::min(spec.window, end));
  const int64_t own_begin = (position / own_block) * own_block;
  const int64_t tail_begin = std::max(anchors_end, std::min(window_begin, own_begin));
  return {lo, anchors_end, tail_begin, end};
}

// Scratch reused across the queries one thread handles, so selection allocates nothing per query
// once warm.
struct Workspace {
  std::vector<float> scores;      // {group, support}
  std::vector<float> selection;   // {group, positions scored only to choose}
  std::vector<float> pooled;      // one ranking value per candidate position or block
  std::vector<int32_t> order;     // candidate indices being ranked
  std::vector<int32_t> items;     // the dynamic choice: positions or block indices
  std::vector<int32_t> support;   // the support as a sorted position list
  std::vector<double> bounds;     // {blocks, group}: scores or bounds of the candidate blocks
  std::vector<double> suffix;     // {blocks + 1, group}, certified
  std::vector<double> ranking;    // pooled bound per block, certified
  std::vector<double> partition;  // Z_S per query, certified
  std::vector<double> reference;  // m per query, certified
  std::vector<float> logits;      // observer copy
};

struct BlockRange {
  int64_t first = 0, count = 0;  // blocks meeting the candidate range
};

BlockRange candidate_blocks(const Region& r, int64_t block) {
  if (r.candidates() <= 0) return {};
  const int64_t first = r.anchors_end / block, last = (r.tail_begin - 1) / block;
  return {first, last - first + 1};
}

// The part of block b inside the candidate range.
std::pair<int64_t, int64_t> block_part(const Region& r, int64_t b, int64_t block) {
  return {std::max(r.anchors_end, b * block), std::min(r.tail_begin, (b + 1) * block)};
}

// Keeps the `keep` best of ws.order by ws.pooled (higher first, ties to the lower index), then
// sorts the kept indices ascending.
void keep_best(Workspace& ws, int64_t keep) {
  const auto better = [&](int32_t a, int32_t b) {
    return ws.pooled[a] > ws.pooled[b] || (ws.pooled[a] == ws.pooled[b] && a < b);
  };
  std::nth_element(ws.order.begin(), ws.order.begin() + keep, ws.order.end(), better);
  ws.order.resize(static_cast<size_t>(keep));
  std::sort(ws.order.begin(), ws.order.end());
}

// Exact top-k: the k candidate positions with the highest score, pooled over the slot's queries
// by the maximum. Reads every candidate's score (that is the rule's definition).
void choose_exact(const KVCache& cache, int64_t layer, int64_t kv, std::span<const float> queries,
                  int64_t group, const Region& r, int64_t k, Workspace& ws,
                  SparseQueryStats& stats) {
  const int64_t n = r.candidates();
  ws.items.clear();
  if (n <= 0) return;
  if (k >= n) {  // clamped: every candidate, nothing to rank
    for (int64_t j = r.anchors_end; j < r.tail_begin; ++j)
      ws.items.push_back(static_cast<int32_t>(j));
    return;
  }
  ws.selection.resize(static_cast<size_t>(group * n));
  cache.score(layer, kv, queries, PositionSet::range(r.anchors_end, r.tail_begin), ws.selection);
  stats.selection_scores = n;
  ws.pooled.assign(ws.selection.begin(), ws.selection.begin() + n);
  for (int64_t g = 1; g < group; ++g)
    for (int64_t i = 0; i < n; ++i) ws.pooled[i] = std::max(ws.pooled[i], ws.selection[g * n + i]);
  ws.order.resize(static_cast<size_t>(n));
  std::iota(ws.order.begin(), ws.order.end(), 0);
  keep_best(ws, k);
  for (int32_t i : ws.order) ws.items.push_back(static_cast<int32_t>(r.anchors_end + i));
}

// Block rules: ceil(k / B) blocks meeting the candidate range, ranked by the centroid score or
// the upper bound, pooled over the slot's queries by the maximum. Touches n / B summaries.
void choose_blocks(const KVCache& cache, int64_t layer, int64_t kv, std::span<const float> queries,
                   int64_t group, int64_t d, const Region& r, int64_t block,
                   const SelectorSpec& spec, double scale, Workspace& ws, SparseQueryStats& stats) {
  const BlockRange blocks = candidate_blocks(r, block);
  const int64_t want = (spec.top_k + block - 1) / block;
  ws.items.clear();
  if (blocks.count == 0) return;
  if (want >= blocks.count) {
    for (int64_t b = 0; b < blocks.count; ++b)
      ws.items.push_back(static_cast<int32_t>(blocks.first + b));
    return;
  }
  // One pass over the contiguous summaries of the candidate blocks, every query of the slot.
  ws.bounds.resize(static_cast<size_t>(blocks.count * group));
  const BlockSummaryTable table = cache.summaries(layer, kv);
  const std::span<const float> slot_queries = queries.first(static_cast<size_t>(group * d));
  if (spec.rule == SelectorRule::Centroid)
    block_centroid_scores(table, blocks.first, blocks.count, slot_queries, scale, ws.bounds);
  else
    block_upper_bounds(table, blocks.first, blocks.count, slot_queries, scale, ws.bounds);
  ws.pooled.resize(static_cast<size_t>(blocks.count));
  for (int64_t b = 0; b < blocks.count; ++b) {
    float best = -INFINITY;
    for (int64_t g = 0; g < group; ++g)
      best = std::max(best, static_cast<float>(ws.bounds[b * group + g]));
    ws.pooled[b] = best;
  }
  stats.summaries_read = blocks.count;
  ws.order.resize(static_cast<size_t>(blocks.count));
  std::iota(ws.order.begin(), ws.order.end(), 0);
  keep_best(ws, want);
  for (int32_t i : ws.order) ws.items.push_back(static_cast<int32_t>(blocks.first + i));
}

// Certified mode. With S the support, m any reference score, Z_S = sum_{j in S} exp(s_j - m) and
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
void choose_certified(const KVCache& cache, int64_t layer, int64_t kv,
                      std::span<const float> queries, int64_t group, int64_t d, const Region& r,
                      int64_t block, double scale, double epsilon, Workspace& ws,
                      std::span<double> deltas, SparseQueryStats& stats) {
  // Scores of the fixed part (anchors and tail), scaled exactly as the attention scales them.
  ws.support.clear();
  for (int64_t j = r.visible_begin; j < r.anchors_end; ++j)
    ws.support.push_back(static_cast<int32_t>(j));
  for (int64_t j = r.tail_begin; j < r.end; ++j) ws.support.push_back(static_cast<int32_t>(j));
  const int64_t fixed = static_cast<int64_t>(ws.support.size());
  ws.scores.resize(static_cast<size_t>(group * fixed));
  cache.score(layer, kv, queries, PositionSet::list(ws.support), ws.scores);
  const auto scaled = [scale](float raw) { return static_cast<float>(raw * scale); };

  const BlockRange blocks = candidate_blocks(r, block);
  const int64_t nb = blocks.count;
  ws.bounds.resize(static_cast<size_t>(nb * group));
  ws.ranking.resize(static_cast<size_t>(nb));
  ws.reference.assign(static_cast<size_t>(group), -INFINITY);  // m per query
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      ws.reference[g] = std::max<double>(ws.reference[g], scaled(ws.scores[g * fixed + i]));
  if (nb > 0)
    block_upper_bounds(cache.summaries(layer, kv), blocks.first, nb,
                       queries.first(static_cast<size_t>(group * d)), scale, ws.bounds);
  for (int64_t b = 0; b < nb; ++b) {
    double best = -INFINITY;
    for (int64_t g = 0; g < group; ++g) {
      const double u = ws.bounds[b * group + g];
      ws.reference[g] = std::max(ws.reference[g], u);
      best = std::max(best, u);
    }
    ws.ranking[b] = best;
  }
  stats.summaries_read = nb;

  // Blocks in the order they would be added: decreasing pooled bound, ties to the lower block.
  ws.order.resize(static_cast<size_t>(nb));
  std::iota(ws.order.begin(), ws.order.end(), 0);
  std::sort(ws.order.begin(), ws.order.end(), [&](int32_t a, int32_t b) {
    return ws.ranking[a] > ws.ranking[b] || (ws.ranking[a] == ws.ranking[b] && a < b);
  });
  // suffix[i * group + g]: Ẑ_g when the first i blocks of `order` have been read.
  ws.suffix.assign(static_cast<size_t>((nb + 1) * group), 0.0);
  for (int64_t i = nb - 1; i >= 0; --i) {
    const int64_t b = ws.order[i];
    const auto [begin, end] = block_part(r, blocks.first + b, block);
    for (int64_t g = 0; g < group; ++g)
      ws.suffix[i * group + g] =
          ws.suffix[(i + 1) * group + g] +
          static_cast<double>(end - begin) * std::exp(ws.bounds[b * group + g] - ws.reference[g]);
  }
  ws.partition.assign(static_cast<size_t>(group), 0.0);  // Z_S per query
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < fixed; ++i)
      ws.partition[g] += std::exp(scaled(ws.scores[g * fixed + i]) - ws.reference[g]);

  const auto delta = [&](int64_t read, int64_t g) {
    const double rest = ws.suffix[read * group + g];
    return rest > 0 ? rest / (ws.partition[g] + rest) : 0.0;
  };
  int64_t read = 0;
  for (; read < nb; ++read) {
    double worst = 0;
    for (int64_t g = 0; g < group; ++g) worst = std::max(worst, delta(read, g));
    if (worst <= epsilon) break;
    const auto [begin, end] = block_part(r, blocks.first + ws.order[read], block);
    const int64_t n = end - begin;
    ws.selection.resize(static_cast<size_t>(group * n));
    cache.score(layer, kv, queries, PositionSet::range(begin, end), ws.selection);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < n; ++i)
        ws.partition[g] += std::exp(scaled(ws.selection[g * n + i]) - ws.reference[g]);
  }
  for (int64_t g = 0; g < group; ++g) deltas[g] = delta(read, g);
  ws.items.clear();
  for (int64_t i = 0; i < read; ++i)
    ws.items.push_back(static_cast<int32_t>(blocks.first + ws.order[i]));
  std::sort(ws.items.begin(), ws.items.end());
}

// Drops from a reused choice what is no longer a candidate (the window and the own block move
// forward; a sliding-window model's visible range moves too).
void keep_candidates(std::span<const int32_t> previous, const Region& r, bool blocks, int64_t block,
                     std::vector<int32_t>& items) {
  items.clear();
  for (int32_t x : previous) {
    const bool inside = blocks ? x * block < r.tail_begin && (x + 1) * block > r.anchors_end
                               : x >= r.anchors_end && x < r.tail_begin;
    if (inside) items.push_back(x);
  }
}

// anchors ∪ dynamic ∪ tail as a sorted list (disjoint by construction); a range when it covers
// every visible position, so full support reads exactly what dense attention reads.
PositionSet build_support(const Region& r, bool blocks, int64_t block, Workspace& ws,
                          int64_t& dynamic) {
  ws.support.clear();
  for (int64_t j = r.visible_begin; j < r.anchors_end; ++j)
    ws.support.push_back(static_cast<int32_t>(j));
  for (int32_t x : ws.items) {
    if (!blocks) {
      ws.support.push_back(x);
      continue;
    }
    const auto [begin, end] = block_part(r, x, block);
    for (int64_t j = begin; j < end; ++j) ws.support.push_back(static_cast<int32_t>(j));
  }
  dynamic = static_cast<int64_t>(ws.support.size()) - (r.anchors_end - r.visible_begin);
  for (int64_t j = r.tail_begin; j < r.end; ++j) ws.support.push_back(static_cast<int32_t>(j));
  if (static_cast<int64_t>(ws.support.size()) == r.end - r.visible_begin)
    return PositionSet::range(r.visible_begin, r.end);
  return PositionSet::list(ws.support);
}

// Softmax attention of `group` queries over `support`, as attend_causal computes it (same
// scaling, softmax and accumulation order), so a full support gives the same bits.
void attend_support(const KVCache& cache, int64_t layer, int64_t kv, int64_t first_head,
                    int64_t position, std::span<const float> queries, int64_t group, int64_t d,
                    double scale, const PositionSet& support, std::span<float> out, Workspace& ws,
                    AttentionObserver* observer) {
  const int64_t n = support.size();
  ws.scores.resize(static_cast<size_t>(group * n));
  cache.score(layer, kv, queries, support, ws.scores);
  for (int64_t g = 0; g < group; ++g) {
    std::span<float> s(ws.scores.data() + g * n, static_cast<size_t>(n));
    for (float& v : s) v = static_cast<float>(v * scale);
    if (observer == nullptr) {
      softmax_in_place(s);
    } else {
      ws.logits.assign(s.begin(), s.end());
      softmax_in_place(s);
      observer->observe(
          {layer, first_head + g, kv, position, queries.subspan(g * d, d), support, ws.logits, s});
    }
  }
  cache.accumulate(layer, kv, ws.scores, support, out);
}

}  // namespace

void attend_sparse(const KVCache& cache, int64_t layer, std::span<const float> queries,
                   int64_t tokens, int64_t first_position, const AttentionSpec& spec,
                   SparseSelector& selector, std::span<float> out,
                   std::span<SparseQueryStats> stats, AttentionObserver* observer) {
  const SelectorSpec& sel = selector.spec_;
  const CacheShape& shape = cache.shape();
  const int64_t d = spec.head_dim, kv_heads = shape.kv_heads;
  require(d == shape.head_dim && spec.heads > 0 && spec.heads % kv_heads == 0,
          "sparse attention: shape (", spec.heads, " heads of ", d, ") does not match the cache (",
          kv_heads, " KV heads of ", shape.head_dim, ")");
  const int64_t group = spec.heads / kv_heads, row = spec.heads * d;
  require(tokens >= 0 && first_position >= 0 && first_position + tokens <= cache.length(layer),
          "sparse attention: the cache holds ", cache.length(layer), " tokens of layer ", layer,
          ", queries reach position ", first_position + tokens - 1);
  require(static_cast<int64_t>(queries.size()) >= tokens * row &&
              static_cast<int64_t>(out.size()) >= tokens * row,
          "sparse attention: queries and out need ", tokens, " x ", row, " values");
  require(stats.empty() || static_cast<int64_t>(stats.size()) >= tokens * spec.heads,
          "sparse attention: stats need ", tokens * spec.heads, " entries, got ", stats.size());
  const bool dense = sel.kind == SelectorKind::Dense;
  require(dense || spec.scale > 0, "sparse attention '", describe(sel),
          "' needs a positive score scale (the rules rank scaled scores and bounds)");
  const int64_t block = cache.block_size();
  require(!sel.uses_blocks() || sel.block_size == 0 || sel.block_size == block, "selector '",
          describe(sel), "' asks for blocks of ", sel.block_size, " positions, but the cache (",
          cache.describe(), ") summarises blocks of ", block);
  const bool per_head = sel.gqa == GqaChoice::PerHead;
  const int64_t slot_group = per_head ? 1 : group;  // queries sharing one choice
  const int64_t slots = per_head ? spec.heads : kv_heads;
  if (selector.slots_per_layer_ != slots ||
      static_cast<int64_t>(selector.choices_.size()) != shape.layers * slots) {
    selector.choices_.assign(static_cast<size_t>(shape.layers * slots), {});
    selector.slots_per_layer_ = slots;
  }
  // Exact top-k uses no summaries, so it needs no own-block rule: its tail is the window plus
  // the query itself.
  const int64_t own_block = sel.uses_blocks() ? block : 1;
  std::fill(out.begin(), out.begin() + tokens * row, 0.0f);

#pragma omp parallel
  {
    Workspace ws;
    std::vector<double> deltas(static_cast<size_t>(slot_group));
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t kv = 0; kv < kv_heads; ++kv) {
        const int64_t position = first_position + t;
        const Region r = make_region(position, spec.sliding_window, sel, own_block);
        for (int64_t part = 0; part < group / slot_group; ++part) {
          const int64_t first_head = kv * group + part * slot_group;
          const std::span<const float> slot_queries =
              queries.subspan(t * row + first_head * d, slot_group * d);
          const std::span<float> slot_out = out.subspan(t * row + first_head * d, slot_group * d);
          SparseQueryStats st;
          std::fill(deltas.begin(), deltas.end(), NAN);
          PositionSet support = visible_positions(position, spec.sliding_window);
          if (!dense) {
            if (sel.kind == SelectorKind::Certified) {
              choose_certified(cache, layer, kv, slot_queries, slot_group, d, r, block, spec.scale,
                               sel.epsilon, ws, deltas, st);
            } else if (sel.rule != SelectorRule::None) {
              SparseSelector::Choice& choice =
                  selector.choices_[layer * slots + (per_head ? first_head : kv)];
              const bool reuse = tokens == 1 && sel.refresh > 1 && choice.position >= 0 &&
                                 choice.position < position &&
                                 position - choice.position < sel.refresh;
              if (reuse) {
                keep_candidates(choice.items, r, sel.uses_blocks(), block, ws.items);
                st.refreshed = false;
              } else {
                if (sel.rule == SelectorRule::Exact)
                  choose_exact(cache, layer, kv, slot_queries, slot_group, r, sel.top_k, ws, st);
                else
                  choose_blocks(cache, layer, kv, slot_queries, slot_group, d, r, block, sel,
                                spec.scale, ws, st);
                if (t == tokens - 1) {  // the one writer of this slot in this call
                  choice.position = position;
                  choice.items = ws.items;
                }
              }
            } else {
              ws.items.clear();
            }
            if (sel.uses_blocks()) st.blocks_read = static_cast<int64_t>(ws.items.size());
            support = build_support(r, sel.uses_blocks(), block, ws, st.dynamic);
          }
          st.support = support.size();
          attend_support(cache, layer, kv, first_head, position, slot_queries, slot_group, d,
                         spec.scale, support, slot_out, ws, observer);
          if (!stats.empty()) {
            for (int64_t g = 0; g < slot_group; ++g) {
              SparseQueryStats& s = stats[t * spec.heads + first_head + g];
              s = st;
              s.delta = deltas[g];
            }
          }
        }
      }
    }
  }
}

}  // namespace visikv

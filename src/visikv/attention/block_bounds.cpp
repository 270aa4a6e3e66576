#include "visikv/attention/block_bounds.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "visikv/attention/sketch_kernels.h"
#include "visikv/core/error.h"
#include "visikv/core/vec.h"
#include "visikv/kv/block_summaries.h"

namespace visikv {

namespace {

constexpr double kUnitRoundoff = 0x1p-24;
constexpr int64_t kMaxBoundGroup = 64;  // query heads per KV head a bound call takes
constexpr int64_t kMaxSketchDim = 512;  // head_dim a position-bound call takes

using vec::BoxSums;  // vec::box_sums: Σ_c max(q_c lo_c, q_c hi_c) and its magnitude, float32

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

// The bound in the table's frame U (rows u_i, orthonormal): with a = U q, q_perp = q - Uᵀ a and,
// for a key k of the block, p = U k and k_perp = k - Uᵀ p,
//   q·k = a·p + q_perp·k_perp + (U q_perp)·p + a·(U k_perp),
// where the last two terms vanish for an orthonormal U (U q_perp = U k_perp = 0). So
//   q·k <= sum_i max(a_i lo_i, a_i hi_i) + ||q_perp|| R_b
// with [lo_i, hi_i] the block's box of p_i and R_b its largest ||k_perp|| (stored rounded
// outward / up). Slack, on top of the float32 score slack of the box bound:
//  - the frame sum is taken in float32 from a rounded to float: (2r + 4) u times its magnitude
//    sum_i max(|a_i lo_i|, |a_i hi_i|), as in bound_from_sums;
//  - the dot product the cache computes is within (2d + 4) u sum_c |q_c k_c| <= (2d + 4) u
//    ||q|| ||k|| of q·k (the box bound has the per-channel form of this term), plus the codec
//    term 4 d sqrt(d) u ||q|| ||k|| of bound_from_sums;
//  - a, q_perp, p and R_b are computed in float64 and U is orthonormal to float64 rounding: the
//    identity's dropped terms and those roundings stay below 16 d 2^-53 ||q|| ||k||.
// ||q_perp|| R_b is multiplied by (1 + 4u) for its own rounding.
struct FrameQuery {
  std::vector<float> coordinates;  // a = U q, rounded to float
  double residual_norm = 0;        // ||q - Uᵀ a||
  double norm = 0;                 // ||q||
};

void frame_query(const BlockSummaryTable& table, const float* q, FrameQuery& out) {
  const int64_t r = table.frame_rank, d = table.head_dim;
  out.coordinates.resize(static_cast<size_t>(r));
  std::vector<double> residual(q, q + d);
  double norm = 0;
  for (int64_t c = 0; c < d; ++c) norm += static_cast<double>(q[c]) * q[c];
  for (int64_t i = 0; i < r; ++i) {
    const double* u = table.frame.data() + i * d;
    double a = 0;
    for (int64_t c = 0; c < d; ++c) a += u[c] * q[c];
    out.coordinates[i] = static_cast<float>(a);
    for (int64_t c = 0; c < d; ++c) residual[c] -= a * u[c];
  }
  double residual_norm = 0;
  for (double x : residual) residual_norm += x * x;
  out.residual_norm = std::sqrt(residual_norm);
  out.norm = std::sqrt(norm);
}

inline double frame_bound(const FrameQuery& fq, const float* lo, const float* hi,
                          double residual_norm, double key_norm, int64_t r, int64_t d,
                          double scale) {
  const BoxSums sums = vec::box_sums(fq.coordinates.data(), lo, hi, r);
  const double dd = static_cast<double>(d), rr = static_cast<double>(r);
  const double product = fq.norm * key_norm;
  const double slack = (2 * rr + 4) * kUnitRoundoff * sums.magnitude +
                       ((2 * dd + 4) + 4 * dd * std::sqrt(dd)) * kUnitRoundoff * product +
                       16 * dd * 0x1p-53 * product;
  return scale * (static_cast<double>(sums.total) +
                  fq.residual_norm * residual_norm * (1 + 4 * kUnitRoundoff) + slack);
}

double euclidean_norm(std::span<const float> x) {
  double sum = 0;
  for (float v : x) sum += static_cast<double>(v) * v;
  return std::sqrt(sum);
}

}  // namespace

double block_upper_bound(const BlockSummary& block, std::span<const float> query, double scale) {
  const int64_t d = static_cast<int64_t>(query.size());
  return bound_from_sums(vec::box_sums(query.data(), block.min.data(), block.max.data(), d),
                         euclidean_norm(query), block.norm, d, scale);
}

double block_centroid_score(const BlockSummary& block, std::span<const float> query, double scale) {
  return scale * vec::dot(block.centroid.data(), query.data(), static_cast<int64_t>(query.size()));
}

void block_upper_bounds(const BlockSummaryTable& table, int64_t first, int64_t count,
                        std::span<const float> queries, double scale, std::span<double> out,
                        bool use_frame) {
  const int64_t d = table.head_dim, group = static_cast<int64_t>(queries.size()) / d;
  require(first >= 0 && count >= 0 && first + count <= table.blocks &&
              static_cast<int64_t>(out.size()) >= count * group,
          "block bounds: blocks [", first, ", ", first + count, ") of ", table.blocks);
  require(!use_frame || table.frame_rank > 0,
          "block bounds: the summaries keep no frame (KVCache::set_summary_frames)");
  std::vector<double> norms(static_cast<size_t>(group));
  for (int64_t g = 0; g < group; ++g) norms[g] = euclidean_norm(queries.subspan(g * d, d));
  const float* lo = table.mins.data() + first * d;
  const float* hi = table.maxs.data() + first * d;
  for (int64_t b = 0; b < count; ++b, lo += d, hi += d) {
    const double key_norm = table.norms[first + b];
    for (int64_t g = 0; g < group; ++g)
      out[b * group + g] = bound_from_sums(vec::box_sums(queries.data() + g * d, lo, hi, d),
                                           norms[g], key_norm, d, scale);
  }
  if (!use_frame) return;
  // Both bounds hold; keep the smaller (the frame's wins where queries concentrate, the
  // channel box can still win for a low-rank frame whose residual term is large).
  const int64_t r = table.frame_rank;
  std::vector<FrameQuery> frame(static_cast<size_t>(group));
  for (int64_t g = 0; g < group; ++g) frame_query(table, queries.data() + g * d, frame[g]);
  const float* flo = table.frame_mins.data() + first * r;
  const float* fhi = table.frame_maxs.data() + first * r;
  for (int64_t b = 0; b < count; ++b, flo += r, fhi += r) {
    const double key_norm = table.norms[first + b], residual = table.residual_norms[first + b];
    for (int64_t g = 0; g < group; ++g)
      out[b * group + g] = std::min(
          out[b * group + g], frame_bound(frame[g], flo, fhi, residual, key_norm, r, d, scale));
  }
}

// With y = H k the rotated key (sketch_rotation; H orthonormal, so q·k = (Hq)·y and ||Hq|| =
// ||q||), ỹ = offset + step * code its sketch and e >= ||y - ỹ|| (sketch_errors), writing q for
// the rotated query Hq below:
//   q·y = q·ỹ + q·(y - ỹ),   |q·(y - ỹ)| <= ||q|| e.
// The query is split exactly (in float64) into a 16-bit level and a remainder,
//   q = s q16 + r   (q16 = round(q / s), s = max|q_c| / 32767),
// so q·ỹ = s (offset sum_c q16_c + step sum_c q16_c code_c) + r·ỹ, where the integer sums are
// exact (int32: |sum| <= 512 * 32767 * 127 < 2^31) and |r·ỹ| <= ||r|| ||ỹ|| <= ||r|| (max ||k|| +
// e);
// ||r|| is about 2^-16 ||q||. The cache's float32 score is within the box bound's two score
// terms of q·k, bounded with the block's largest key norm: ((2d + 4) + 4 d sqrt(d)) u ||q||
// max ||k||. The float64 arithmetic (the split, the centre) adds below 16 d 2^-53 ||q||
// (max ||k|| + e), and ||q|| e is multiplied by (1 + 4u) for its own rounding. The rotations are
// float64 butterflies (log2 d levels of additions), within about log2(d) 2^-53 of exact: inside
// the same term.
namespace {

// The query rotated as the sketches are (sketch_rotation), then split; the weights of the width
// (sketch_kernels.h) from its norm and the remainder's: error_weight ||q|| (1 + 4u) for the
// sketch error, shared_weight ||r|| + tiny ||q|| for (key norm + sketch error), norm_weight
// slack ||q|| for the key norm.
void split_query(const float* q, int64_t d, double slack, double tiny, int16_t* level,
                 sketch_kernels::SplitQuery& out) {
  double rest[kMaxSketchDim], norm = 0, top = 0;
  std::copy(q, q + d, rest);
  sketch_rotation(std::span(rest, static_cast<size_t>(d)));
  for (int64_t c = 0; c < d; ++c) {
    norm += rest[c] * rest[c];
    top = std::max(top, std::abs(rest[c]));
  }
  norm = std::sqrt(norm);
  const double step = top / 32767;
  double sum = 0, remainder = 0;
  for (int64_t c = 0; c < d; ++c) {
    const double code =
        step > 0 ? std::clamp(std::nearbyint(rest[c] / step), -32767.0, 32767.0) : 0.0;
    level[c] = static_cast<int16_t>(code);
    const double r = rest[c] - step * code;
    remainder += r * r;
    sum += code;
  }
  out.level = level;
  out.step = step;
  out.sum = sum;
  out.error_weight = norm * (1 + 4 * kUnitRoundoff);
  out.shared_weight = std::sqrt(remainder) + tiny * norm;
  out.norm_weight = slack * norm;
}

}  // namespace

void split_sketch_queries(const BlockSummaryTable& table, std::span<const float> queries,
                          SketchQueries& out) {
  const int64_t d = table.head_dim, group = static_cast<int64_t>(queries.size()) / d;
  require(table.sketch_levels > 0, "position bounds: the summaries keep no position sketches");
  require(d <= kMaxSketchDim && group <= sketch_kernels::kMaxQueries, "position bounds: head_dim ",
          d, " and ", group, " queries exceed ", kMaxSketchDim, " and ",
          sketch_kernels::kMaxQueries);
  const double dd = static_cast<double>(d);
  const double score_slack = ((2 * dd + 4) + 4 * dd * std::sqrt(dd)) * kUnitRoundoff;
  const double tiny = 16 * dd * 0x1p-53;
  out.levels.resize(static_cast<size_t>(group * d));  // grown once per scratch, then reused
  out.split.resize(static_cast<size_t>(group));
  for (int64_t g = 0; g < group; ++g)
    split_query(queries.data() + g * d, d, score_slack, tiny, out.levels.data() + g * d,
                out.split[g]);
}

void position_bounds(const BlockSummaryTable& table, int64_t block_size, int64_t first,
                     int64_t count, const SketchQueries& queries, double scale,
                     std::span<double> upper, std::span<double> lower, int64_t stride,
                     std::span<double> largest) {
  const int64_t group = static_cast<int64_t>(queries.split.size());
  const int64_t positions = static_cast<int64_t>(table.sketch_offsets.size());
  require(table.sketch_levels > 0, "position bounds: the summaries keep no position sketches");
  require(largest.empty() || static_cast<int64_t>(largest.size()) >= group,
          "position bounds: ", largest.size(), " maxima for ", group, " queries");
  const int64_t rows = group > 0 ? (group - 1) * stride + count : 0;
  require(first >= 0 && count >= 0 && first + count <= positions && block_size > 0 &&
              stride >= count && static_cast<int64_t>(upper.size()) >= rows &&
              static_cast<int64_t>(lower.size()) >= rows,
          "position bounds: positions [", first, ", ", first + count, ") of ", positions);
  double maxima[sketch_kernels::kMaxQueries];
  for (int64_t g = 0; g < group; ++g) maxima[g] = largest.empty() ? -INFINITY : largest[g];
  if (count > 0)
    sketch_kernels::bounds(table, block_size, first, count, queries.split, scale, upper.data(),
                           lower.data(), stride, maxima);
  if (!largest.empty()) std::copy(maxima, maxima + group, largest.begin());
}

void position_bounds(const BlockSummaryTable& table, int64_t block_size, int64_t first,
                     int64_t count, std::span<const float> queries, double scale,
                     std::span<double> upper, std::span<double> lower, std::span<double> largest) {
  thread_local SketchQueries split;  // grown, never shrunk: no allocation per call
  split_sketch_queries(table, queries, split);
  position_bounds(table, block_size, first, count, split, scale, upper, lower, count, largest);
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

}  // namespace visikv

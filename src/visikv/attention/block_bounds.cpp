#include "visikv/attention/block_bounds.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

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
  const BoxSums sums = box_sums(fq.coordinates.data(), lo, hi, r);
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
  return bound_from_sums(box_sums(query.data(), block.min.data(), block.max.data(), d),
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
      out[b * group + g] = bound_from_sums(box_sums(queries.data() + g * d, lo, hi, d), norms[g],
                                           key_norm, d, scale);
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

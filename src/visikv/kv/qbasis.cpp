#include "visikv/kv/qbasis.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/random.h"
#include "visikv/core/vec.h"
#include "visikv/kv/fp16_window.h"
#include "visikv/kv/headq.h"
#include "visikv/kv/int_row_codec.h"

namespace visikv {

namespace {

constexpr int64_t kPairBits = 32;  // one fp16 scale and one fp16 zero

// Directions held at each width: counts[b], b = 0..kQBasisMaxBits.
using WidthCounts = std::array<int64_t, kQBasisWidths>;

int64_t cost_of_counts(const WidthCounts& counts, CodecSpec::Axis axis, int64_t group) {
  int64_t code_bits = 0, stored = 0;
  for (int b = 1; b <= kQBasisMaxBits; ++b) {
    code_bits += b * counts[b];
    stored += counts[b];
  }
  if (axis == CodecSpec::Axis::Tokens)
    return code_bits + kPairBits * ((stored + group - 1) / group);
  return group * code_bits + kPairBits * stored;
}

// uᵀ Σ u = Σ_m λ_m (u·v_m)² for Σ = Σ_m λ_m v_m v_mᵀ ({d} eigenvalues, {d, d} rows: full rank,
// so exact).
double quadratic_form(const double* u, std::span<const double> vectors, const double* eigenvalues,
                      int64_t d) {
  double sum = 0;
  for (int64_t m = 0; m < d; ++m) {
    double overlap = 0;
    for (int64_t c = 0; c < d; ++c) overlap += u[c] * vectors[m * d + c];
    sum += std::max(0.0, eigenvalues[m]) * overlap * overlap;
  }
  return sum;
}

WidthCounts counts_of(std::span<const int> bits) {
  WidthCounts counts{};
  for (int b : bits) ++counts[b];
  return counts;
}

}  // namespace

double qbasis_relative_distortion(int bits, int64_t group) {
  if (bits <= 0) return 1.0;
  const double kappa =
      std::max(1.0 / 3.0, 2.0 / 3.0 * std::log(static_cast<double>(std::max<int64_t>(group, 1))));
  const double levels = static_cast<double>((1 << bits) - 1);
  return kappa / (levels * levels);
}

int64_t qbasis_group_cost(std::span<const int> bits, CodecSpec::Axis axis, int64_t group) {
  for (int b : bits)
    require(b >= 0 && b <= kQBasisMaxBits, "query-basis bits must be 0..", kQBasisMaxBits, ", got ",
            b);
  require(group >= 1, "query-basis group must be positive, got ", group);
  return cost_of_counts(counts_of(bits), axis, group);
}

namespace {

// min Σ_i weights[order[i]] f_i(b_i) over b_i in 0..kQBasisMaxBits with Σ_i cost(b_i) <=
// capacity, cost(b) = b·unit + extra·[b > 0] (in units of the capacity), by dynamic programming
// over the capacity (a multiple-choice knapsack); f_i = table row order[i] ({d, kQBasisWidths})
// or, with an empty table, `shared`. Writes the widths into bits[order[i]].
void knapsack(std::span<const double> weights, std::span<const double> table,
              std::span<const int64_t> order, const std::array<double, kQBasisWidths>& shared,
              int64_t unit, int64_t extra, int64_t capacity, std::vector<int>& bits,
              double& distortion) {
  const int64_t k = static_cast<int64_t>(order.size());
  const int64_t cap = std::min(capacity, k * (kQBasisMaxBits * unit + extra));
  // best[c]: least distortion of the directions so far within capacity c.
  std::vector<double> best(static_cast<size_t>(cap + 1), 0.0), next(best.size());
  std::vector<uint8_t> choice(static_cast<size_t>(k * (cap + 1)), 0);
  for (int64_t i = 0; i < k; ++i) {
    const double w = weights[order[i]];
    const double* f = table.empty() ? shared.data() : table.data() + order[i] * kQBasisWidths;
    for (int64_t c = 0; c <= cap; ++c) {
      double value = best[c] + w * f[0];
      int pick = 0;
      for (int b = 1; b <= kQBasisMaxBits; ++b) {
        const int64_t cost = b * unit + extra;
        if (cost > c) break;
        const double candidate = best[c - cost] + w * f[b];
        if (candidate < value) {
          value = candidate;
          pick = b;
        }
      }
      next[c] = value;
      choice[i * (cap + 1) + c] = static_cast<uint8_t>(pick);
    }
    best.swap(next);
  }
  distortion = best[cap];
  for (int64_t i = k - 1, c = cap; i >= 0; --i) {
    const int b = choice[i * (cap + 1) + c];
    bits[order[i]] = b;
    if (b > 0) c -= b * unit + extra;
  }
}

}  // namespace

std::vector<int> qbasis_allocate(std::span<const double> weights, int64_t budget_bits,
                                 CodecSpec::Axis axis, int64_t group,
                                 std::span<const double> distortion) {
  require(group >= 1, "query-basis group must be positive, got ", group);
  require(budget_bits >= 0, "query-basis budget must not be negative, got ", budget_bits);
  const int64_t d = static_cast<int64_t>(weights.size());
  std::vector<int> bits(static_cast<size_t>(d), 0);
  for (double w : weights)
    require(std::isfinite(w) && w >= 0, "query-basis weights must be finite and >= 0, got ", w);
  require(distortion.empty() || (static_cast<int64_t>(distortion.size()) == d * kQBasisWidths &&
                                 axis == CodecSpec::Axis::Channels),
          "query-basis distortion table: ", kQBasisWidths,
          " numbers per direction, per-channel groups only");
  for (double x : distortion)
    require(std::isfinite(x) && x >= 0, "query-basis distortions must be finite and >= 0, got ", x);
  std::array<double, kQBasisWidths> f{};
  for (int b = 0; b <= kQBasisMaxBits; ++b) f[b] = qbasis_relative_distortion(b, group);
  // With one f for all directions a heavier direction never gets fewer bits in an optimum
  // (swapping two directions' widths changes D by (w_i - w_j)(f(b_j) - f(b_i))), so the stored
  // directions are a prefix of the directions by weight (the `tok` search below relies on it;
  // the `chan` knapsack, which also takes per-direction tables, does not need it). Directions of
  // weight 0 are never stored.
  std::vector<int64_t> order;
  for (int64_t i = 0; i < d; ++i)
    if (weights[i] > 0) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return weights[a] > weights[b]; });
  if (order.empty()) return bits;
  if (axis == CodecSpec::Axis::Channels) {
    // Per G tokens a stored direction costs G·b code bits and one 32-bit pair: separable, in
    // units of gcd(G, 32) bits.
    int64_t unit = std::gcd(group, kPairBits);
    double ignored = 0;
    knapsack(weights, distortion, order, f, group / unit, kPairBits / unit, budget_bits / unit,
             bits, ignored);
    return bits;
  }
  // Per token: the code bits plus 32 per run of up to G stored directions. For P runs the
  // stored directions are among the P·G heaviest and the code bits may use budget - 32·P: a
  // separable knapsack for each P; the best of them is the optimum.
  double best = INFINITY;
  std::vector<int> trial(bits.size());
  const int64_t runs = (static_cast<int64_t>(order.size()) + group - 1) / group;
  for (int64_t p = 0; p <= runs; ++p) {
    const int64_t capacity = budget_bits - kPairBits * p;
    if (capacity < 0) break;
    const int64_t k = std::min<int64_t>(static_cast<int64_t>(order.size()), p * group);
    std::fill(trial.begin(), trial.end(), 0);
    double distortion = 0;
    knapsack(weights, {}, std::span(order).first(k), f, 1, 0, capacity, trial, distortion);
    for (int64_t i = k; i < static_cast<int64_t>(order.size()); ++i)
      distortion += weights[order[i]] * f[0];
    if (distortion < best) {
      best = distortion;
      bits = trial;
    }
  }
  return bits;
}

std::vector<double> qbasis_spread_distortion(std::span<const double> spread, int64_t group) {
  std::vector<double> table(spread.size() * kQBasisWidths);
  for (size_t i = 0; i < spread.size(); ++i) {
    require(std::isfinite(spread[i]) && spread[i] >= 0 && spread[i] <= 1,
            "query-basis within-group spread must be in [0, 1], got ", spread[i]);
    table[i * kQBasisWidths] = 1.0;
    for (int b = 1; b <= kQBasisMaxBits; ++b)
      table[i * kQBasisWidths + b] = spread[i] * qbasis_relative_distortion(b, group);
  }
  return table;
}

std::vector<double> qbasis_distortion_table(const QBasisHead& head, int64_t group) {
  if (!head.fisher.empty()) {
    require(static_cast<int64_t>(head.fisher.size()) == head.dim * kQBasisWidths,
            "query-basis Fisher table: ", kQBasisWidths, " numbers per direction");
    std::vector<double> table(head.fisher.size(), 0.0);
    for (int64_t i = 0; i < head.dim; ++i) {
      const double weight = head.weight(i);
      if (weight > 0)
        for (int b = 0; b <= kQBasisMaxBits; ++b)
          table[i * kQBasisWidths + b] = head.fisher[i * kQBasisWidths + b] / weight;
    }
    return table;
  }
  if (!head.group_distortion.empty()) {
    require(static_cast<int64_t>(head.group_distortion.size()) == head.dim * kQBasisMaxBits,
            "query-basis measured distortion: ", kQBasisMaxBits, " numbers per direction");
    std::vector<double> table(static_cast<size_t>(head.dim * kQBasisWidths));
    for (int64_t i = 0; i < head.dim; ++i) {
      table[i * kQBasisWidths] = 1.0;
      std::copy_n(head.group_distortion.begin() + i * kQBasisMaxBits, kQBasisMaxBits,
                  table.begin() + i * kQBasisWidths + 1);
    }
    return table;
  }
  if (!head.group_spread.empty()) return qbasis_spread_distortion(head.group_spread, group);
  return {};
}

namespace {

// x̂_i - x_i of every key of `keys` ({n, d}, whole groups of `group`) and direction i at every
// width b = 0..kQBasisMaxBits ({n, d, kQBasisWidths}, in units of σ_i), coded as a `chan` store
// codes a token group: the same float arithmetic, c_i = u_i·k, x_i = (c_i - m_i) / σ_i, one fp16
// scale and zero per group at b bits; at 0 bits x̂_i = 0 (read as the mean). Directions with
// σ_i = 0 are left at 0. `what` names the caller in errors.
std::vector<float> coding_errors(const QBasisHead& head, std::span<const float> keys, int64_t group,
                                 const char* what) {
  const int64_t d = head.dim, width = kQBasisWidths;
  require(d > 0 && static_cast<int64_t>(head.rows.size()) == d * d &&
              static_cast<int64_t>(head.key_mean.size()) == d &&
              static_cast<int64_t>(head.key_std.size()) == d,
          what, ": head constants do not match head_dim ", d);
  require(group >= 1, what, ": the group must be positive, got ", group);
  const int64_t n = static_cast<int64_t>(keys.size()) / d;
  require(n * d == static_cast<int64_t>(keys.size()) && n % group == 0, what, ": ", keys.size(),
          " numbers are not whole groups of ", group, " keys of dimension ", d);
  const std::vector<float> rows(head.rows.begin(), head.rows.end());
  std::vector<float> errors(static_cast<size_t>(n * d * width), 0.0f);
  std::vector<float> column(static_cast<size_t>(group));
  std::vector<uint8_t> codes(static_cast<size_t>(group));
  for (int64_t i = 0; i < d; ++i) {
    if (!(head.key_std[i] > 0)) continue;
    const float mean = static_cast<float>(head.key_mean[i]);
    const float std = static_cast<float>(head.key_std[i]);
    for (int64_t g = 0; g < n / group; ++g) {
      float* out = errors.data() + (g * group * d + i) * width;
      for (int64_t t = 0; t < group; ++t) {
        column[t] =
            (vec::dot(rows.data() + i * d, keys.data() + (g * group + t) * d, d) - mean) / std;
        out[t * d * width] = -column[t];
      }
      for (int b = 1; b <= kQBasisMaxBits; ++b) {
        const int_rows::Affine affine = int_rows::quantize_group(column, b, codes);
        const float scale = fp16_to_float(affine.scale), zero = fp16_to_float(affine.zero);
        for (int64_t t = 0; t < group; ++t)
          out[t * d * width + b] = int_rows::dequantize(codes[t], scale, zero) - column[t];
      }
    }
  }
  return errors;
}

}  // namespace

std::vector<double> qbasis_measure_group_distortion(const QBasisHead& head,
                                                    std::span<const float> keys, int64_t group) {
  const std::vector<float> errors = coding_errors(head, keys, group, "query-basis distortion");
  const int64_t d = head.dim, n = static_cast<int64_t>(keys.size()) / d;
  require(n > 0, "query-basis distortion: no keys");
  std::vector<double> sums(static_cast<size_t>(d * kQBasisMaxBits), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < d; ++i)
      for (int b = 1; b <= kQBasisMaxBits; ++b) {
        const double error = errors[(t * d + i) * kQBasisWidths + b];
        sums[i * kQBasisMaxBits + b - 1] += error * error;
      }
  for (double& x : sums) x /= static_cast<double>(n);
  return sums;
}

void qbasis_accumulate_fisher(const QBasisHead& head, std::span<const float> keys, int64_t group,
                              int64_t window, std::span<const ObservedQuery> queries,
                              std::span<double> fisher) {
  const int64_t d = head.dim, width = kQBasisWidths;
  require(static_cast<int64_t>(fisher.size()) == d * width, "query-basis Fisher table: ", width,
          " numbers per direction");
  require(window >= 0, "query-basis Fisher measure: bad window ", window);
  const std::vector<float> errors = coding_errors(head, keys, group, "query-basis Fisher measure");
  const int64_t n = static_cast<int64_t>(keys.size()) / d;
  if (n == 0) return;
  std::vector<double> first(static_cast<size_t>(d * width)), second(first.size());
  for (const ObservedQuery& q : queries) {
    // What a store holds quantized once the query's key is in: Fp16Window flushes its oldest group
    // when it reaches window + group rows.
    const int64_t stored = q.position + 1;
    const int64_t coded =
        std::min(n, stored >= window + group ? (stored - window) / group * group : int64_t{0});
    if (coded == 0) continue;
    std::fill(first.begin(), first.end(), 0.0);
    std::fill(second.begin(), second.end(), 0.0);
    for (size_t k = 0; k < q.positions.size() && q.positions[k] < coded; ++k) {
      const double a = q.weights[k];
      const float* row = errors.data() + static_cast<int64_t>(q.positions[k]) * d * width;
      for (int64_t x = 0; x < d * width; ++x) {
        const double e = row[x];
        first[x] += a * e;
        second[x] += a * e * e;
      }
    }
    // Var_a(e) with e = 0 on the exact keys: the weights sum to 1 over every position read.
    for (int64_t i = 0; i < d; ++i) {
      double projection = 0;
      const double* s = head.dual(i);
      for (int64_t c = 0; c < d; ++c) projection += s[c] * q.query[c];
      // errors are in units of σ_i.
      const double energy = projection * projection * head.key_std[i] * head.key_std[i];
      for (int64_t b = 0; b < width; ++b) {
        const int64_t x = i * width + b;
        fisher[x] += energy * std::max(0.0, second[x] - first[x] * first[x]);
      }
    }
  }
}

uint64_t qbasis_random_seed(int64_t layer, int64_t kv_head) {
  constexpr uint64_t kSeed = 0x9ba5'150a'd0ULL;
  uint64_t state = kSeed ^ (static_cast<uint64_t>(layer) << 32) ^ static_cast<uint64_t>(kv_head);
  return splitmix64(state);
}

namespace {

// The constants of one head in basis `kind`; `what` names the codec in errors.
QBasisHead head_constants(QBasisSpec::Basis kind, const HeadqBasisVectors& basis, int64_t layer,
                          int64_t kv_head, const std::string& what) {
  const int64_t d = basis.head_dim;
  require(basis.rank == d, what, " needs every eigenvector of each head (rank ", d,
          ") but the basis holds rank ", basis.rank, " (calibrate with --rank ", d, ")");
  const size_t values = static_cast<size_t>(basis.heads() * d);
  require(basis.query_eigenvalues.size() == values && basis.key_eigenvalues.size() == values, what,
          ": the basis has no eigenvalues");
  require(basis.key_means.size() == values, what,
          ": the basis has no key means (it was written before they were recorded: calibrate "
          "again)");
  const int64_t index = layer * basis.kv_heads + kv_head;
  const std::span<const double> query_rows = basis.query_rows(layer, kv_head);
  const std::span<const double> key_rows = basis.key_rows(layer, kv_head);
  const double* query_values = basis.query_eigenvalues.data() + index * d;
  const double* key_values = basis.key_eigenvalues.data() + index * d;
  const double* mean = basis.key_means.data() + index * d;

  QBasisHead head;
  head.dim = d;
  switch (kind) {
    case QBasisSpec::Basis::Query:
      head.rows.assign(query_rows.begin(), query_rows.end());
      break;
    case QBasisSpec::Basis::KeyPca:
      head.rows.assign(key_rows.begin(), key_rows.end());
      break;
    case QBasisSpec::Basis::Random:
      head.rows = random_orthonormal_rows(d, d, qbasis_random_seed(layer, kv_head));
      break;
    case QBasisSpec::Basis::Weighted: {
      const std::span<const double> rows = basis.weighted_key_rows(layer, kv_head);
      const std::span<const double> dual = basis.weighted_key_dual_rows(layer, kv_head);
      require(!rows.empty(), what,
              " needs the query-weighted key basis, which this basis file does not hold "
              "(calibrate again at full rank)");
      head.rows.assign(rows.begin(), rows.end());
      head.dual_rows.assign(dual.begin(), dual.end());
      break;
    }
  }
  head.query_energy.resize(d);
  head.key_mean.resize(d);
  head.key_std.resize(d);
  for (int64_t i = 0; i < d; ++i) {
    const double* u = head.rows.data() + i * d;
    double m = 0;
    for (int64_t c = 0; c < d; ++c) m += u[c] * mean[c];
    // The score error of direction i is (s_i·q) times its coordinate's error: its weight is
    // s_iᵀ Σ_q s_i (s_i = u_i in an orthonormal basis).
    head.query_energy[i] = quadratic_form(head.dual(i), query_rows, query_values, d);
    head.key_mean[i] = m;
    head.key_std[i] = std::sqrt(std::max(0.0, quadratic_form(u, key_rows, key_values, d) - m * m));
  }
  return head;
}

}  // namespace

QBasisHead qbasis_head(QBasisSpec::Basis kind, const HeadqBasisVectors& basis, int64_t layer,
                       int64_t kv_head) {
  return head_constants(kind, basis, layer, kv_head, "query-basis codec");
}

QBasisHead qbasis_head(const CodecSpec& spec, const HeadqBasisVectors* basis, int64_t layers,
                       int64_t kv_heads, int64_t head_dim, int64_t layer, int64_t kv_head) {
  require(spec.is_qbasis(), "cache spec '", spec.text(), "' is not a query-basis codec");
  const int64_t d = head_dim;
  require(basis != nullptr, "key codec '", spec.text(),
          "' needs a calibrated basis at full rank (write one with `visikv calibrate --rank ", d,
          "`, pass it with --basis)");
  require(basis->layers == layers && basis->kv_heads == kv_heads && basis->head_dim == d,
          "basis has ", basis->layers, " layers x ", basis->kv_heads, " kv heads x head_dim ",
          basis->head_dim, "; the cache has ", layers, " x ", kv_heads, " x ", d);
  QBasisHead head = head_constants(spec.qbasis->basis, *basis, layer, kv_head,
                                   str_cat("key codec '", spec.text(), "'"));
  // Per-channel groups of the calibrated size allocate by what the calibration measured, unless
  // the spec asks for the i.i.d. model (:iid).
  // (key_group is 0 in a basis without it, and spec groups are at least 1.)
  if (spec.axis != CodecSpec::Axis::Channels || spec.qbasis->iid_groups ||
      spec.group != basis->key_group) {
    require(!spec.qbasis->fisher, "key codec '", spec.text(),
            "': ':fisher' needs per-channel groups of the calibrated size (",
            basis->key_group > 0 ? str_cat(basis->key_group, " tokens") : "none in this basis",
            ")");
    return head;
  }
  // The measured distortions where the basis has them, else the spread model from W (what
  // qbasis_distortion_table reads, in that order).
  const std::span<const double> measured =
      basis->key_group_distortion_rows(spec.qbasis->basis, layer, kv_head);
  head.group_distortion.assign(measured.begin(), measured.end());
  if (measured.empty()) {
    const int64_t index = layer * kv_heads + kv_head;
    const std::span<const double> group_rows = basis->key_group_rows(layer, kv_head);
    const double* group_values = basis->key_group_eigenvalues.data() + index * d;
    head.group_spread.resize(d);
    for (int64_t i = 0; i < d; ++i) {
      const double variance = head.key_std[i] * head.key_std[i];
      const double within = quadratic_form(head.rows.data() + i * d, group_rows, group_values, d);
      head.group_spread[i] = variance > 0 ? std::clamp(within / variance, 0.0, 1.0) : 1.0;
    }
  }
  if (spec.qbasis->fisher) {
    const std::span<const double> fisher =
        basis->key_fisher_rows(spec.qbasis->basis, layer, kv_head);
    require(
        !fisher.empty() && spec.window == basis->key_window, "key codec '", spec.text(),
        "': ':fisher' needs the attention-weighted errors the calibration measures at full rank "
        "for groups of ",
        basis->key_group, " tokens with a ", basis->key_window,
        "-token fp16 window (calibrate again at full rank; use :g", basis->key_group, ":chan:r",
        basis->key_window, ")");
    head.fisher.assign(fisher.begin(), fisher.end());
  }
  return head;
}

namespace {

// Code `bits` wide at bit `bit` of a stream with at least one byte after it.
inline uint32_t read_code(const uint8_t* stream, int64_t bit, int bits) {
  const uint8_t* p = stream + (bit >> 3);
  const uint32_t word = p[0] | uint32_t{p[1]} << 8;
  return (word >> (bit & 7)) & ((1u << bits) - 1);
}

inline void write_code(uint8_t* stream, int64_t bit, int bits, uint32_t code) {
  uint8_t* p = stream + (bit >> 3);
  const uint32_t shifted = (code & ((1u << bits) - 1)) << (bit & 7);
  p[0] = static_cast<uint8_t>(p[0] | (shifted & 0xff));
  p[1] = static_cast<uint8_t>(p[1] | (shifted >> 8));
}

// Scratch for const reads, one per thread: grows to the largest call and is then reused, so the
// score path allocates nothing in steady state.
std::span<float> thread_scratch(size_t size) {
  thread_local std::vector<float> scratch;
  if (scratch.size() < size) scratch.resize(size);
  return {scratch.data(), size};
}

class QBasisStoreImpl final : public QBasisKeyStore {
 public:
  QBasisStoreImpl(const CodecSpec& spec, QBasisHead head, int64_t reserve)
      : dim_(head.dim),
        token_group_(spec.token_group()),
        axis_(spec.axis),
        group_(spec.group),
        head_(std::move(head)),
        window_(dim_, token_group_, spec.window) {
    require(static_cast<int64_t>(head_.rows.size()) == dim_ * dim_ &&
                static_cast<int64_t>(head_.query_energy.size()) == dim_ &&
                static_cast<int64_t>(head_.key_mean.size()) == dim_ &&
                static_cast<int64_t>(head_.key_std.size()) == dim_,
            "query-basis store: head constants do not match head_dim ", dim_);
    std::vector<double> weights(dim_);
    for (int64_t i = 0; i < dim_; ++i) weights[i] = head_.weight(i);
    layout_.budget_bits = token_group_ * spec.qbasis->budget_milli * dim_ / 1000;
    layout_.bits = qbasis_allocate(weights, layout_.budget_bits, axis_, group_,
                                   qbasis_distortion_table(head_, group_));
    layout_.used_bits = qbasis_group_cost(layout_.bits, axis_, group_);
    // Stored directions, widest first (ties in basis order): each width is one run of codes.
    for (int b = kQBasisMaxBits; b >= 1; --b)
      for (int64_t i = 0; i < dim_; ++i)
        if (layout_.bits[i] == b) active_.push_back(i);
    const int64_t a_count = static_cast<int64_t>(active_.size());
    layout_.stored_directions = a_count;
    for (int64_t a = 0; a < a_count; ++a) {
      const int b = layout_.bits[active_[a]];
      width_.push_back(b);
      offset_.push_back(code_bits_);
      code_bits_ += b;
      // `tok`: a new pair every G stored directions.
      if (axis_ == CodecSpec::Axis::Tokens) {
        if (a == 0 || segment_start_.back() + group_ == a) segment_start_.push_back(a);
        pair_.push_back(static_cast<int64_t>(segment_start_.size()) - 1);
      } else {
        pair_.push_back(a);
      }
    }
    pairs_ =
        axis_ == CodecSpec::Axis::Tokens ? static_cast<int64_t>(segment_start_.size()) : a_count;
    segment_start_.push_back(a_count);
    layout_.parameter_pairs = pairs_;
    region_bits_ = layout_.budget_bits - kPairBits * pairs_;
    require(region_bits_ >= token_group_ * code_bits_, "query-basis store: allocation over budget");
    rows_.assign(head_.rows.begin(), head_.rows.end());
    const std::vector<double>& dual = head_.dual_rows.empty() ? head_.rows : head_.dual_rows;
    dual_.assign(dual.begin(), dual.end());
    mean_.assign(head_.key_mean.begin(), head_.key_mean.end());
    for (int64_t a = 0; a < a_count; ++a)
      active_std_.push_back(static_cast<float>(head_.key_std[active_[a]]));
    values_.resize(static_cast<size_t>(token_group_ * std::max<int64_t>(a_count, 1)));
    codes_tmp_.resize(values_.size());
    column_.resize(static_cast<size_t>(token_group_));
    column_codes_.resize(static_cast<size_t>(token_group_));
    rotated_.resize(static_cast<size_t>(dim_));
    stream_.reserve(static_cast<size_t>(reserve / token_group_ * region_bits_ / 8 + 2));
    params_.reserve(static_cast<size_t>(reserve / token_group_ * 2 * pairs_));
  }

  const QBasisLayout& layout() const override { return layout_; }
  const QBasisHead& head() const override { return head_; }

  int64_t dim() const override { return dim_; }
  int64_t size() const override { return window_.size(); }
  int64_t quantized_size() const override { return window_.quantized(); }

  void append(std::span<const float> vector) override {
    window_.append(vector, [this](const float* rows, int64_t tokens) { quantize(rows, tokens); });
  }

  void dot(std::span<const float> queries, const PositionSet& positions,
           std::span<float> scores) const override {
    const int64_t n = positions.size(), count = static_cast<int64_t>(queries.size()) / dim_;
    const int64_t a_count = static_cast<int64_t>(active_.size());
    // Per query: (u_i·q) σ_i for the stored directions and the constant (U q)·m.
    const std::span<float> scratch =
        thread_scratch(static_cast<size_t>(count * a_count + count + a_count + dim_));
    float* weighted = scratch.data();
    float* constant = weighted + count * a_count;
    float* decoded = constant + count;
    float* rotated = decoded + a_count;
    for (int64_t q = 0; q < count; ++q) {
      const float* query = queries.data() + q * dim_;
      for (int64_t i = 0; i < dim_; ++i)
        rotated[i] = vec::dot(dual_.data() + i * dim_, query, dim_);
      constant[q] = vec::dot(rotated, mean_.data(), dim_);
      for (int64_t a = 0; a < a_count; ++a)
        weighted[q * a_count + a] = rotated[active_[a]] * active_std_[a];
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t position = positions[i];
      if (position < window_.quantized()) {
        decode(position, decoded);
        for (int64_t q = 0; q < count; ++q)
          scores[q * n + i] = constant[q] + vec::dot(weighted + q * a_count, decoded, a_count);
      } else {
        const uint16_t* row = window_.row(position);
        for (int64_t q = 0; q < count; ++q)
          scores[q * n + i] = vec::dot(row, false, queries.data() + q * dim_, dim_);
      }
    }
  }

  void reconstruct(int64_t position, std::span<float> out) const override {
    if (position >= window_.quantized()) {
      window_.widen(position, out);
      return;
    }
    const int64_t a_count = static_cast<int64_t>(active_.size());
    const std::span<float> scratch = thread_scratch(static_cast<size_t>(a_count + dim_));
    float* decoded = scratch.data();
    float* coordinates = decoded + a_count;
    decode(position, decoded);
    std::copy(mean_.begin(), mean_.end(), coordinates);
    for (int64_t a = 0; a < a_count; ++a) coordinates[active_[a]] += active_std_[a] * decoded[a];
    std::fill(out.begin(), out.end(), 0.0f);
    for (int64_t i = 0; i < dim_; ++i)
      vec::axpy(coordinates[i], dual_.data() + i * dim_, out.data(), dim_);
  }

  int64_t stored_bytes() const override {
    const int64_t code_bytes = (window_.quantized() / token_group_ * region_bits_ + 7) / 8;
    return code_bytes + static_cast<int64_t>(2 * params_.size()) + window_.stored_bytes();
  }

  void clear() override {
    stream_.clear();
    params_.clear();
    window_.clear();
  }

  int64_t decode_equivalent_appends() const override { return window_.decode_equivalent_appends(); }

 private:
  // `tok`: the grid step of a b-bit direction over a run's range [zero, top] (the same float
  // expression when coding and decoding).
  static float step(float zero, float top, int bits) {
    return (top - zero) / static_cast<float>((1 << bits) - 1);
  }

  // x̂ of the stored directions of quantized key `position`, into out[0 .. active).
  void decode(int64_t position, float* out) const {
    const int64_t group = token_group_ == 1 ? position : position / token_group_;
    const int64_t base = group * region_bits_ + (position - group * token_group_) * code_bits_;
    const uint16_t* params = params_.data() + group * 2 * pairs_;
    const uint8_t* stream = stream_.data();
    if (axis_ == CodecSpec::Axis::Tokens) {
      for (int64_t s = 0; s + 1 < static_cast<int64_t>(segment_start_.size()); ++s) {
        const float zero = fp16_to_float(params[2 * s]), top = fp16_to_float(params[2 * s + 1]);
        for (int64_t a = segment_start_[s]; a < segment_start_[s + 1]; ++a)
          out[a] = int_rows::dequantize(read_code(stream, base + offset_[a], width_[a]),
                                        step(zero, top, width_[a]), zero);
      }
    } else {
      for (int64_t a = 0; a < static_cast<int64_t>(active_.size()); ++a)
        out[a] =
            int_rows::dequantize(read_code(stream, base + offset_[a], width_[a]),
                                 fp16_to_float(params[2 * a]), fp16_to_float(params[2 * a + 1]));
    }
  }

  // Appends `tokens` keys ({tokens, dim}, one token group) in quantized form.
  void quantize(const float* keys, int64_t tokens) {
    const int64_t a_count = static_cast<int64_t>(active_.size());
    // x = (U k - m) / σ on the stored directions, token-major.
    for (int64_t t = 0; t < tokens; ++t) {
      const float* key = keys + t * dim_;
      for (int64_t a = 0; a < a_count; ++a) {
        const int64_t i = active_[a];
        const float c = vec::dot(rows_.data() + i * dim_, key, dim_);
        values_[t * a_count + a] = (c - mean_[i]) / active_std_[a];
      }
    }
    const size_t first = params_.size();
    params_.resize(first + 2 * pairs_);
    const auto set_pair = [&](int64_t pair, int_rows::Affine affine) {
      params_[first + 2 * pair] = affine.scale;
      params_[first + 2 * pair + 1] = affine.zero;
    };
    if (axis_ == CodecSpec::Axis::Tokens) {
      // One range per run of directions; each direction codes it on its own 2^b-level grid.
      for (int64_t s = 0; s < pairs_; ++s) {
        float lo = INFINITY, hi = -INFINITY;
        for (int64_t a = segment_start_[s]; a < segment_start_[s + 1]; ++a) {
          lo = std::min(lo, values_[a]);
          hi = std::max(hi, values_[a]);
        }
        const uint16_t zero_half = int_rows::fp16_round_down(lo);
        const uint16_t top_half = int_rows::fp16_round_up(hi);
        params_[first + 2 * s] = zero_half;
        params_[first + 2 * s + 1] = top_half;
        const float zero = fp16_to_float(zero_half), top = fp16_to_float(top_half);
        for (int64_t a = segment_start_[s]; a < segment_start_[s + 1]; ++a)
          codes_tmp_[a] = int_rows::affine_code(values_[a], step(zero, top, width_[a]), zero,
                                                (1 << width_[a]) - 1);
      }
    } else {
      for (int64_t a = 0; a < a_count; ++a) {
        for (int64_t t = 0; t < tokens; ++t) column_[t] = values_[t * a_count + a];
        set_pair(a, int_rows::quantize_group(column_, width_[a], column_codes_));
        for (int64_t t = 0; t < tokens; ++t) codes_tmp_[t * a_count + a] = column_codes_[t];
      }
    }
    const int64_t group = window_.quantized() / token_group_;
    // One spare byte past the last code: read_code and write_code touch two bytes.
    stream_.resize(static_cast<size_t>(((group + 1) * region_bits_ + 7) / 8 + 1), 0);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t a = 0; a < a_count; ++a)
        write_code(stream_.data(), group * region_bits_ + t * code_bits_ + offset_[a], width_[a],
                   codes_tmp_[t * a_count + a]);
  }

  int64_t dim_, token_group_;
  CodecSpec::Axis axis_;
  int64_t group_;
  QBasisHead head_;
  QBasisLayout layout_;
  std::vector<int64_t> active_;         // stored directions (basis indices), widest first
  std::vector<int> width_;              // bits of active_[a]
  std::vector<int64_t> offset_;         // bit offset of active_[a] within a token's codes
  std::vector<int64_t> pair_;           // the (scale, zero) pair of active_[a] in a token group
  std::vector<int64_t> segment_start_;  // `tok`: first active index of each pair, then the count
  int64_t pairs_ = 0, code_bits_ = 0;   // pairs per token group, code bits per token
  int64_t region_bits_ = 0;             // code bits per token group, padding included
  // U ({d, d}: c = U k), its dual rows (k = Σ_i c_i s_i; U itself when orthonormal), m, σ of the
  // stored directions.
  std::vector<float> rows_, dual_, mean_, active_std_;
  Fp16Window window_;            // tokens [quantized_size(), size())
  std::vector<uint8_t> stream_;  // codes: token group g at bit g · region_bits_
  // Per token group, pairs_ fp16 pairs: `tok` (zero, top) of a run's range, `chan` (scale, zero).
  std::vector<uint16_t> params_;
  // Append-time scratch.
  std::vector<float> values_, column_, rotated_;
  std::vector<uint8_t> codes_tmp_, column_codes_;
};

}  // namespace

std::unique_ptr<QBasisKeyStore> make_qbasis_key_store(const CodecSpec& spec, QBasisHead head,
                                                      int64_t reserve_tokens) {
  require(spec.is_qbasis(), "cache spec '", spec.text(), "' is not a query-basis codec");
  check_codec_fits(spec, head.dim);
  require(reserve_tokens >= 0, "cache reserve must not be negative, got ", reserve_tokens);
  return std::make_unique<QBasisStoreImpl>(spec, std::move(head), reserve_tokens);
}

}  // namespace visikv

#include "visikv/calibration/calibrate.h"

#include <cblas.h>

#include <algorithm>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "visikv/attention/attention.h"
#include "visikv/calibration/basis_file.h"
#include "visikv/calibration/symmetric_eigen.h"
#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/kv/forwarding_cache.h"
#include "visikv/kv/qbasis.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {

namespace {

// Σ += Xᵀ X for X = rows of `d` floats (upper triangle of the row-major d x d Σ).
void add_outer_products(std::span<const float> rows, int64_t d, std::span<double> sigma,
                        std::vector<double>& scratch) {
  const int64_t count = static_cast<int64_t>(rows.size()) / d;
  if (count == 0) return;
  scratch.assign(rows.begin(), rows.end());
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(d), static_cast<int>(count),
              1.0, scratch.data(), static_cast<int>(d), 1.0, sigma.data(), static_cast<int>(d));
}

// Copies every query head's query into a {layers, tokens, heads, head_dim} buffer. Each event
// writes its own slot, so worker threads need no lock.
class QueryCollector final : public AttentionObserver {
 public:
  QueryCollector(int64_t layers, int64_t heads, int64_t head_dim)
      : layers_(layers), heads_(heads), head_dim_(head_dim) {}
  void start(int64_t tokens) {
    tokens_ = tokens;
    queries_.assign(static_cast<size_t>(layers_ * tokens * heads_ * head_dim_), 0.0f);
  }
  void observe(const AttentionEvent& e) override {
    // The cache is cleared before each window, so positions count from 0.
    if (e.position < 0 || e.position >= tokens_ || e.layer < 0 || e.layer >= layers_ ||
        e.head < 0 || e.head >= heads_ || static_cast<int64_t>(e.query.size()) != head_dim_)
      return;
    std::copy(e.query.begin(), e.query.end(),
              queries_.begin() + ((e.layer * tokens_ + e.position) * heads_ + e.head) * head_dim_);
  }
  // Queries of `layer` for the query heads [first_head, first_head + count), token-major.
  std::vector<float> rows(int64_t layer, int64_t first_head, int64_t count) const {
    std::vector<float> out;
    out.reserve(static_cast<size_t>(tokens_ * count * head_dim_));
    for (int64_t t = 0; t < tokens_; ++t) {
      const auto at = queries_.begin() + ((layer * tokens_ + t) * heads_ + first_head) * head_dim_;
      out.insert(out.end(), at, at + count * head_dim_);
    }
    return out;
  }

 private:
  int64_t layers_, heads_, head_dim_, tokens_ = 0;
  std::vector<float> queries_;
};

// Copies the queries of every kFisherQueryStride-th position, with the positions they read and
// their attention weights. Worker threads observe: samples are added under a lock.
class AttentionSampler final : public AttentionObserver {
 public:
  struct Sample {
    int64_t layer, head, position;
    std::vector<float> query;
    std::vector<int32_t> positions;
    std::vector<float> weights;
  };
  void observe(const AttentionEvent& e) override {
    if (e.position % kFisherQueryStride != kFisherQueryStride - 1) return;
    Sample sample{e.layer, e.head, e.position, {e.query.begin(), e.query.end()}, {}, {}};
    sample.positions.resize(static_cast<size_t>(e.positions.size()));
    for (int64_t i = 0; i < e.positions.size(); ++i)
      sample.positions[i] = static_cast<int32_t>(e.positions[i]);
    sample.weights.assign(e.weights.begin(), e.weights.end());
    const std::lock_guard lock(mutex_);
    samples_.push_back(std::move(sample));
  }
  std::vector<Sample>& samples() { return samples_; }

 private:
  std::mutex mutex_;
  std::vector<Sample> samples_;
};

// A dense f32 cache that also accumulates E[k kᵀ] of every appended key (keys are appended
// post-RoPE, in the coordinates scores use), and the scatter of the keys about the mean of their
// group of kCalibratedKeyGroup consecutive positions (whole groups of each window, aligned to its
// first position as a cache's per-channel groups are). Append runs on the calling thread, layer by
// layer.
class KeyMomentCache final : public ForwardingCache {
 public:
  KeyMomentCache(const CacheShape& shape, int64_t reserve)
      : ForwardingCache(make_dense_cache(shape, DenseFormat::F32, reserve)),
        sigma_(static_cast<size_t>(shape.layers * shape.kv_heads * shape.head_dim * shape.head_dim),
               0.0),
        group_sigma_(sigma_.size(), 0.0),
        key_sums_(static_cast<size_t>(shape.layers * shape.kv_heads * shape.head_dim), 0.0),
        pending_(static_cast<size_t>(shape.layers * shape.kv_heads * kCalibratedKeyGroup *
                                     shape.head_dim)),
        group_keys_(static_cast<size_t>(shape.layers * shape.kv_heads)) {}

  void append(int64_t layer, std::span<const float> keys, std::span<const float> values,
              int64_t tokens) override {
    const int64_t first = length(layer);
    ForwardingCache::append(layer, keys, values, tokens);
    const CacheShape& s = shape();
    const int64_t d = s.head_dim, g = kCalibratedKeyGroup;
    std::vector<float> rows(static_cast<size_t>(tokens * d));
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      const int64_t head = layer * s.kv_heads + h;
      for (int64_t t = 0; t < tokens; ++t)
        std::copy_n(keys.begin() + (t * s.kv_heads + h) * d, d, rows.begin() + t * d);
      add_outer_products(rows, d, head_sigma(layer, h), scratch_);
      double* sum = key_sums_.data() + head * d;
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t c = 0; c < d; ++c) sum[c] += rows[t * d + c];
      // Positions wait in `pending_` until their group is whole, then enter W centred on the
      // group's mean.
      float* pending = pending_.data() + head * g * d;
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t slot = (first + t) % g;
        std::copy_n(rows.begin() + t * d, d, pending + slot * d);
        if (slot + 1 < g) continue;
        std::vector<double>& mean = group_mean_;
        mean.assign(static_cast<size_t>(d), 0.0);
        for (int64_t i = 0; i < g; ++i)
          for (int64_t c = 0; c < d; ++c) mean[c] += pending[i * d + c];
        for (int64_t c = 0; c < d; ++c) mean[c] /= static_cast<double>(g);
        centred_.resize(static_cast<size_t>(g * d));
        for (int64_t i = 0; i < g; ++i)
          for (int64_t c = 0; c < d; ++c)
            centred_[i * d + c] = static_cast<float>(pending[i * d + c] - mean[c]);
        add_outer_products(centred_, d, std::span(group_sigma_).subspan(head * d * d, d * d),
                           scratch_);
        // The group as a cache codes it: its keys leave the fp16 window rounded to fp16.
        std::vector<float>& kept = group_keys_[head];
        for (int64_t i = 0; i < g * d; ++i)
          kept.push_back(fp16_to_float(float_to_fp16(pending[i])));
        if (head == 0) group_tokens_ += g;
      }
    }
  }

  // Σ_t k_t of one head ({d}).
  std::span<const double> head_key_sum(int64_t layer, int64_t kv_head) const {
    const int64_t d = shape().head_dim;
    return std::span(key_sums_).subspan((layer * shape().kv_heads + kv_head) * d, d);
  }

  std::span<double> head_sigma(int64_t layer, int64_t kv_head) {
    const int64_t d = shape().head_dim;
    return std::span(sigma_).subspan((layer * shape().kv_heads + kv_head) * d * d, d * d);
  }
  // Σ over whole groups of (k - k̄_g)(k - k̄_g)ᵀ, and the positions it holds (per head).
  std::span<double> head_group_sigma(int64_t layer, int64_t kv_head) {
    const int64_t d = shape().head_dim;
    return std::span(group_sigma_).subspan((layer * shape().kv_heads + kv_head) * d * d, d * d);
  }
  int64_t group_tokens() const { return group_tokens_; }
  // The keys of those whole groups ({group_tokens(), d}), rounded to fp16.
  std::span<const float> head_group_keys(int64_t layer, int64_t kv_head) const {
    return group_keys_[layer * shape().kv_heads + kv_head];
  }

 private:
  std::vector<double> sigma_;        // {layers, kv_heads, d, d}, upper triangles
  std::vector<double> group_sigma_;  // the same about the group means
  std::vector<double> key_sums_;     // {layers, kv_heads, d}: for the key means
  std::vector<float> pending_;       // {layers, kv_heads, G, d}: the current group's keys
  std::vector<float> centred_;       // the group's keys less its mean
  std::vector<std::vector<float>> group_keys_;  // per head, the keys of its whole groups
  std::vector<double> group_mean_;
  std::vector<double> scratch_;
  int64_t group_tokens_ = 0;  // positions in whole groups (of head 0; every head has as many)
};

// Mirrors the upper triangle, divides by `count`, and returns the eigenvalues and the top
// `rank` eigenvectors.
void decompose(std::span<double> sigma, int64_t d, double count, int64_t rank,
               std::span<double> values, std::span<double> vectors) {
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = i; j < d; ++j) {
      const double x = sigma[i * d + j] / count;
      sigma[i * d + j] = sigma[j * d + i] = x;
    }
  const SymmetricEigen eigen = symmetric_eigen(sigma, d);
  std::copy(eigen.values.begin(), eigen.values.end(), values.begin());
  std::copy_n(eigen.vectors.begin(), rank * d, vectors.begin());
}

// The query-weighted key PCA of one head (HeadqBasisVectors::weighted_rows): with Σ_q = Q Λ Qᵀ
// (`query_values`, `query_rows`: every eigenpair) and B = Q Λ^{1/2} (Λ floored at
// kWeightedBasisFloor of its largest), the eigenvectors v_j of Bᵀ Cov(k) B give rows t_j = B v_j
// and dual rows s_j = Q Λ^{-1/2} v_j, in descending order of the eigenvalue (the variance of
// t_j·k, which is also its weight: s_jᵀ Σ_q s_j = 1).
void weighted_key_basis(std::span<const double> query_values, std::span<const double> query_rows,
                        std::span<const double> key_second_moment, std::span<const double> key_mean,
                        int64_t d, std::span<double> rows, std::span<double> dual_rows) {
  const double largest = std::max(0.0, query_values[0]);
  std::vector<double> root(d), inverse_root(d);
  for (int64_t i = 0; i < d; ++i) {
    const double lambda = std::max(query_values[i], kWeightedBasisFloor * largest);
    root[i] = lambda > 0 ? std::sqrt(lambda) : 1.0;
    inverse_root[i] = 1.0 / root[i];
  }
  // B = Q Λ^{1/2} as columns: column i = root_i · (row i of query_rows).
  std::vector<double> cov(static_cast<size_t>(d * d));
  for (int64_t a = 0; a < d; ++a)
    for (int64_t b = 0; b < d; ++b)
      cov[a * d + b] = key_second_moment[a * d + b] - key_mean[a] * key_mean[b];
  // C Q (d x d), then A = Λ^{1/2} Qᵀ C Q Λ^{1/2}.
  std::vector<double> cq(static_cast<size_t>(d * d), 0.0), a_matrix(static_cast<size_t>(d * d));
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(d), static_cast<int>(d),
              static_cast<int>(d), 1.0, cov.data(), static_cast<int>(d), query_rows.data(),
              static_cast<int>(d), 0.0, cq.data(), static_cast<int>(d));
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(d), static_cast<int>(d),
              static_cast<int>(d), 1.0, query_rows.data(), static_cast<int>(d), cq.data(),
              static_cast<int>(d), 0.0, a_matrix.data(), static_cast<int>(d));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) a_matrix[i * d + j] *= root[i] * root[j];
  const SymmetricEigen eigen = symmetric_eigen(a_matrix, d);
  // t_j = Σ_i root_i v_j[i] q_i, s_j = Σ_i v_j[i] q_i / root_i.
  std::fill(rows.begin(), rows.end(), 0.0);
  std::fill(dual_rows.begin(), dual_rows.end(), 0.0);
  for (int64_t j = 0; j < d; ++j)
    for (int64_t i = 0; i < d; ++i) {
      const double v = eigen.vectors[j * d + i];
      for (int64_t c = 0; c < d; ++c) {
        rows[j * d + c] += root[i] * v * query_rows[i * d + c];
        dual_rows[j * d + c] += inverse_root[i] * v * query_rows[i * d + c];
      }
    }
}

// The Fisher tables (HeadqBasisVectors::key_fisher): the windows run again with an attention
// sampler; each head's sampled queries read the keys of their window's whole groups (`cache`
// holds them from the first pass, window after window).
// `constants`: per head and basis kind ({heads, kinds}), the head's query-basis constants.
void measure_fisher(Decoder& decoder, const std::vector<std::vector<int32_t>>& windows,
                    const KeyMomentCache& cache, std::span<const QBasisHead> constants,
                    HeadqBasis& basis, const std::function<void(int64_t)>& window_done) {
  const int64_t d = basis.head_dim, heads = basis.heads(), kinds = QBasisSpec::kBases;
  const int64_t query_group = decoder.model().config().group_size();
  const int64_t per_kind = d * kQBasisWidths;
  basis.key_window = kCalibratedKeyWindow;
  basis.key_fisher.assign(static_cast<size_t>(heads * kinds * per_kind), 0.0);
  std::vector<int64_t> samples_per_head(static_cast<size_t>(heads), 0);
  int64_t key_offset = 0;  // tokens of whole groups before this window
  for (const std::vector<int32_t>& window : windows) {
    const int64_t n = static_cast<int64_t>(window.size());
    const int64_t whole = n / kCalibratedKeyGroup * kCalibratedKeyGroup;
    auto dense = make_dense_cache(decoder.cache_shape(), DenseFormat::F32, n);
    AttentionSampler sampler;
    decoder.forward(window, *dense, LogitRows::Last,
                    [](int64_t, int64_t, std::span<const float>) {}, {.observer = &sampler});
    // Each head's samples, as spans.
    std::vector<std::vector<ObservedQuery>> observed(static_cast<size_t>(heads));
    for (const AttentionSampler::Sample& s : sampler.samples()) {
      const int64_t head = s.layer * basis.kv_heads + s.head / query_group;
      observed[head].push_back({s.position, s.query, s.positions, s.weights});
    }
    for (int64_t i = 0; i < heads; ++i)
      samples_per_head[i] += static_cast<int64_t>(observed[i].size());
#pragma omp parallel for schedule(dynamic)
    for (int64_t job = 0; job < heads * kinds; ++job) {
      const int64_t i = job / kinds;
      const std::span<const float> keys =
          cache.head_group_keys(i / basis.kv_heads, i % basis.kv_heads)
              .subspan(key_offset * d, whole * d);
      qbasis_accumulate_fisher(constants[job], keys, kCalibratedKeyGroup, kCalibratedKeyWindow,
                               observed[i],
                               std::span(basis.key_fisher).subspan(job * per_kind, per_kind));
    }
    key_offset += whole;
    window_done(n);
  }
  for (int64_t job = 0; job < heads * kinds; ++job) {
    const double count = static_cast<double>(std::max<int64_t>(samples_per_head[job / kinds], 1));
    for (int64_t x = 0; x < per_kind; ++x) basis.key_fisher[job * per_kind + x] /= count;
  }
}

}  // namespace

HeadqBasis calibrate_headq(const Model& model, std::string_view text, const std::string& text_label,
                           const CalibrationOptions& options, const CalibrationProgress& progress) {
  require(!text.empty(), "calibration text '", text_label, "' is empty");
  const std::vector<int32_t> tokens = model.tokenizer().encode(text, false);
  return calibrate_headq(model, tokens, text_label, options, progress);
}

HeadqBasis calibrate_headq(const Model& model, std::span<const int32_t> tokens,
                           const std::string& text_label, const CalibrationOptions& options,
                           const CalibrationProgress& progress) {
  const Config& c = model.config();
  const int64_t d = c.head_dim, group = c.group_size();
  require(options.rank >= 1 && options.rank <= d, "calibration rank ", options.rank,
          " must be between 1 and the head dimension ", d);
  require(options.tokens >= 1, "calibration token count must be positive, got ", options.tokens);
  require(options.window >= 2, "calibration window must be at least 2 tokens, got ",
          options.window);
  require(!tokens.empty(), "calibration text '", text_label, "' is empty: it has no tokens");
  std::optional<int32_t> bos;
  if (model.tokenizer().adds_bos()) bos = model.tokenizer().bos_id();

  Decoder decoder(model);
  const CacheShape shape = decoder.cache_shape();
  // Windows never exceed the model's context (the basis records the window used).
  const int64_t window_length =
      c.max_positions > 1 ? std::min(options.window, c.max_positions) : options.window;
  KeyMomentCache cache(shape, window_length);
  QueryCollector collector(c.layers, c.heads, d);
  std::vector<double> query_sigma(static_cast<size_t>(shape.layers * shape.kv_heads * d * d), 0.0);
  std::vector<double> scratch;
  const int64_t text_per_window = bos ? window_length - 1 : window_length;
  const int64_t available = static_cast<int64_t>(tokens.size());
  // Positions to run: each window adds BOS (when used) to its text tokens.
  int64_t total = 0;
  for (int64_t start = 0; start < available && total < options.tokens; start += text_per_window)
    total += std::min(std::min(text_per_window, available - start) + (bos ? 1 : 0),
                      options.tokens - total);

  // At full rank the windows run twice (the Fisher tables' pass): progress counts both.
  const bool second_pass =
      options.rank == d && std::min(total, window_length) >= kCalibratedKeyGroup;
  const int64_t work = second_pass ? 2 * total : total;
  int64_t done = 0;
  std::vector<std::vector<int32_t>> windows;  // as run, for the second pass
  for (int64_t start = 0; start < available && done < total; start += text_per_window) {
    std::vector<int32_t>& window = windows.emplace_back();
    if (bos) window.push_back(*bos);
    const int64_t len = std::min(text_per_window, available - start);
    window.insert(window.end(), tokens.begin() + start, tokens.begin() + start + len);
    window.resize(static_cast<size_t>(std::min<int64_t>(window.size(), total - done)));
    const int64_t n = static_cast<int64_t>(window.size());
    cache.clear();
    collector.start(n);
    decoder.forward(window, cache, LogitRows::Last, [](int64_t, int64_t, std::span<const float>) {},
                    {.observer = &collector});
    for (int64_t l = 0; l < c.layers; ++l)
      for (int64_t h = 0; h < c.kv_heads; ++h)
        add_outer_products(collector.rows(l, h * group, group), d,
                           std::span(query_sigma).subspan((l * c.kv_heads + h) * d * d, d * d),
                           scratch);
    done += n;
    if (progress) progress(done, work);
  }

  HeadqBasis basis;
  basis.fingerprint = model_fingerprint(model);
  basis.model = model.source();
  basis.text = text_label;
  basis.tokens = done;
  basis.window = window_length;
  basis.layers = c.layers;
  basis.kv_heads = c.kv_heads;
  basis.head_dim = d;
  basis.rank = options.rank;
  const int64_t heads = basis.heads();
  basis.query_eigenvalues.resize(static_cast<size_t>(heads * d));
  basis.key_eigenvalues.resize(static_cast<size_t>(heads * d));
  basis.query_vectors.resize(static_cast<size_t>(heads * options.rank * d));
  basis.key_vectors.resize(static_cast<size_t>(heads * options.rank * d));
  basis.key_means.resize(static_cast<size_t>(heads * d));
  const bool group_spread = cache.group_tokens() > 0;
  if (group_spread) {
    basis.key_group = kCalibratedKeyGroup;
    basis.key_group_eigenvalues.resize(static_cast<size_t>(heads * d));
    basis.key_group_vectors.resize(static_cast<size_t>(heads * options.rank * d));
  }
  for (int64_t i = 0; i < heads; ++i) {
    const int64_t l = i / c.kv_heads, h = i % c.kv_heads;
    decompose(std::span(query_sigma).subspan(i * d * d, d * d), d,
              static_cast<double>(done * group), options.rank,
              std::span(basis.query_eigenvalues).subspan(i * d, d),
              std::span(basis.query_vectors).subspan(i * options.rank * d, options.rank * d));
    decompose(cache.head_sigma(l, h), d, static_cast<double>(done), options.rank,
              std::span(basis.key_eigenvalues).subspan(i * d, d),
              std::span(basis.key_vectors).subspan(i * options.rank * d, options.rank * d));
    if (group_spread)
      decompose(cache.head_group_sigma(l, h), d, static_cast<double>(cache.group_tokens()),
                options.rank, std::span(basis.key_group_eigenvalues).subspan(i * d, d),
                std::span(basis.key_group_vectors).subspan(i * options.rank * d, options.rank * d));
    const std::span<const double> sum = cache.head_key_sum(l, h);
    for (int64_t c = 0; c < d; ++c) basis.key_means[i * d + c] = sum[c] / static_cast<double>(done);
  }
  // With every eigenvector (what query-basis codecs need): the query-weighted key PCA, and what
  // coding each direction of each basis kind in groups actually costs on these keys.
  if (second_pass) {
    require(group_spread, "calibration: no whole group of ", kCalibratedKeyGroup, " positions");
    basis.weighted_rows.resize(static_cast<size_t>(heads * d * d));
    basis.weighted_dual_rows.resize(basis.weighted_rows.size());
    for (int64_t i = 0; i < heads; ++i) {
      const int64_t l = i / c.kv_heads, h = i % c.kv_heads;
      // decompose() left each moment symmetric and divided by its count.
      weighted_key_basis(std::span(basis.query_eigenvalues).subspan(i * d, d),
                         basis.query_rows(l, h), cache.head_sigma(l, h),
                         std::span(basis.key_means).subspan(i * d, d), d,
                         std::span(basis.weighted_rows).subspan(i * d * d, d * d),
                         std::span(basis.weighted_dual_rows).subspan(i * d * d, d * d));
    }
    // Per head and basis kind: its constants, then what coding its keys in groups costs.
    const int64_t kinds = QBasisSpec::kBases, jobs = heads * kinds;
    // (Built outside the parallel loop: an error must not escape a worker.)
    std::vector<QBasisHead> constants;
    for (int64_t job = 0; job < jobs; ++job)
      constants.push_back(qbasis_head(static_cast<QBasisSpec::Basis>(job % kinds), basis,
                                      job / kinds / c.kv_heads, job / kinds % c.kv_heads));
    const int64_t per_kind = d * kQBasisMaxBits;
    basis.key_group_distortion.resize(static_cast<size_t>(jobs * per_kind));
#pragma omp parallel for schedule(dynamic)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t i = job / kinds, l = i / c.kv_heads, h = i % c.kv_heads;
      const std::vector<double> measured = qbasis_measure_group_distortion(
          constants[job], cache.head_group_keys(l, h), kCalibratedKeyGroup);
      std::copy(measured.begin(), measured.end(),
                basis.key_group_distortion.begin() + job * per_kind);
    }
    int64_t rerun = done;
    measure_fisher(decoder, windows, cache, constants, basis, [&](int64_t n) {
      rerun += n;
      if (progress) progress(rerun, work);
    });
  }
  return basis;
}

}  // namespace visikv

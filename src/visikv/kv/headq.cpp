#include "visikv/kv/headq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/random.h"
#include "visikv/core/vec.h"
#include "visikv/kv/int_row_codec.h"
#include "visikv/kv/row_kernels.h"

namespace visikv {

namespace {

// Uniform in (0, 1): 53 random bits, never 0.
double uniform_open(uint64_t& state) {
  return (static_cast<double>(splitmix64(state) >> 11) + 0.5) * 0x1.0p-53;
}

class HeadqKeyStore final : public KeyStore {
 public:
  HeadqKeyStore(std::unique_ptr<KeyStore> base, const CodecSpec& spec, std::vector<float> rows)
      : base_(std::move(base)),
        side_(*spec.headq),
        dim_(base_->dim()),
        rank_(side_.rank),
        sign_(side_.wrong_sign ? -1.0f : 1.0f),
        // Windowed codecs quantize a key from its fp16 form when it leaves the window.
        from_fp16_(spec.window > 0 || spec.axis == CodecSpec::Axis::Channels),
        rows_(std::move(rows)),
        residual_(dim_),
        projected_(rank_),
        side_codes_(rank_) {
    require(static_cast<int64_t>(rows_.size()) == rank_ * dim_, "HeadQ basis: expected ", rank_,
            " x ", dim_, " numbers, got ", rows_.size());
  }

  int64_t dim() const override { return dim_; }
  int64_t size() const override { return base_->size(); }
  int64_t quantized_size() const override { return base_->quantized_size(); }

  void append(std::span<const float> vector) override {
    base_->append(vector);
    for (float x : vector) pending_.push_back(from_fp16_ ? fp16_to_float(float_to_fp16(x)) : x);
    // Side-code every key the base has quantized since the last append, oldest first.
    int64_t done = 0;
    while (coded_ < base_->quantized_size()) {
      encode(pending_.data() + done * dim_);
      ++done;
    }
    pending_.erase(pending_.begin(), pending_.begin() + done * dim_);
  }

  void dot(std::span<const float> queries, const PositionSet& positions,
           std::span<float> scores) const override {
    base_->dot(queries, positions, scores);
    if (coded_ == 0) return;
    const int64_t n = positions.size(), count = static_cast<int64_t>(queries.size()) / dim_;
    // sign · U_rᵀ q, once per query.
    std::vector<float> projected(static_cast<size_t>(count * rank_)), side(rank_);
    for (int64_t q = 0; q < count; ++q)
      for (int64_t j = 0; j < rank_; ++j)
        projected[q * rank_ + j] =
            sign_ * vec::dot(rows_.data() + j * dim_, queries.data() + q * dim_, dim_);
    if (rank_ % 8 == 0 && side_.bits <= 8)
      return add_corrections(projected, positions, count, scores);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t position = positions[i];
      if (position >= coded_) continue;
      decode(position, side.data());
      for (int64_t q = 0; q < count; ++q) {
        float correction = 0.0f;
        for (int64_t j = 0; j < rank_; ++j) correction += projected[q * rank_ + j] * side[j];
        scores[q * n + i] += correction;
      }
    }
  }

  void reconstruct(int64_t position, std::span<float> out) const override {
    base_->reconstruct(position, out);
    if (position >= coded_) return;
    std::vector<float> side(rank_);
    decode(position, side.data());
    for (int64_t j = 0; j < rank_; ++j)
      vec::axpy(sign_ * side[j], rows_.data() + j * dim_, out.data(), dim_);
  }

  int64_t stored_bytes() const override {
    return base_->stored_bytes() + static_cast<int64_t>(codes_.size() + 2 * params_.size());
  }

  // A side code is written when the base quantizes a key and never changes: the base's rule.
  int64_t decode_equivalent_appends() const override { return base_->decode_equivalent_appends(); }

  void clear() override {
    base_->clear();
    codes_.clear();
    params_.clear();
    pending_.clear();
    coded_ = 0;
  }

 private:
  // scores[q * n + i] += projected[q] · ĉ[positions[i]] for the side-coded positions, when codes
  // are integers (not float32 or fp16 numbers) and the rank is a multiple of 8: a key's codes are
  // then whole bytes (code j of position p at bit (p·r + j)·b), rows of the row codec with one
  // scale and zero each, read by the row kernels.
  void add_corrections(std::span<const float> projected, const PositionSet& positions,
                       int64_t count, std::span<float> scores) const {
    const int64_t n = positions.size();
    int64_t coded_here = 0;  // positions are ascending
    while (coded_here < n && positions[coded_here] < coded_) ++coded_here;
    row_kernels::IntRows rows;
    rows.bits = side_.bits;
    rows.shape = {rank_, rank_};
    rows.codes = codes_.data();
    rows.row_bytes = rank_ / 8 * side_.bits;
    rows.params = params_.data();  // (scale, zero) per position
    rows.params_per_token_group = 2;
    rows.zero_offset = 1;
    std::vector<float> corrections(static_cast<size_t>(count * coded_here));
    row_kernels::dot(rows, positions, coded_here, projected.data(), count, corrections.data(),
                     coded_here);
    for (int64_t q = 0; q < count; ++q)
      for (int64_t i = 0; i < coded_here; ++i) scores[q * n + i] += corrections[q * coded_here + i];
  }

  // Side code of the key at position coded_, whose pre-quantization value is `key`.
  void encode(const float* key) {
    base_->reconstruct(coded_, residual_);
    headq_project_residual(rows_, {key, static_cast<size_t>(dim_)}, residual_, projected_);
    const size_t at = codes_.size();
    if (side_.bits == 32) {
      codes_.resize(at + 4 * rank_);
      std::memcpy(codes_.data() + at, projected_.data(), 4 * rank_);
    } else if (side_.bits == 16) {
      codes_.resize(at + 2 * rank_);
      for (int64_t j = 0; j < rank_; ++j) {
        const uint16_t h = float_to_fp16(projected_[j]);
        std::memcpy(codes_.data() + at + 2 * j, &h, 2);
      }
    } else {
      const int_rows::Affine affine = int_rows::quantize_group(projected_, side_.bits, side_codes_);
      params_.push_back(affine.scale);
      params_.push_back(affine.zero);
      // Codes form one bit stream over all keys: code j of key p is code p·r + j.
      codes_.resize(static_cast<size_t>(int_rows::packed_bytes((coded_ + 1) * rank_, side_.bits)),
                    0);
      int_rows::pack(side_codes_, side_.bits, codes_, coded_ * rank_);
    }
    ++coded_;
  }

  // ĉ of the key at `position` (< coded_) into out[0 .. r).
  void decode(int64_t position, float* out) const {
    if (side_.bits == 32) {
      std::memcpy(out, codes_.data() + position * 4 * rank_, 4 * rank_);
      return;
    }
    if (side_.bits == 16) {
      for (int64_t j = 0; j < rank_; ++j) {
        uint16_t h;
        std::memcpy(&h, codes_.data() + (position * rank_ + j) * 2, 2);
        out[j] = fp16_to_float(h);
      }
      return;
    }
    const float scale = fp16_to_float(params_[2 * position]);
    const float zero = fp16_to_float(params_[2 * position + 1]);
    for (int64_t j = 0; j < rank_; ++j)
      out[j] = int_rows::dequantize(int_rows::code_at(codes_, side_.bits, position * rank_ + j),
                                    scale, zero);
  }

  std::unique_ptr<KeyStore> base_;
  HeadqSpec side_;
  int64_t dim_, rank_;
  float sign_;
  bool from_fp16_;
  std::vector<float> rows_;       // {rank, dim}: U_rᵀ
  int64_t coded_ = 0;             // keys [0, coded_) have a side code
  std::vector<uint8_t> codes_;    // side codes: bit stream (2-8 bits), fp16 or float32 numbers
  std::vector<uint16_t> params_;  // per key: fp16 scale, fp16 zero (2-8 bits only)
  std::vector<float> pending_;    // keys appended but not yet quantized by the base
  // Append-time scratch.
  std::vector<float> residual_, projected_;
  std::vector<uint8_t> side_codes_;
};

}  // namespace

void headq_project_residual(std::span<const float> rows, std::span<const float> key,
                            std::span<float> stored, std::span<float> projected) {
  const int64_t dim = static_cast<int64_t>(key.size());
  for (int64_t c = 0; c < dim; ++c) stored[c] = key[c] - stored[c];
  for (size_t j = 0; j < projected.size(); ++j)
    projected[j] = vec::dot(rows.data() + j * dim, stored.data(), dim);
}

void HeadqBasisVectors::check_vector_sizes() const {
  require(layers > 0 && kv_heads > 0 && head_dim > 0 && rank > 0 && rank <= head_dim,
          "HeadQ basis: bad shape (", layers, " layers, ", kv_heads, " kv heads, head_dim ",
          head_dim, ", rank ", rank, ")");
  const size_t vectors = static_cast<size_t>(heads() * rank * head_dim);
  require(query_vectors.size() == vectors && key_vectors.size() == vectors,
          "HeadQ basis: arrays do not match ", layers, " layers x ", kv_heads,
          " kv heads, head_dim ", head_dim, ", rank ", rank);
  const bool group_spread = key_group > 0;
  require(key_group >= 0 && key_group_vectors.size() == (group_spread ? vectors : 0) &&
              key_group_eigenvalues.size() ==
                  (group_spread ? static_cast<size_t>(heads() * head_dim) : 0),
          "HeadQ basis: the within-group key spread does not match ", layers, " layers x ",
          kv_heads, " kv heads, head_dim ", head_dim, ", rank ", rank, " (group ", key_group, ")");
  const size_t square = static_cast<size_t>(heads() * head_dim * head_dim);
  require((weighted_rows.empty() && weighted_dual_rows.empty()) ||
              (rank == head_dim && weighted_rows.size() == square &&
               weighted_dual_rows.size() == square),
          "HeadQ basis: the query-weighted key basis does not match ", layers, " layers x ",
          kv_heads, " kv heads, head_dim ", head_dim, ", rank ", rank);
  require(key_fisher.empty() ||
              (group_spread && rank == head_dim && key_window >= 0 &&
               key_fisher.size() ==
                   static_cast<size_t>(heads() * QBasisSpec::kBases * head_dim * kQBasisWidths)),
          "HeadQ basis: the Fisher tables do not match ", layers, " layers x ", kv_heads,
          " kv heads, head_dim ", head_dim, ", rank ", rank, " (group ", key_group, ")");
  require(key_group_distortion.empty() ||
              (group_spread && rank == head_dim &&
               key_group_distortion.size() ==
                   static_cast<size_t>(heads() * QBasisSpec::kBases * head_dim * kQBasisMaxBits)),
          "HeadQ basis: the measured group distortions do not match ", layers, " layers x ",
          kv_heads, " kv heads, head_dim ", head_dim, ", rank ", rank, " (group ", key_group, ")");
}

std::span<const double> HeadqBasisVectors::head_block(const std::vector<double>& all, int64_t layer,
                                                      int64_t kv_head, int64_t per_head) const {
  require(layer >= 0 && layer < layers && kv_head >= 0 && kv_head < kv_heads, "HeadQ basis: head (",
          layer, ", ", kv_head, ") out of range");
  if (all.empty()) return {};
  return std::span(all).subspan((layer * kv_heads + kv_head) * per_head, per_head);
}

std::span<const double> HeadqBasisVectors::query_rows(int64_t layer, int64_t kv_head) const {
  return head_block(query_vectors, layer, kv_head, rank * head_dim);
}

std::span<const double> HeadqBasisVectors::key_rows(int64_t layer, int64_t kv_head) const {
  return head_block(key_vectors, layer, kv_head, rank * head_dim);
}

std::span<const double> HeadqBasisVectors::key_group_rows(int64_t layer, int64_t kv_head) const {
  return head_block(key_group_vectors, layer, kv_head, rank * head_dim);
}

std::span<const double> HeadqBasisVectors::weighted_key_rows(int64_t layer, int64_t kv_head) const {
  return head_block(weighted_rows, layer, kv_head, head_dim * head_dim);
}

std::span<const double> HeadqBasisVectors::weighted_key_dual_rows(int64_t layer,
                                                                  int64_t kv_head) const {
  return head_block(weighted_dual_rows, layer, kv_head, head_dim * head_dim);
}

std::span<const double> HeadqBasisVectors::kind_block(const std::vector<double>& all,
                                                      int64_t per_direction, QBasisSpec::Basis kind,
                                                      int64_t layer, int64_t kv_head) const {
  const int64_t per_kind = head_dim * per_direction;
  const std::span<const double> head =
      head_block(all, layer, kv_head, QBasisSpec::kBases * per_kind);
  return head.empty() ? head : head.subspan(static_cast<int64_t>(kind) * per_kind, per_kind);
}

std::span<const double> HeadqBasisVectors::key_group_distortion_rows(QBasisSpec::Basis kind,
                                                                     int64_t layer,
                                                                     int64_t kv_head) const {
  return kind_block(key_group_distortion, kQBasisMaxBits, kind, layer, kv_head);
}

std::span<const double> HeadqBasisVectors::key_fisher_rows(QBasisSpec::Basis kind, int64_t layer,
                                                           int64_t kv_head) const {
  return kind_block(key_fisher, kQBasisWidths, kind, layer, kv_head);
}

std::vector<double> random_orthonormal_rows(int64_t rows, int64_t dim, uint64_t seed) {
  require(rows > 0 && dim > 0 && rows <= dim, "random orthonormal basis: ", rows,
          " rows of dimension ", dim);
  std::vector<double> out(static_cast<size_t>(rows * dim));
  uint64_t state = seed;
  for (size_t i = 0; i < out.size(); ++i) {  // Box-Muller
    const double u = uniform_open(state), v = uniform_open(state);
    out[i] = std::sqrt(-2.0 * std::log(u)) * std::cos(2.0 * std::numbers::pi * v);
  }
  require(orthonormalize_rows(out, rows, dim, 1e-12) < 0,
          "random orthonormal basis: degenerate draw");
  return out;
}

int64_t orthonormalize_rows(std::span<double> rows, int64_t count, int64_t dim, double min_norm) {
  require(count >= 0 && dim > 0 && static_cast<int64_t>(rows.size()) >= count * dim,
          "orthonormalize: ", rows.size(), " numbers for ", count, " rows of ", dim);
  for (int64_t j = 0; j < count; ++j) {
    double* row = rows.data() + j * dim;
    for (int pass = 0; pass < 2; ++pass) {  // twice: orthogonal to rounding
      for (int64_t i = 0; i < j; ++i) {
        const double* other = rows.data() + i * dim;
        double overlap = 0;
        for (int64_t c = 0; c < dim; ++c) overlap += row[c] * other[c];
        for (int64_t c = 0; c < dim; ++c) row[c] -= overlap * other[c];
      }
    }
    double norm = 0;
    for (int64_t c = 0; c < dim; ++c) norm += row[c] * row[c];
    norm = std::sqrt(norm);
    if (!(norm > min_norm)) return j;
    for (int64_t c = 0; c < dim; ++c) row[c] /= norm;
  }
  return -1;
}

uint64_t headq_random_seed(int64_t layer, int64_t kv_head) {
  constexpr uint64_t kSeed = 0x4ead'9b5a'15ULL;
  uint64_t state = kSeed ^ (static_cast<uint64_t>(layer) << 32) ^ static_cast<uint64_t>(kv_head);
  return splitmix64(state);
}

std::vector<float> headq_basis_rows(const CodecSpec& spec, const HeadqBasisVectors* basis,
                                    int64_t layers, int64_t kv_heads, int64_t head_dim,
                                    int64_t layer, int64_t kv_head) {
  require(spec.headq.has_value(), "cache spec '", spec.text(), "' has no HeadQ side code");
  const HeadqSpec& side = *spec.headq;
  std::vector<double> rows;
  if (side.basis == HeadqSpec::Basis::Random) {
    rows = random_orthonormal_rows(side.rank, head_dim, headq_random_seed(layer, kv_head));
  } else {
    require(basis != nullptr, "key codec '", spec.text(),
            "' needs a HeadQ basis file (write one with `visikv calibrate`, pass it with --basis)");
    require(basis->layers == layers && basis->kv_heads == kv_heads && basis->head_dim == head_dim,
            "HeadQ basis has ", basis->layers, " layers x ", basis->kv_heads,
            " kv heads x head_dim ", basis->head_dim, "; the cache has ", layers, " x ", kv_heads,
            " x ", head_dim);
    require(side.rank <= basis->rank, "key codec '", spec.text(), "' needs rank ", side.rank,
            " but the HeadQ basis file holds only ", basis->rank,
            " vectors per head (calibrate with --rank ", side.rank, " or more)");
    const std::span<const double> all = side.basis == HeadqSpec::Basis::Query
                                            ? basis->query_rows(layer, kv_head)
                                            : basis->key_rows(layer, kv_head);
    rows.assign(all.begin(), all.begin() + side.rank * head_dim);
  }
  return std::vector<float>(rows.begin(), rows.end());
}

std::unique_ptr<KeyStore> make_headq_key_store(std::unique_ptr<KeyStore> base,
                                               const CodecSpec& spec, std::vector<float> rows) {
  require(spec.headq.has_value() && !spec.is_dense(), "cache spec '", spec.text(),
          "': a HeadQ store needs an integer codec with a side code");
  return std::make_unique<HeadqKeyStore>(std::move(base), spec, std::move(rows));
}

}  // namespace visikv

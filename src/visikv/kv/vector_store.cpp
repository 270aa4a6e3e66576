#include "visikv/kv/vector_store.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/vec.h"
#include "visikv/kv/dense_element.h"
#include "visikv/kv/int_codes.h"
#include "visikv/kv/value_policy.h"

namespace visikv {

namespace {

template <DenseFormat kFormat>
class DenseStore final : public VectorStore {
  using Element = typename DenseElement<kFormat>::Type;

 public:
  DenseStore(int64_t dim, int64_t reserve) : dim_(dim) { rows_.reserve(reserve * dim); }

  int64_t dim() const override { return dim_; }
  int64_t size() const override { return static_cast<int64_t>(rows_.size()) / dim_; }

  void append(std::span<const float> vector) override {
    for (float x : vector) rows_.push_back(DenseElement<kFormat>::store(x));
  }

  void dot(std::span<const float> queries, const PositionSet& positions,
           std::span<float> scores) const override {
    const int64_t n = positions.size(), count = static_cast<int64_t>(queries.size()) / dim_;
    for (int64_t i = 0; i < n; ++i) {
      const Element* row = rows_.data() + positions[i] * dim_;
      for (int64_t q = 0; q < count; ++q) {
        const float* query = queries.data() + q * dim_;
        scores[q * n + i] = DenseElement<kFormat>::dot(row, query, dim_);
      }
    }
  }

  void accumulate(std::span<const float> weights, const PositionSet& positions,
                  std::span<float> out) const override {
    const int64_t n = positions.size(), count = static_cast<int64_t>(out.size()) / dim_;
    for (int64_t i = 0; i < n; ++i) {
      const Element* row = rows_.data() + positions[i] * dim_;
      for (int64_t q = 0; q < count; ++q) {
        float* y = out.data() + q * dim_;
        DenseElement<kFormat>::axpy(weights[q * n + i], row, y, dim_);
      }
    }
  }

  void reconstruct(int64_t position, std::span<float> out) const override {
    const Element* row = rows_.data() + position * dim_;
    for (int64_t c = 0; c < dim_; ++c) out[c] = DenseElement<kFormat>::load(row[c]);
  }

  int64_t stored_bytes() const override {
    return static_cast<int64_t>(rows_.size() * sizeof(Element));
  }
  void clear() override { rows_.clear(); }
  int64_t decode_equivalent_appends() const override { return kUnlimitedChunk; }

 private:
  int64_t dim_;
  std::vector<Element> rows_;  // {size, dim}
};

// Integer codes in groups that share an fp16 scale and zero. A group is `token_group_` tokens by
// `channel_group_` channels: 1 x G for per-token groups, G x 1 for per-channel (KIVI) groups.
// The newest tokens wait in an fp16 window: for per-channel groups until G of them (beyond the
// R the spec keeps) can be quantized together, for per-token groups while they are among the
// newest R. Tokens leave the window oldest first and are quantized from their fp16 form; with
// no window (per-token groups without :r) a token is quantized straight from float32.
template <int kBits>
class IntStore final : public VectorStore {
  static constexpr int kLevels = (1 << kBits) - 1;

 public:
  IntStore(const CodecSpec& spec, int64_t dim, int64_t reserve)
      : dim_(dim),
        token_group_(spec.token_group()),
        channel_group_(spec.axis == CodecSpec::Axis::Tokens ? spec.group : 1),
        groups_per_row_(dim / channel_group_),
        row_bytes_(int_codes::packed_bytes(dim, kBits)),
        window_tokens_(spec.window),
        lo_(groups_per_row_),
        hi_(groups_per_row_),
        codes_scratch_(dim) {
    codes_.reserve(reserve * row_bytes_);
    params_.reserve(reserve / token_group_ * 2 * groups_per_row_);
  }

  int64_t dim() const override { return dim_; }
  int64_t size() const override { return quantized_ + window_rows(); }
  int64_t quantized_size() const override { return quantized_; }

  void append(std::span<const float> vector) override {
    if (window_tokens_ == 0 && token_group_ == 1) {
      quantize(vector.data(), 1);
      return;
    }
    for (float x : vector) window_.push_back(float_to_fp16(x));
    if (window_rows() - token_group_ >= window_tokens_) {
      // The oldest token group is complete and outside the kept window: quantize it.
      staging_.resize(static_cast<size_t>(token_group_ * dim_));
      for (int64_t i = 0; i < token_group_ * dim_; ++i) staging_[i] = fp16_to_float(window_[i]);
      quantize(staging_.data(), token_group_);
      window_.erase(window_.begin(), window_.begin() + token_group_ * dim_);
    }
  }

  void dot(std::span<const float> queries, const PositionSet& positions,
           std::span<float> scores) const override {
    const int64_t n = positions.size(), count = static_cast<int64_t>(queries.size()) / dim_;
    // Positions are ascending: the quantized ones first, then those in the fp16 window.
    int64_t quantized_here = 0;
    while (quantized_here < n && positions[quantized_here] < quantized_) ++quantized_here;
    std::vector<float> scratch(static_cast<size_t>(dim_));
    // Each key is decoded once per block of up to four queries, in registers.
    for (int64_t q0 = 0; q0 < count; q0 += kQueryBlock) {
      const int64_t queries_here = std::min<int64_t>(kQueryBlock, count - q0);
      const float* first = queries.data() + q0 * dim_;
      float* out = scores.data() + q0 * n;
      switch (queries_here) {
        case 1:
          dot_positions<1>(first, positions, quantized_here, n, scratch.data(), out);
          break;
        case 2:
          dot_positions<2>(first, positions, quantized_here, n, scratch.data(), out);
          break;
        case 3:
          dot_positions<3>(first, positions, quantized_here, n, scratch.data(), out);
          break;
        default:
          dot_positions<4>(first, positions, quantized_here, n, scratch.data(), out);
          break;
      }
    }
    for (int64_t i = quantized_here; i < n; ++i) {
      const uint16_t* row = window_row(positions[i]);
      for (int64_t q = 0; q < count; ++q)
        scores[q * n + i] = vec::dot(row, false, queries.data() + q * dim_, dim_);
    }
  }

  void accumulate(std::span<const float> weights, const PositionSet& positions,
                  std::span<float> out) const override {
    const int64_t n = positions.size(), count = static_cast<int64_t>(out.size()) / dim_;
    // Positions are ascending: the quantized ones first, then those in the fp16 window.
    int64_t quantized_here = 0;
    while (quantized_here < n && positions[quantized_here] < quantized_) ++quantized_here;
    if (channel_group_ == 1 || channel_group_ % 8 == 0) {
      // Sums stay in registers over all positions, 16 channels by up to four queries at a time:
      // every element still gets its products added in position order, as an axpy per
      // position would, but `out` is read and written once per call, not once per position.
      for (int64_t q0 = 0; q0 < count; q0 += kQueryBlock) {
        const int64_t queries_here = std::min<int64_t>(kQueryBlock, count - q0);
        for (int64_t c = 0; c < dim_; c += 16) {
          switch (queries_here) {
            case 1:
              accumulate_slab<1>(weights, positions, quantized_here, q0, c, out);
              break;
            case 2:
              accumulate_slab<2>(weights, positions, quantized_here, q0, c, out);
              break;
            case 3:
              accumulate_slab<3>(weights, positions, quantized_here, q0, c, out);
              break;
            default:
              accumulate_slab<4>(weights, positions, quantized_here, q0, c, out);
              break;
          }
        }
      }
    } else {
      std::vector<float> scratch(static_cast<size_t>(dim_));
      for (int64_t i = 0; i < quantized_here; ++i) {
        visit_chunks(positions[i], scratch.data(), [&](int64_t c, __m256 x) {
          for (int64_t q = 0; q < count; ++q) {
            float* y = out.data() + q * dim_ + c;
            _mm256_storeu_ps(
                y, _mm256_fmadd_ps(_mm256_set1_ps(weights[q * n + i]), x, _mm256_loadu_ps(y)));
          }
        });
      }
    }
    for (int64_t i = quantized_here; i < n; ++i) {
      const uint16_t* row = window_row(positions[i]);
      for (int64_t q = 0; q < count; ++q)
        vec::axpy(weights[q * n + i], row, false, out.data() + q * dim_, dim_);
    }
  }

  void reconstruct(int64_t position, std::span<float> out) const override {
    if (position < quantized_) {
      decode(position, out.data());
    } else {
      const uint16_t* row = window_row(position);
      for (int64_t c = 0; c < dim_; ++c) out[c] = fp16_to_float(row[c]);
    }
  }

  int64_t stored_bytes() const override {
    return static_cast<int64_t>(codes_.size() + 2 * params_.size() + 2 * window_.size());
  }

  void clear() override {
    codes_.clear();
    params_.clear();
    window_.clear();
    quantized_ = 0;
  }

  // Without a window a vector is quantized at its append and never changes. With one, the
  // append that brings the window to R + G rows quantizes its oldest G rows, which queries of
  // the positions since then read (R + G >= 2): such a flush may only be a chunk's first
  // append. The next flush is the (R + G - w)-th append from now (w rows in the window); after
  // a flush the following one is G appends later.
  int64_t decode_equivalent_appends() const override {
    if (window_tokens_ == 0 && token_group_ == 1) return kUnlimitedChunk;
    const int64_t next_flush = window_tokens_ + token_group_ - window_rows();
    return next_flush == 1 ? token_group_ : next_flush - 1;
  }

 private:
  int64_t window_rows() const { return static_cast<int64_t>(window_.size()) / dim_; }
  const uint16_t* window_row(int64_t position) const {
    return window_.data() + (position - quantized_) * dim_;
  }

  // Appends `tokens` rows ({tokens, dim}, one token group) in quantized form.
  void quantize(const float* rows, int64_t tokens) {
    std::fill(lo_.begin(), lo_.end(), INFINITY);
    std::fill(hi_.begin(), hi_.end(), -INFINITY);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t c = 0; c < dim_; ++c) {
        const int64_t g = c / channel_group_;
        lo_[g] = std::min(lo_[g], rows[t * dim_ + c]);
        hi_[g] = std::max(hi_[g], rows[t * dim_ + c]);
      }
    }
    // Parameters of this token group: all scales, then all zeros.
    const size_t first = params_.size();
    params_.resize(first + 2 * groups_per_row_);
    for (int64_t g = 0; g < groups_per_row_; ++g) {
      const int_codes::Affine affine = int_codes::affine_for_range(lo_[g], hi_[g], kBits);
      params_[first + g] = affine.scale;
      params_[first + groups_per_row_ + g] = affine.zero;
      lo_[g] = fp16_to_float(affine.scale);  // reused below as float scale and zero
      hi_[g] = fp16_to_float(affine.zero);
    }
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t c = 0; c < dim_; ++c) {
        const int64_t g = c / channel_group_;
        codes_scratch_[c] = int_codes::affine_code(rows[t * dim_ + c], lo_[g], hi_[g], kLevels);
      }
      const size_t at = codes_.size();
      codes_.resize(at + row_bytes_);
      int_codes::pack(codes_scratch_, kBits, std::span(codes_).subspan(at, row_bytes_));
    }
    quantized_ += tokens;
  }

  // The scales (then the zeros) of the token group holding quantized `position`. Per-token
  // groups skip the division, which would otherwise cost more than decoding the row.
  const uint16_t* group_params(int64_t position) const {
    const int64_t group = token_group_ == 1 ? position : position / token_group_;
    return params_.data() + group * 2 * groups_per_row_;
  }

  // Calls visit(c, x) for c = 0, 8, .., dim - 8, where x holds channels [c, c + 8) of the
  // quantized token `position`, zero + scale * code. `scratch` (dim floats) is used only when
  // groups are narrower than 8 lanes.
  template <typename Visit>
  void visit_chunks(int64_t position, float* scratch, Visit&& visit) const {
    const uint8_t* row = codes_.data() + position * row_bytes_;
    const uint16_t* scales = group_params(position);
    const uint16_t* zeros = scales + groups_per_row_;
    if (channel_group_ == 1) {  // per-channel parameters: one fp16 pair per lane
      for (int64_t c = 0; c < dim_; c += 8)
        visit(c, _mm256_fmadd_ps(int_codes::unpack8<kBits>(row + c / 8 * kBits),
                                 vec::load8(scales + c, false), vec::load8(zeros + c, false)));
    } else if (channel_group_ % 8 == 0) {  // one pair per run of lanes
      for (int64_t g = 0; g < groups_per_row_; ++g) {
        const __m256 scale = _mm256_set1_ps(fp16_to_float(scales[g]));
        const __m256 zero = _mm256_set1_ps(fp16_to_float(zeros[g]));
        for (int64_t c = g * channel_group_; c < (g + 1) * channel_group_; c += 8)
          visit(c, _mm256_fmadd_ps(int_codes::unpack8<kBits>(row + c / 8 * kBits), scale, zero));
      }
    } else {  // groups narrower than (or straddling) 8 lanes: decode through the scratch
      for (int64_t c = 0; c < dim_; c += 8)
        _mm256_storeu_ps(scratch + c, int_codes::unpack8<kBits>(row + c / 8 * kBits));
      for (int64_t c = 0; c < dim_; ++c) {
        const int64_t g = c / channel_group_;
        scratch[c] = std::fma(scratch[c], fp16_to_float(scales[g]), fp16_to_float(zeros[g]));
      }
      for (int64_t c = 0; c < dim_; c += 8) visit(c, _mm256_loadu_ps(scratch + c));
    }
  }

  void decode(int64_t position, float* out) const {
    visit_chunks(position, out, [out](int64_t c, __m256 x) { _mm256_storeu_ps(out + c, x); });
  }

  // Channels [c, c + 16) (or [c, c + 8) when dim is not a multiple of 16) of the quantized
  // position, zero + scale * code, as visit_chunks decodes them. Groups are one channel wide
  // (per-channel parameters) or a multiple of 8 channels.
  struct Slab {  // channel groups of the slab's two halves (unused for per-channel parameters)
    int64_t group_lo, group_hi;
  };
  void decode_slab(int64_t position, int64_t c, bool two, Slab slab, __m256& lo, __m256& hi) const {
    const uint8_t* row = codes_.data() + position * row_bytes_;
    const uint16_t* scales = group_params(position);
    const uint16_t* zeros = scales + groups_per_row_;
    if (channel_group_ == 1) {
      lo = _mm256_fmadd_ps(int_codes::unpack8<kBits>(row + c / 8 * kBits),
                           vec::load8(scales + c, false), vec::load8(zeros + c, false));
      if (two)
        hi = _mm256_fmadd_ps(int_codes::unpack8<kBits>(row + c / 8 * kBits + kBits),
                             vec::load8(scales + c + 8, false), vec::load8(zeros + c + 8, false));
      return;
    }
    lo = _mm256_fmadd_ps(int_codes::unpack8<kBits>(row + c / 8 * kBits),
                         _mm256_set1_ps(fp16_to_float(scales[slab.group_lo])),
                         _mm256_set1_ps(fp16_to_float(zeros[slab.group_lo])));
    if (two)
      hi = _mm256_fmadd_ps(int_codes::unpack8<kBits>(row + c / 8 * kBits + kBits),
                           _mm256_set1_ps(fp16_to_float(scales[slab.group_hi])),
                           _mm256_set1_ps(fp16_to_float(zeros[slab.group_hi])));
  }

  // out[q][c .. c + 16) += Σ_{i < quantized_here} weights[q][i] · x̂[positions[i]][c .. c + 16)
  // for queries q0 .. q0 + kQueries, the sums held in registers.
  template <int kQueries>
  void accumulate_slab(std::span<const float> weights, const PositionSet& positions,
                       int64_t quantized_here, int64_t q0, int64_t c, std::span<float> out) const {
    const int64_t n = positions.size();
    const bool two = c + 16 <= dim_;
    __m256 lo[kQueries], hi[kQueries];
    for (int j = 0; j < kQueries; ++j) {
      lo[j] = _mm256_loadu_ps(out.data() + (q0 + j) * dim_ + c);
      hi[j] = two ? _mm256_loadu_ps(out.data() + (q0 + j) * dim_ + c + 8) : _mm256_setzero_ps();
    }
    const float* w = weights.data() + q0 * n;
    const Slab slab{c / channel_group_, (c + 8) / channel_group_};
    for (int64_t i = 0; i < quantized_here; ++i) {
      __m256 x_lo, x_hi = _mm256_setzero_ps();
      decode_slab(positions[i], c, two, slab, x_lo, x_hi);
      for (int j = 0; j < kQueries; ++j) {
        const __m256 weight = _mm256_set1_ps(w[j * n + i]);
        lo[j] = _mm256_fmadd_ps(weight, x_lo, lo[j]);
        if (two) hi[j] = _mm256_fmadd_ps(weight, x_hi, hi[j]);
      }
    }
    for (int j = 0; j < kQueries; ++j) {
      _mm256_storeu_ps(out.data() + (q0 + j) * dim_ + c, lo[j]);
      if (two) _mm256_storeu_ps(out.data() + (q0 + j) * dim_ + c + 8, hi[j]);
    }
  }

  // scores[j * n + i] = queries[j] · x̂[positions[i]] for kQueries consecutive queries and the
  // quantized positions i < quantized_here. Positions go eight at a time: the lane sums of the
  // eight keys are reduced together (vec::transposed_sums), and a position's score is the same
  // whichever block and lane it falls in (missing positions of the last block are zeros).
  template <int kQueries>
  void dot_positions(const float* queries, const PositionSet& positions, int64_t quantized_here,
                     int64_t n, float* scratch, float* scores) const {
    __m256 sums[kQueries][8];
    for (int64_t i0 = 0; i0 < quantized_here; i0 += 8) {
      const int64_t here = std::min<int64_t>(8, quantized_here - i0);
      for (int64_t k = 0; k < 8; ++k) {
        __m256 acc[kQueries];
        for (int j = 0; j < kQueries; ++j) acc[j] = _mm256_setzero_ps();
        if (k < here) {
          visit_chunks(positions[i0 + k], scratch, [&](int64_t c, __m256 x) {
            for (int j = 0; j < kQueries; ++j)
              acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(queries + j * dim_ + c), acc[j]);
          });
        }
        for (int j = 0; j < kQueries; ++j) sums[j][k] = acc[j];
      }
      for (int j = 0; j < kQueries; ++j) {
        const __m256 block = vec::transposed_sums(sums[j]);
        if (here == 8) {
          _mm256_storeu_ps(scores + j * n + i0, block);
        } else {
          float lanes[8];
          _mm256_storeu_ps(lanes, block);
          std::copy(lanes, lanes + here, scores + j * n + i0);
        }
      }
    }
  }

  static constexpr int64_t kQueryBlock = 4;
  int64_t dim_, token_group_, channel_group_, groups_per_row_, row_bytes_, window_tokens_;
  int64_t quantized_ = 0;         // tokens [0, quantized_) are in codes_
  std::vector<uint8_t> codes_;    // {quantized_, row_bytes_} packed codes
  std::vector<uint16_t> params_;  // per token group: groups_per_row_ scales, then as many zeros
  std::vector<uint16_t> window_;  // {size() - quantized_, dim_} fp16, oldest first
  // Append-time scratch (append is not const, so members are safe here).
  std::vector<float> lo_, hi_, staging_;
  std::vector<uint8_t> codes_scratch_;
};

}  // namespace

std::unique_ptr<VectorStore> make_vector_store(const CodecSpec& spec, int64_t head_dim,
                                               int64_t reserve_tokens) {
  check_codec_fits(spec, head_dim);
  require(reserve_tokens >= 0, "cache reserve must not be negative, got ", reserve_tokens);
  if (spec.policy) return std::make_unique<ValuePolicyStore>(spec, head_dim, reserve_tokens);
  if (spec.is_dense()) {
    switch (spec.dense) {
      case DenseFormat::F32:
        return std::make_unique<DenseStore<DenseFormat::F32>>(head_dim, reserve_tokens);
      case DenseFormat::F16:
        return std::make_unique<DenseStore<DenseFormat::F16>>(head_dim, reserve_tokens);
      case DenseFormat::BF16:
        return std::make_unique<DenseStore<DenseFormat::BF16>>(head_dim, reserve_tokens);
    }
  }
  switch (spec.bits) {
    case 2:
      return std::make_unique<IntStore<2>>(spec, head_dim, reserve_tokens);
    case 3:
      return std::make_unique<IntStore<3>>(spec, head_dim, reserve_tokens);
    case 4:
      return std::make_unique<IntStore<4>>(spec, head_dim, reserve_tokens);
    case 8:
      return std::make_unique<IntStore<8>>(spec, head_dim, reserve_tokens);
  }
  fail("cache spec '", spec.text(), "': unsupported bit width ", spec.bits);
}

}  // namespace visikv

#include "visikv/kv/vector_store.h"

#include <algorithm>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/vec.h"
#include "visikv/kv/dense_element.h"
#include "visikv/kv/fp16_window.h"
#include "visikv/kv/int_row_codec.h"
#include "visikv/kv/row_kernels.h"

namespace visikv {

namespace {

// The one dense store: the dense cache (make_dense_cache) and the dense sides of codec caches
// are both made of it.
template <DenseFormat kFormat>
class DenseStore final : public RowStore {
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
    const int64_t n = positions.size();
    row_kernels::dot(rows(), positions, n, queries.data(),
                     static_cast<int64_t>(queries.size()) / dim_, scores.data(), n);
  }

  void accumulate(std::span<const float> weights, const PositionSet& positions,
                  std::span<float> out) const override {
    const int64_t n = positions.size();
    row_kernels::accumulate(rows(), positions, n, weights.data(), n,
                            static_cast<int64_t>(out.size()) / dim_, out.data());
  }

  void reconstruct(int64_t position, std::span<float> out) const override {
    const Element* row = rows_.data() + position * dim_;
    for (int64_t c = 0; c < dim_; ++c) out[c] = DenseElement<kFormat>::load(row[c]);
  }

  int64_t stored_bytes() const override {
    return static_cast<int64_t>(rows_.size() * sizeof(Element));
  }
  void clear() override { rows_.clear(); }
  // A dense row never changes after its append.
  int64_t decode_equivalent_appends() const override { return kUnlimitedChunk; }

 private:
  row_kernels::DenseRows rows() const { return {kFormat, rows_.data(), dim_}; }

  int64_t dim_;
  std::vector<Element> rows_;  // {size, dim}
};

// Integer codes in groups that share an fp16 scale and zero (kv/int_row_codec.h). A group is
// `token_group_` tokens by `channel_group_` channels: 1 x G for per-token groups, G x 1 for
// per-channel (KIVI) groups. The newest tokens wait in an fp16 window: for per-channel groups
// until G of them (beyond the R the spec keeps) can be quantized together, for per-token groups
// while they are among the newest R. Tokens leave the window oldest first and are quantized from
// their fp16 form; with no window (per-token groups without :r) a token is quantized straight
// from float32.
template <int kBits>
class IntStore final : public RowStore {
  static constexpr int kLevels = (1 << kBits) - 1;

 public:
  IntStore(const CodecSpec& spec, int64_t dim, int64_t reserve)
      : dim_(dim),
        token_group_(spec.token_group()),
        shape_{dim, spec.axis == CodecSpec::Axis::Tokens ? spec.group : 1},
        groups_per_row_(shape_.groups()),
        row_bytes_(int_rows::packed_bytes(dim, kBits)),
        window_(dim, token_group_, spec.window),
        lo_(groups_per_row_),
        hi_(groups_per_row_),
        codes_scratch_(dim) {
    codes_.reserve(reserve * row_bytes_);
    params_.reserve(reserve / token_group_ * 2 * groups_per_row_);
  }

  int64_t dim() const override { return dim_; }
  int64_t size() const override { return window_.size(); }
  int64_t quantized_size() const override { return window_.quantized(); }

  void append(std::span<const float> vector) override {
    window_.append(vector, [this](const float* rows, int64_t tokens) { quantize(rows, tokens); });
  }

  void dot(std::span<const float> queries, const PositionSet& positions,
           std::span<float> scores) const override {
    const int64_t n = positions.size(), count = static_cast<int64_t>(queries.size()) / dim_;
    const int64_t quantized_here = window_.quantized_count(positions);
    row_kernels::dot(rows(), positions, quantized_here, queries.data(), count, scores.data(), n);
    for (int64_t i = quantized_here; i < n; ++i) {
      const uint16_t* row = window_.row(positions[i]);
      for (int64_t q = 0; q < count; ++q)
        scores[q * n + i] = vec::dot(row, false, queries.data() + q * dim_, dim_);
    }
  }

  void accumulate(std::span<const float> weights, const PositionSet& positions,
                  std::span<float> out) const override {
    const int64_t n = positions.size(), count = static_cast<int64_t>(out.size()) / dim_;
    const int64_t quantized_here = window_.quantized_count(positions);
    row_kernels::accumulate(rows(), positions, quantized_here, weights.data(), n, count,
                            out.data());
    for (int64_t i = quantized_here; i < n; ++i) {
      const uint16_t* row = window_.row(positions[i]);
      for (int64_t q = 0; q < count; ++q)
        vec::axpy(weights[q * n + i], row, false, out.data() + q * dim_, dim_);
    }
  }

  void reconstruct(int64_t position, std::span<float> out) const override {
    if (position < window_.quantized())
      int_rows::decode_row(rows().row(position), kBits, shape_, out.data());
    else
      window_.widen(position, out);
  }

  int64_t stored_bytes() const override {
    return static_cast<int64_t>(codes_.size() + 2 * params_.size()) + window_.stored_bytes();
  }

  void clear() override {
    codes_.clear();
    params_.clear();
    window_.clear();
  }

  int64_t decode_equivalent_appends() const override { return window_.decode_equivalent_appends(); }

 private:
  // Where the quantized rows live: per token group, all scales then all zeros.
  row_kernels::IntRows rows() const {
    return {kBits,
            shape_,
            codes_.data(),
            row_bytes_,
            params_.data(),
            token_group_,
            2 * groups_per_row_,
            groups_per_row_,
            1};
  }

  // Appends `tokens` rows ({tokens, dim}, one token group) in quantized form.
  void quantize(const float* rows, int64_t tokens) {
    std::fill(lo_.begin(), lo_.end(), INFINITY);
    std::fill(hi_.begin(), hi_.end(), -INFINITY);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t c = 0; c < dim_; ++c) {
        const int64_t g = c / shape_.group;
        lo_[g] = std::min(lo_[g], rows[t * dim_ + c]);
        hi_[g] = std::max(hi_[g], rows[t * dim_ + c]);
      }
    }
    // Parameters of this token group: all scales, then all zeros.
    const size_t first = params_.size();
    params_.resize(first + 2 * groups_per_row_);
    for (int64_t g = 0; g < groups_per_row_; ++g) {
      const int_rows::Affine affine = int_rows::affine_for_range(lo_[g], hi_[g], kBits);
      params_[first + g] = affine.scale;
      params_[first + groups_per_row_ + g] = affine.zero;
      lo_[g] = fp16_to_float(affine.scale);  // reused below as float scale and zero
      hi_[g] = fp16_to_float(affine.zero);
    }
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t c = 0; c < dim_; ++c) {
        const int64_t g = c / shape_.group;
        codes_scratch_[c] = int_rows::affine_code(rows[t * dim_ + c], lo_[g], hi_[g], kLevels);
      }
      const size_t at = codes_.size();
      codes_.resize(at + row_bytes_);
      int_rows::pack(codes_scratch_, kBits, std::span(codes_).subspan(at, row_bytes_));
    }
  }

  int64_t dim_, token_group_;
  int_rows::RowShape shape_;  // channel groups: G (per-token groups) or 1 (per-channel groups)
  int64_t groups_per_row_, row_bytes_;
  Fp16Window window_;             // tokens [quantized_size(), size())
  std::vector<uint8_t> codes_;    // {quantized_size(), row_bytes_} packed codes
  std::vector<uint16_t> params_;  // per token group: groups_per_row_ scales, then as many zeros
  // Append-time scratch (append is not const, so members are safe here).
  std::vector<float> lo_, hi_;
  std::vector<uint8_t> codes_scratch_;
};

}  // namespace

DenseFormat dense_format_from_name(const std::string& name) {
  if (name == "f32" || name == "fp32") return DenseFormat::F32;
  if (name == "f16" || name == "fp16") return DenseFormat::F16;
  if (name == "bf16") return DenseFormat::BF16;
  fail("unknown dense cache format '", name, "' (expected f32, f16 or bf16)");
}

const char* dense_format_name(DenseFormat format) {
  switch (format) {
    case DenseFormat::F32:
      return "f32";
    case DenseFormat::F16:
      return "f16";
    case DenseFormat::BF16:
      return "bf16";
  }
  return "?";
}

std::unique_ptr<RowStore> make_dense_store(DenseFormat format, int64_t head_dim,
                                           int64_t reserve_tokens) {
  require(head_dim > 0, "dense store: head_dim must be positive, got ", head_dim);
  require(reserve_tokens >= 0, "cache reserve must not be negative, got ", reserve_tokens);
  switch (format) {
    case DenseFormat::F32:
      return std::make_unique<DenseStore<DenseFormat::F32>>(head_dim, reserve_tokens);
    case DenseFormat::F16:
      return std::make_unique<DenseStore<DenseFormat::F16>>(head_dim, reserve_tokens);
    case DenseFormat::BF16:
      return std::make_unique<DenseStore<DenseFormat::BF16>>(head_dim, reserve_tokens);
  }
  fail("unknown dense cache format");
}

std::unique_ptr<RowStore> make_int_store(const CodecSpec& spec, int64_t head_dim,
                                         int64_t reserve_tokens) {
  check_codec_fits(spec, head_dim);
  require(reserve_tokens >= 0, "cache reserve must not be negative, got ", reserve_tokens);
  require(!spec.is_dense() && !spec.policy, "cache spec '", spec.text(),
          "' is not a plain integer codec");
  require(spec.bits == 2 || spec.bits == 3 || spec.bits == 4 || spec.bits == 8, "cache spec '",
          spec.text(), "': unsupported bit width ", spec.bits);
  return int_rows::with_bits(spec.bits, [&](auto bits) -> std::unique_ptr<RowStore> {
    return std::make_unique<IntStore<decltype(bits)::value>>(spec, head_dim, reserve_tokens);
  });
}

}  // namespace visikv

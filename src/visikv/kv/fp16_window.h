// The newest tokens of a quantized store, held in fp16 until they are quantized (KIVI's
// full-precision window, and the wait of per-channel groups for their G tokens).
//
// A store of `token_group` tokens per group that keeps the newest `window` tokens whole sees its
// positions as [0, quantized()) in its own codes and [quantized(), size()) here. An append that
// brings the window to window + token_group rows hands the oldest token group, widened back to
// float32, to the store's quantizer; with neither window nor token group (window 0, groups of
// one token) a vector goes to the quantizer at its append, straight from float32.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/core/half.h"
#include "visikv/kv/cache.h"
#include "visikv/kv/vector_store.h"

namespace visikv {

class Fp16Window {
 public:
  Fp16Window(int64_t dim, int64_t token_group, int64_t window_tokens)
      : dim_(dim), token_group_(token_group), window_tokens_(window_tokens) {}

  // Adds one vector of dim floats. quantize(const float* rows, int64_t tokens) receives what
  // leaves the window ({tokens, dim}, row-major) while quantized() still counts the tokens before
  // it; they are counted as quantized when it returns.
  template <class Quantize>
  void append(std::span<const float> vector, Quantize&& quantize) {
    if (passes_through()) {
      quantize(vector.data(), int64_t{1});
      ++quantized_;
      return;
    }
    for (float x : vector) rows_.push_back(float_to_fp16(x));
    if (rows() - token_group_ < window_tokens_) return;
    staging_.resize(static_cast<size_t>(token_group_ * dim_));
    for (int64_t i = 0; i < token_group_ * dim_; ++i) staging_[i] = fp16_to_float(rows_[i]);
    quantize(static_cast<const float*>(staging_.data()), token_group_);
    quantized_ += token_group_;
    rows_.erase(rows_.begin(), rows_.begin() + token_group_ * dim_);
  }

  int64_t quantized() const { return quantized_; }
  int64_t size() const { return quantized_ + rows(); }
  // Position `position` (>= quantized()) as dim fp16 numbers.
  const uint16_t* row(int64_t position) const {
    return rows_.data() + (position - quantized_) * dim_;
  }
  // How many of the ascending `positions` are quantized: they come first, then those here.
  int64_t quantized_count(const PositionSet& positions) const {
    int64_t here = 0;
    while (here < positions.size() && positions[here] < quantized_) ++here;
    return here;
  }
  void widen(int64_t position, std::span<float> out) const {
    const uint16_t* r = row(position);
    for (int64_t c = 0; c < dim_; ++c) out[c] = fp16_to_float(r[c]);
  }
  int64_t stored_bytes() const { return static_cast<int64_t>(2 * rows_.size()); }
  void clear() {
    rows_.clear();
    quantized_ = 0;
  }

  // Without a window a vector is quantized at its append and never changes. With one, the
  // append that brings the window to R + G rows quantizes its oldest G rows, which queries of
  // the positions since then read (R + G >= 2): such a flush may only be a chunk's first
  // append. The next flush is the (R + G - w)-th append from now (w rows in the window); after
  // a flush the following one is G appends later (VectorStore::decode_equivalent_appends).
  int64_t decode_equivalent_appends() const {
    if (passes_through()) return VectorStore::kUnlimitedChunk;
    const int64_t next_flush = window_tokens_ + token_group_ - rows();
    return next_flush == 1 ? token_group_ : next_flush - 1;
  }

 private:
  bool passes_through() const { return window_tokens_ == 0 && token_group_ == 1; }
  int64_t rows() const { return static_cast<int64_t>(rows_.size()) / dim_; }

  int64_t dim_, token_group_, window_tokens_;
  int64_t quantized_ = 0;
  std::vector<uint16_t> rows_;  // {size() - quantized(), dim} fp16, oldest first
  std::vector<float> staging_;  // the token group leaving, as floats
};

}  // namespace visikv

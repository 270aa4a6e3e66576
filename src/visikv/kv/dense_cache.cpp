#include "visikv/kv/dense_cache.h"

#include <type_traits>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/vec.h"
#include "visikv/kv/block_summaries.h"
#include "visikv/kv/dense_element.h"

namespace visikv {

namespace {

template <DenseFormat kFormat>
class DenseCache final : public KVCache {
  using Element = typename DenseElement<kFormat>::Type;
  static Element store(float x) { return DenseElement<kFormat>::store(x); }
  static float dot(const Element* row, const float* x, int64_t n) {
    return DenseElement<kFormat>::dot(row, x, n);
  }
  static void axpy(float a, const Element* row, float* y, int64_t n) {
    DenseElement<kFormat>::axpy(a, row, y, n);
  }

  struct Head {
    std::vector<Element> keys, values;  // {tokens, head_dim}
    BlockSummaries summaries;
  };

 public:
  DenseCache(const CacheShape& shape, int64_t reserve, int64_t block_size)
      : shape_(shape), block_size_(block_size), lengths_(shape.layers, 0) {
    require(shape.layers > 0 && shape.kv_heads > 0 && shape.head_dim > 0,
            "cache shape must be positive");
    heads_.reserve(shape.layers * shape.kv_heads);
    for (int64_t i = 0; i < shape.layers * shape.kv_heads; ++i) {
      Head& h = heads_.emplace_back(Head{{}, {}, BlockSummaries(shape.head_dim, block_size)});
      h.keys.reserve(reserve * shape.head_dim);
      h.values.reserve(reserve * shape.head_dim);
    }
  }

  const CacheShape& shape() const override { return shape_; }
  std::string describe() const override {
    return kFormat == DenseFormat::F32    ? "dense f32"
           : kFormat == DenseFormat::BF16 ? "dense bf16"
                                          : "dense f16";
  }
  int64_t length(int64_t layer) const override { return lengths_.at(layer); }

  void append(int64_t layer, std::span<const float> keys, std::span<const float> values,
              int64_t tokens) override {
    const int64_t d = shape_.head_dim, row = shape_.kv_heads * d;
    require(layer >= 0 && layer < shape_.layers, "cache layer ", layer, " out of range");
    require(static_cast<int64_t>(keys.size()) == tokens * row &&
                static_cast<int64_t>(values.size()) == tokens * row,
            "cache append: expected ", tokens, " x ", row, " keys and values");
    std::vector<float> stored(static_cast<size_t>(d));
    for (int64_t h = 0; h < shape_.kv_heads; ++h) {
      Head& head = at(layer, h);
      for (int64_t t = 0; t < tokens; ++t) {
        const float* k = keys.data() + t * row + h * d;
        const float* v = values.data() + t * row + h * d;
        for (int64_t c = 0; c < d; ++c) head.keys.push_back(store(k[c]));
        for (int64_t c = 0; c < d; ++c) head.values.push_back(store(v[c]));
        // Summaries describe the keys as scores read them (after f16/bf16 rounding).
        for (int64_t c = 0; c < d; ++c)
          stored[c] = DenseElement<kFormat>::load(head.keys[head.keys.size() - d + c]);
        head.summaries.add(stored);
      }
    }
    lengths_[layer] += tokens;
  }

  void score(int64_t layer, int64_t kv_head, std::span<const float> queries,
             const PositionSet& positions, std::span<float> scores) const override {
    const int64_t d = shape_.head_dim, n = positions.size();
    const int64_t queries_count = static_cast<int64_t>(queries.size()) / d;
    const Head& head = at(layer, kv_head);
    check_positions(layer, positions);
    for (int64_t i = 0; i < n; ++i) {
      const Element* key = head.keys.data() + positions[i] * d;
      for (int64_t q = 0; q < queries_count; ++q)
        scores[q * n + i] = dot(key, queries.data() + q * d, d);
    }
  }

  void accumulate(int64_t layer, int64_t kv_head, std::span<const float> weights,
                  const PositionSet& positions, std::span<float> out) const override {
    const int64_t d = shape_.head_dim, n = positions.size();
    const int64_t queries_count = static_cast<int64_t>(out.size()) / d;
    const Head& head = at(layer, kv_head);
    check_positions(layer, positions);
    for (int64_t i = 0; i < n; ++i) {
      const Element* value = head.values.data() + positions[i] * d;
      for (int64_t q = 0; q < queries_count; ++q)
        axpy(weights[q * n + i], value, out.data() + q * d, d);
    }
  }

  int64_t block_size() const override { return block_size_; }
  BlockSummaryTable summaries(int64_t layer, int64_t kv_head) const override {
    return at(layer, kv_head).summaries.table();
  }

  void clear() override {
    for (Head& h : heads_) {
      h.keys.clear();
      h.values.clear();
      h.summaries.clear();
    }
    std::fill(lengths_.begin(), lengths_.end(), 0);
  }

  // A dense row never changes after its append: any chunk attends as decode order does.
  int64_t decode_equivalent_chunk(int64_t) const override { return INT64_MAX; }

 private:
  Head& at(int64_t layer, int64_t kv_head) { return heads_[layer * shape_.kv_heads + kv_head]; }
  const Head& at(int64_t layer, int64_t kv_head) const {
    require(layer >= 0 && layer < shape_.layers && kv_head >= 0 && kv_head < shape_.kv_heads,
            "cache head (", layer, ", ", kv_head, ") out of range");
    return heads_[layer * shape_.kv_heads + kv_head];
  }
  void check_positions(int64_t layer, const PositionSet& positions) const {
    if (positions.size() == 0) return;
    const int64_t last =
        positions.is_range() ? positions.end() - 1 : positions[positions.size() - 1];
    const int64_t first = positions.is_range() ? positions.begin() : positions[0];
    require(first >= 0 && last < lengths_[layer], "positions [", first, ", ", last,
            "] outside the ", lengths_[layer], " cached tokens of layer ", layer);
  }

  CacheShape shape_;
  int64_t block_size_;
  std::vector<int64_t> lengths_;
  std::vector<Head> heads_;
};

}  // namespace

DenseFormat dense_format_from_name(const std::string& name) {
  if (name == "f32" || name == "fp32") return DenseFormat::F32;
  if (name == "f16" || name == "fp16") return DenseFormat::F16;
  if (name == "bf16") return DenseFormat::BF16;
  fail("unknown dense cache format '", name, "' (expected f32, f16 or bf16)");
}

std::unique_ptr<KVCache> make_dense_cache(const CacheShape& shape, DenseFormat format,
                                          int64_t reserve_tokens, int64_t block_size) {
  switch (format) {
    case DenseFormat::F32:
      return std::make_unique<DenseCache<DenseFormat::F32>>(shape, reserve_tokens, block_size);
    case DenseFormat::F16:
      return std::make_unique<DenseCache<DenseFormat::F16>>(shape, reserve_tokens, block_size);
    case DenseFormat::BF16:
      return std::make_unique<DenseCache<DenseFormat::BF16>>(shape, reserve_tokens, block_size);
  }
  fail("unknown dense cache format");
}

}  // namespace visikv

// A cache that hands every call to another cache: the base of decorators that watch what goes
// into a cache (calibration's key moments, eval/trace.h's record of keys and values) without
// changing what attention reads. A decorator overrides the calls it watches and calls the base.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <utility>

#include "visikv/kv/cache.h"

namespace visikv {

class ForwardingCache : public KVCache {
 public:
  explicit ForwardingCache(std::unique_ptr<KVCache> inner) : inner_(std::move(inner)) {}

  const CacheShape& shape() const override { return inner_->shape(); }
  std::string describe() const override { return inner_->describe(); }
  int64_t length(int64_t layer) const override { return inner_->length(layer); }
  void append(int64_t layer, std::span<const float> keys, std::span<const float> values,
              int64_t tokens) override {
    inner_->append(layer, keys, values, tokens);
  }
  void score(int64_t layer, int64_t kv_head, std::span<const float> queries,
             const PositionSet& positions, std::span<float> scores) const override {
    inner_->score(layer, kv_head, queries, positions, scores);
  }
  void accumulate(int64_t layer, int64_t kv_head, std::span<const float> weights,
                  const PositionSet& positions, std::span<float> out) const override {
    inner_->accumulate(layer, kv_head, weights, positions, out);
  }
  int64_t block_size() const override { return inner_->block_size(); }
  BlockSummaryTable summaries(int64_t layer, int64_t kv_head) const override {
    return inner_->summaries(layer, kv_head);
  }
  void set_summary_frames(std::span<const double> rows, int64_t rank) override {
    inner_->set_summary_frames(rows, rank);
  }
  void set_position_sketches(int bits) override { inner_->set_position_sketches(bits); }
  void clear() override { inner_->clear(); }
  bool records_attention() const override { return inner_->records_attention(); }
  void record_attention(int64_t layer, int64_t kv_head, std::span<const float> weights,
                        const PositionSet& positions) override {
    inner_->record_attention(layer, kv_head, weights, positions);
  }
  int64_t decode_equivalent_chunk(int64_t layer) const override {
    return inner_->decode_equivalent_chunk(layer);
  }

 private:
  std::unique_ptr<KVCache> inner_;
};

}  // namespace visikv

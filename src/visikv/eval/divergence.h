// How far one model's next-token distributions are from a reference model's over the same
// positions: the figures llama.cpp's perplexity tool reports for quantized models, here for
// compressed caches, sparse attention and other product roundings.
//
// Per scored position, with p the reference's and q the candidate's softmax over the whole
// vocabulary: KL(p || q) in nats (softmax_kl, eval/attention_metrics.h: in double, from the
// logits) and whether the two argmax tokens agree (first index on ties).
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <span>
#include <vector>

namespace visikv {

struct DivergenceSummary {
  int64_t positions = 0;
  double kl_mean = 0;
  double kl_p99 = 0;  // 99th percentile over positions (sorted_percentile: a value that occurs)
  double kl_max = 0;
  double top1_agreement = 0;  // share of positions whose argmax tokens are equal
};

// Collects the per-position figures of one comparison.
class DivergenceAccumulator {
 public:
  // Adds `rows` positions: `reference` and `candidate` hold their logits, {rows, vocab}
  // row-major. Positions are computed in parallel and kept in order, so the summary does not
  // depend on the thread count. Throws visikv::Error for unequal or ragged sizes.
  void add(std::span<const float> reference, std::span<const float> candidate, int64_t rows);

  // Throws visikv::Error when no position was added.
  DivergenceSummary summary() const;

 private:
  std::vector<double> kl_;
  int64_t agree_ = 0;
};

// Sets "kl_mean", "kl_p99", "kl_max" and "top1_agreement" in `row`, the fields of every JSON row
// that is compared with a reference; nulls when `summary` is absent (the row is the reference).
void add_divergence_json(nlohmann::json& row, const std::optional<DivergenceSummary>& summary);
// Reads them back from such a row (--resume) over `positions` positions; std::nullopt when they
// are null.
std::optional<DivergenceSummary> divergence_from_json(const nlohmann::json& row, int64_t positions);

}  // namespace visikv

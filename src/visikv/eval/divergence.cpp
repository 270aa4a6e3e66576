#include "visikv/eval/divergence.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "visikv/core/error.h"
#include "visikv/eval/attention_metrics.h"

namespace visikv {

void DivergenceAccumulator::add(std::span<const float> reference, std::span<const float> candidate,
                                int64_t rows) {
  require(rows > 0 && reference.size() == candidate.size() && reference.size() % rows == 0,
          "divergence: ", reference.size(), " reference and ", candidate.size(),
          " candidate logits are not ", rows, " equal rows");
  const size_t vocab = reference.size() / static_cast<size_t>(rows);
  const size_t first = kl_.size();
  kl_.resize(first + static_cast<size_t>(rows));
  int64_t agree = 0;
  // A vocabulary-sized KL costs about as much as a small model's token: worth the threads.
#pragma omp parallel for reduction(+ : agree) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const auto p = reference.subspan(r * vocab, vocab), q = candidate.subspan(r * vocab, vocab);
    kl_[first + r] = softmax_kl(p, q);
    agree += argmax_differs(p, q) ? 0 : 1;
  }
  agree_ += agree;
}

DivergenceSummary DivergenceAccumulator::summary() const {
  require(!kl_.empty(), "divergence: no position compared");
  DivergenceSummary s;
  s.positions = static_cast<int64_t>(kl_.size());
  std::vector<double> sorted = kl_;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double kl : kl_) sum += kl;  // in position order: the same sum for every thread count
  s.kl_mean = sum / static_cast<double>(s.positions);
  s.kl_p99 = sorted_percentile(sorted, 0.99);
  s.kl_max = sorted.back();
  s.top1_agreement = static_cast<double>(agree_) / static_cast<double>(s.positions);
  return s;
}

void add_divergence_json(nlohmann::json& row, const std::optional<DivergenceSummary>& summary) {
  const auto value = [&](double DivergenceSummary::*field) {
    return summary ? nlohmann::json((*summary).*field) : nlohmann::json(nullptr);
  };
  row["kl_mean"] = value(&DivergenceSummary::kl_mean);
  row["kl_p99"] = value(&DivergenceSummary::kl_p99);
  row["kl_max"] = value(&DivergenceSummary::kl_max);
  row["top1_agreement"] = value(&DivergenceSummary::top1_agreement);
}

std::optional<DivergenceSummary> divergence_from_json(const nlohmann::json& row,
                                                      int64_t positions) {
  if (row.at("kl_mean").is_null()) return std::nullopt;
  DivergenceSummary s;
  s.positions = positions;
  s.kl_mean = row.at("kl_mean").get<double>();
  s.kl_p99 = row.at("kl_p99").get<double>();
  s.kl_max = row.at("kl_max").get<double>();
  s.top1_agreement = row.at("top1_agreement").get<double>();
  return s;
}

}  // namespace visikv

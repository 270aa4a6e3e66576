// Small helpers shared by the test suites: seeded random data, fixture files, error messages.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/mapped_file.h"
#include "visikv/kv/cache.h"
#include "visikv/model/weight_kernels.h"

namespace visikv::test_support {

// The instruction sets to test: each one this CPU supports, from the portable path up. The
// weight kernels' switch selects Highway's target for every dispatched function (the weight
// kernels, core/vec and kv/row_kernels alike).
inline std::vector<std::string> available_targets() {
  std::vector<std::string> names;
  for (const char* name : {"generic", "avx2", "avx512", "avx512vnni", "amx", "neon"}) {
    try {
      set_weight_kernel_target(name);
      names.push_back(name);
    } catch (const Error&) {
    }
  }
  set_weight_kernel_target("native");
  return names;
}

struct TargetGuard {
  explicit TargetGuard(const std::string& name) { set_weight_kernel_target(name); }
  ~TargetGuard() { set_weight_kernel_target("native"); }
};

// n samples of N(0, scale²).
inline std::vector<float> random_vector(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// A little-endian binary fixture of T values.
template <typename T>
std::vector<T> read_raw(const std::filesystem::path& path) {
  MappedFile file(path);
  std::vector<T> values(file.size() / sizeof(T));
  if (!values.empty()) std::memcpy(values.data(), file.bytes().data(), values.size() * sizeof(T));
  return values;
}

// English text for the tiny fixtures' tokenizers (random models: any text will do).
inline const std::string kEnglishText =
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring "
    "role on the television series The Bill in 2000. This was followed by a starring role in the "
    "play Herons written by Simon Stephens, which was performed in 2001 at the Royal Court "
    "Theatre. The quick brown fox jumps over the lazy dog; all that glitters is not gold.\n";

// Where scripts/fetch_gemma3.sh puts Gemma-3-270M (Q4_K_M), an optional model: tests that need
// it skip, naming this path, when it is absent.
inline std::filesystem::path gemma3_model_path() {
  return std::filesystem::path(VISIKV_SOURCE_DIR) / "models" / "gemma-3-270m-q4_k_m.gguf";
}

// A path in the temporary directory, unique to this process.
inline std::filesystem::path temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() / (name + "_" + std::to_string(::getpid()));
}

inline nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  require(in.good(), "missing fixture ", path);
  return nlohmann::json::parse(in);
}

// The message of the visikv::Error that `action` throws, or "<no error>".
inline std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

// The visikv program run with `args` (a shell word list); stdout and stderr together.
struct ProgramRun {
  int status;
  std::string output;
};

// `environment`: assignments put before the command, e.g. "VISIKV_SIMD=avx2".
inline ProgramRun run_visikv(const std::string& args, const std::string& environment = "") {
  const std::string command = environment + " " + std::string(VISIKV_BINARY) + " " + args + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  EXPECT_NE(pipe, nullptr);
  if (pipe == nullptr) return {-1, ""};
  std::string output;
  std::array<char, 4096> buffer{};
  size_t n;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0)
    output.append(buffer.data(), n);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, output};
}

// Checks a cache's block summaries of layer 0 against the keys {n, kv_heads, d} as the cache
// stores them (what scores read): centroid, min, max, count, and a norm at or just above the
// largest key norm.
inline void expect_summaries_match(const KVCache& cache, const std::vector<float>& keys, int64_t n,
                                   int64_t kv_heads, int64_t d, int64_t block, double tolerance) {
  for (int64_t head = 0; head < kv_heads; ++head) {
    for (int64_t b = 0; b * block < n; ++b) {
      const BlockSummary s = cache.summary(0, head, b);
      const int64_t first = b * block, last = std::min(n, first + block);
      EXPECT_EQ(s.count, last - first);
      for (int64_t c = 0; c < d; ++c) {
        double sum = 0;
        float lo = INFINITY, hi = -INFINITY;
        for (int64_t j = first; j < last; ++j) {
          const float x = keys[(j * kv_heads + head) * d + c];
          sum += x;
          lo = std::min(lo, x);
          hi = std::max(hi, x);
        }
        EXPECT_NEAR(s.centroid[c], sum / (last - first), tolerance);
        EXPECT_EQ(s.min[c], lo);
        EXPECT_EQ(s.max[c], hi);
      }
      double norm = 0;
      for (int64_t j = first; j < last; ++j) {
        double sq = 0;
        for (int64_t c = 0; c < d; ++c) sq += std::pow(keys[(j * kv_heads + head) * d + c], 2.0);
        norm = std::max(norm, std::sqrt(sq));
      }
      EXPECT_GE(s.norm, norm);
      EXPECT_NEAR(s.norm, norm, 1e-6 * (1 + norm));
    }
  }
}

// How a model's logits agree with a top-k reference of another implementation, a directory
// written by scripts/reference_default_model.py (topk_ids.i32, topk_logprobs.f32,
// rest_logprob.f32, each row a position).
struct TopKAgreement {
  int64_t positions = 0;
  double top1 = 0;  // share of positions whose argmax is the reference's
  double kl_mean = 0, kl_max = 0;
  double logprob_diff_max = 0;  // max |Δ log-probability| over the reference's top-k tokens
};

// `logits`: {positions, vocab} of the model under test; `k`: the reference's ids per position.
// KL(reference || ours) is taken over the reference's top-k tokens plus one bucket for the rest:
// a lower bound of the full KL that is tight when the rest carries little mass.
inline TopKAgreement topk_agreement(std::span<const float> logits, int64_t vocab,
                                    const std::filesystem::path& reference, int64_t k) {
  const auto ids = read_raw<int32_t>(reference / "topk_ids.i32");
  const auto ref_logprobs = read_raw<float>(reference / "topk_logprobs.f32");
  const auto ref_rest = read_raw<float>(reference / "rest_logprob.f32");
  TopKAgreement a;
  a.positions = static_cast<int64_t>(logits.size()) / vocab;
  EXPECT_EQ(static_cast<int64_t>(ids.size()), a.positions * k);
  EXPECT_EQ(static_cast<int64_t>(ref_rest.size()), a.positions);
  if (static_cast<int64_t>(ids.size()) != a.positions * k) return a;
  std::vector<double> row(static_cast<size_t>(vocab));
  int64_t top1_agree = 0;
  double kl_sum = 0;
  for (int64_t t = 0; t < a.positions; ++t) {
    // log-softmax of the row, in double.
    const float* l = logits.data() + t * vocab;
    const double max = *std::max_element(l, l + vocab);
    double sum = 0;
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp(l[i] - max);
    const double lse = max + std::log(sum);
    for (int64_t i = 0; i < vocab; ++i) row[i] = l[i] - lse;
    if (std::max_element(row.begin(), row.end()) - row.begin() == ids[t * k]) ++top1_agree;
    double kl = 0, ours_in_top = 0;
    for (int64_t i = 0; i < k; ++i) {
      const double p = ref_logprobs[t * k + i], q = row[ids[t * k + i]];
      kl += std::exp(p) * (p - q);
      ours_in_top += std::exp(q);
      a.logprob_diff_max = std::max(a.logprob_diff_max, std::abs(p - q));
    }
    const double p_rest = ref_rest[t], q_rest = std::log(std::max(1e-300, 1.0 - ours_in_top));
    if (std::isfinite(p_rest)) kl += std::exp(p_rest) * (p_rest - q_rest);
    kl_sum += kl;
    a.kl_max = std::max(a.kl_max, kl);
  }
  a.top1 = static_cast<double>(top1_agree) / static_cast<double>(a.positions);
  a.kl_mean = kl_sum / static_cast<double>(a.positions);
  return a;
}

}  // namespace visikv::test_support

// HeadQ calibration (METHODS.md, HeadQ): run the dense model over a calibration text (disjoint
// from the test split; by default WikiText-2 validation), collect per (layer, KV head) the
// queries of its query-head group in the coordinates scores use (post-RoPE), and the keys it
// caches, and eigendecompose the uncentred second moments Σ_q = E[q qᵀ] and Σ_k = E[k kᵀ]
// (accumulated in double). The result keeps every eigenvalue and the top-`rank` eigenvectors of
// both, with the model's fingerprint (calibration/basis_file.h). It also keeps the same of the
// keys' within-group spread W = E[(k - k̄_g)(k - k̄_g)ᵀ] over groups of kCalibratedKeyGroup
// consecutive positions and, at full rank, what coding those groups costs in each direction of
// each query-basis kind (the measured distortions), which a query-basis codec's per-channel groups
// of that size allocate by. The keys of the whole groups are held in memory until then (tokens x
// layers x kv heads x head_dim floats). At full rank a second pass over the same windows watches
// the attention of every kFisherQueryStride-th position's queries and records, per direction and
// width, the attention-weighted score error of coding the keys they read (the Fisher tables,
// kv/qbasis.h: qbasis_accumulate_fisher).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>

#include "visikv/calibration/headq_basis.h"

namespace visikv {

class Model;

// Positions per group of the calibrated within-group key spread (HeadqBasisVectors::key_group):
// the per-channel group size of the query-basis specs the documents use (qbasis:...:g32:chan).
inline constexpr int64_t kCalibratedKeyGroup = 32;
// Newest positions a cache keeps in fp16, as the Fisher tables assume them
// (HeadqBasisVectors::key_window): the window of the same specs (qbasis:...:g32:chan:r128).
inline constexpr int64_t kCalibratedKeyWindow = 128;
// Positions apart of the queries whose attention the Fisher tables average.
inline constexpr int64_t kFisherQueryStride = 32;

struct CalibrationOptions {
  int64_t tokens = 8192;  // positions to run, BOS included (fewer when the text is shorter)
  int64_t rank = 16;      // eigenvectors kept per head
  // Positions per prefill window (BOS first where the model uses one), at most the model's
  // context length.
  int64_t window = 1024;
};

// progress(positions run, positions to run): at full rank every position runs twice (the second
// pass watches the attention for the Fisher tables).
using CalibrationProgress = std::function<void(int64_t done, int64_t total)>;

// `text`: the calibration text; `text_label` names it in errors and in the basis (its path).
// Throws visikv::Error for an empty text (or one with no tokens) and bad options.
HeadqBasis calibrate_headq(const Model& model, std::string_view text, const std::string& text_label,
                           const CalibrationOptions& options,
                           const CalibrationProgress& progress = {});

// The same from the text's tokens (without BOS), of which it reads at most options.tokens: a
// command tokenizes only that many leading tokens of a large text.
HeadqBasis calibrate_headq(const Model& model, std::span<const int32_t> text_tokens,
                           const std::string& text_label, const CalibrationOptions& options,
                           const CalibrationProgress& progress = {});

}  // namespace visikv

// Attention-mass coverage (METHODS.md, "Condensate sparse attention"): how much of the dense
// model's softmax mass each part of a sparse support holds, per layer.
//
// One window of text (BOS first when the model uses one) is prefilled densely through a cache in
// the given codecs. For every query at a position t >= `from` and every query head, with a the
// dense attention over the visible positions (computed from the cache's own scores, as dense
// attention computes them):
//   anchors  sum of a over the first A visible positions,
//   window   sum over the last W positions up to t (after the anchors),
//   top-k    sum of the k largest a among the positions between the two: the best any k dynamic
//            positions of this query head could hold (per query head, no GQA pooling),
//   a+w+k    the three together (disjoint),
//   needed   the fewest positions that hold 1 - epsilon of the mass given anchors and window:
//            anchors + window + the largest weights between them until the sum reaches
//            1 - epsilon. No support that reads anchors and window (every certified support
//            does) and leaves at most epsilon of the mass out can be smaller, so this is the
//            floor a certified mode at that epsilon is measured against.
//   and for each selector spec, the mass inside the support that selector reads for that query
//   (attend over the same cache and queries, prefill-style: every query chooses afresh),
//   with its support size.
// Each figure is reported per layer (and pooled over layers) as the mean over (position, query
// head) and low percentiles (p10, p1: the share a tenth / a hundredth of the queries fall below).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"

namespace visikv {

struct HeadqBasisVectors;

struct CoverageOptions {
  int64_t from = 256;  // only queries at positions >= from are counted
  int64_t anchors = 1, window = 64, top_k = 32;
  double epsilon = 0.01;       // the mass the `needed` support may leave out
  KeyCodecSpec key_codec;      // f32 by default
  ValueCodecSpec value_codec;  // f32 by default
  // Calibrated bases for selectors with a query frame (SelectorSpec::frame_rank); not owned.
  const HeadqBasisVectors* basis = nullptr;
};

struct CoverageSummary {
  double mean = 0, p10 = 0, p1 = 0, min = 0;
};

// Support sizes as shares of the visible context: mean and high percentiles over queries.
struct SupportShareSummary {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
  double positions = 0;  // mean positions
};

struct CoverageLayer {
  CoverageSummary anchors, window, top_k, total;
  SupportShareSummary needed;              // fewest positions holding 1 - epsilon of the mass
  std::vector<CoverageSummary> selectors;  // one per selector spec
  std::vector<double> support_mean;        // positions read per query head, per selector
  // keys read per query head, per selector: the support's plus those scored only to choose
  // (certified with position sketches reads keys whose values it then leaves out)
  std::vector<double> keys_mean;
};

struct CoverageResult {
  int64_t positions = 0;          // window length (BOS included)
  int64_t queries_per_layer = 0;  // (position, query head) pairs counted per layer
  double context_mean = 0;        // visible positions per counted query
  std::vector<std::string> selectors;
  std::vector<CoverageLayer> layers;
  CoverageLayer pooled;  // over every layer
};

// The summary (mean, p10, p1, min) of a list of shares; all zeros when empty.
CoverageSummary summarize_shares(std::vector<double> shares);

// progress(step done, steps): the dense prefill, then one step per layer.
using CoverageProgress = std::function<void(int64_t done, int64_t total)>;

// `tokens`: the window, BOS included when the model uses one. Selectors must share one block
// size and one query frame rank (the cache's); throws visikv::Error for bad specs, sizes or options
// (from beyond the window, negative sizes).
CoverageResult attention_coverage(Decoder& decoder, std::span<const int32_t> tokens,
                                  const std::vector<NamedSelectorSpec>& selectors,
                                  const CoverageOptions& options,
                                  const CoverageProgress& progress = {});

}  // namespace visikv

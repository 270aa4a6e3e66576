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

struct CoverageOptions {
  int64_t from = 256;  // only queries at positions >= from are counted
  int64_t anchors = 1, window = 64, top_k = 32;
  KeyCodecSpec key_codec;      // f32 by default
  ValueCodecSpec value_codec;  // f32 by default
};

struct CoverageSummary {
  double mean = 0, p10 = 0, p1 = 0, min = 0;
};

struct CoverageLayer {
  CoverageSummary anchors, window, top_k, total;
  std::vector<CoverageSummary> selectors;  // one per selector spec
  std::vector<double> support_mean;        // positions read per query head, per selector
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
// size (the cache's); throws visikv::Error for bad specs, sizes or options (from beyond the
// window, negative sizes).
CoverageResult attention_coverage(Decoder& decoder, std::span<const int32_t> tokens,
                                  const std::vector<NamedSelectorSpec>& selectors,
                                  const CoverageOptions& options,
                                  const CoverageProgress& progress = {});

}  // namespace visikv

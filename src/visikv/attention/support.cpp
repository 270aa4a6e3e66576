#include "visikv/attention/support.h"

#include <cmath>
#include <string>
#include <vector>

#include "visikv/attention/attention.h"
#include "visikv/attention/support_blocks.h"
#include "visikv/attention/support_certified.h"
#include "visikv/attention/support_dense.h"
#include "visikv/attention/support_topk.h"
#include "visikv/core/error.h"
#include "visikv/kv/headq.h"

namespace visikv {

ChosenSupport Support::choose_in_steps(const SupportQuery& query, SupportScratch& scratch,
                                       SparseQueryStats& stats) {
  for (int step = 0; step < choice_steps(); ++step) {
    const int64_t units = choice_units(step, query, scratch), most = most_choice_units(step, query);
    // Decode hands out most_choice_units() units per step; one more would never run there.
    require(units <= most, "selector '", describe(spec_), "': step ", step, " has ", units,
            " units, more than the most it declares (", most, ")");
    for (int64_t unit = 0; unit < units; ++unit) run_choice_unit(step, unit, query, scratch, stats);
  }
  return finish_choice(query, scratch, stats);
}

void Support::prepare(const KVCache& cache, const AttentionSpec& attention) {
  require(attention.scale > 0, "sparse attention '", describe(spec_),
          "' needs a positive score scale (the rules rank scaled scores and bounds)");
  const int64_t block = cache.block_size();
  require(!spec_.uses_blocks() || spec_.block_size == 0 || spec_.block_size == block, "selector '",
          describe(spec_), "' asks for blocks of ", spec_.block_size, " positions, but the cache (",
          cache.describe(), ") summarises blocks of ", block);
  if (spec_.frame_rank > 0) {
    const int64_t kept = cache.summaries(0, 0).frame_rank;
    require(kept == spec_.frame_rank, "selector '", describe(spec_), "' bounds keys in ",
            spec_.frame_rank, " query directions, but the cache (", cache.describe(), ") keeps ",
            kept == 0 ? std::string("no summary frame") : str_cat("a frame of rank ", kept),
            ": give the command a calibrated basis (--basis)");
  }
  if (spec_.sketch_bits > 0) {
    const int64_t levels = cache.summaries(0, 0).sketch_levels;
    require(levels == (int64_t{1} << (spec_.sketch_bits - 1)) - 1, "selector '", describe(spec_),
            "' bounds positions from ", spec_.sketch_bits, "-bit key sketches, but the cache (",
            cache.describe(), ") keeps ",
            levels == 0 ? std::string("none") : str_cat("sketches of ", levels, " levels"),
            " (prepare_summaries)");
  }
}

int64_t keys_read(const SelectorSpec& spec, const SparseQueryStats& stats) {
  const bool chosen_among_scored = spec.kind == SelectorKind::Sparse &&
                                   spec.rule == SelectorRule::Exact && stats.selection_scores > 0;
  return stats.support + stats.selection_scores - (chosen_among_scored ? stats.dynamic : 0);
}

std::unique_ptr<Support> make_support(const SelectorSpec& spec) {
  switch (spec.kind) {
    case SelectorKind::Dense:
      return std::make_unique<DenseSupport>();
    case SelectorKind::Certified:
      return std::make_unique<CertifiedSupport>(spec);
    case SelectorKind::Sparse:
      break;
  }
  if (spec.uses_blocks()) return std::make_unique<BlockSupport>(spec);
  return std::make_unique<TopKSupport>(spec);
}

std::unique_ptr<Support> make_support(std::string_view spec) {
  return make_support(parse_selector_spec(spec));
}

void prepare_summaries(KVCache& cache, const SelectorSpec& spec, const HeadqBasisVectors* basis) {
  if (spec.sketch_bits > 0) cache.set_position_sketches(static_cast<int>(spec.sketch_bits));
  const int64_t rank = spec.frame_rank;
  if (rank == 0) return;
  const CacheShape& shape = cache.shape();
  const int64_t d = shape.head_dim, heads = shape.layers * shape.kv_heads;
  require(basis != nullptr, "selector '", describe(spec), "' bounds keys in ", rank,
          " calibrated query directions per head: give a basis file (--basis; made by "
          "`visikv calibrate MODEL --rank ",
          rank, " --out FILE`)");
  require(
      basis->layers == shape.layers && basis->kv_heads == shape.kv_heads && basis->head_dim == d,
      "selector '", describe(spec), "': the basis has ", basis->layers, " layers x ",
      basis->kv_heads, " kv heads x head_dim ", basis->head_dim, ", the model ", shape.layers,
      " x ", shape.kv_heads, " x ", d);
  require(basis->rank >= rank, "selector '", describe(spec), "' needs ", rank,
          " query directions per head; the basis holds ", basis->rank, " (calibrate with --rank ",
          rank, ")");
  std::vector<double> rows(static_cast<size_t>(heads * rank * d));
  for (int64_t i = 0; i < heads; ++i) {
    const std::span<const double> top =
        basis->query_rows(i / shape.kv_heads, i % shape.kv_heads).first(rank * d);
    const std::span<double> head = std::span(rows).subspan(i * rank * d, rank * d);
    std::copy(top.begin(), top.end(), head.begin());
    // Again in float64: rows stored in a file may be orthonormal only to float32 rounding.
    const int64_t dependent = orthonormalize_rows(head, rank, d, 1e-6);
    require(dependent < 0, "selector '", describe(spec), "': basis direction ", dependent,
            " of head ", i, " is not independent of the ones before it");
  }
  cache.set_summary_frames(rows, rank);
}

}  // namespace visikv

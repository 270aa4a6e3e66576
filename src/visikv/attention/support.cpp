#include "visikv/attention/support.h"

#include "visikv/attention/attention.h"
#include "visikv/attention/support_blocks.h"
#include "visikv/attention/support_certified.h"
#include "visikv/attention/support_dense.h"
#include "visikv/attention/support_topk.h"
#include "visikv/core/error.h"

namespace visikv {

void Support::prepare(const KVCache& cache, const AttentionSpec& attention) {
  require(attention.scale > 0, "sparse attention '", describe(spec_),
          "' needs a positive score scale (the rules rank scaled scores and bounds)");
  const int64_t block = cache.block_size();
  require(!spec_.uses_blocks() || spec_.block_size == 0 || spec_.block_size == block, "selector '",
          describe(spec_), "' asks for blocks of ", spec_.block_size, " positions, but the cache (",
          cache.describe(), ") summarises blocks of ", block);
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

}  // namespace visikv

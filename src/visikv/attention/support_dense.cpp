#include "visikv/attention/support_dense.h"

#include "visikv/attention/attention.h"

namespace visikv {

ChosenSupport DenseSupport::choose(const SupportQuery& query, SupportScratch& /*scratch*/,
                                   SparseQueryStats& /*stats*/) {
  return {visible_positions(query.position, query.model_window), false};
}

}  // namespace visikv

#include "visikv/eval/context_limit.h"

#include "visikv/core/error.h"

namespace visikv {

bool check_context(const Config& config, int64_t positions, std::string_view what,
                   PastContext past) {
  const int64_t context = config.max_positions;
  if (context <= 0 || positions <= context) return false;
  const bool learned = config.positions == PositionKind::Learned;
  if (past == PastContext::Allow && !learned) return true;
  std::string hint;
  if (learned && past != PastContext::Refuse) {
    hint =
        "; its positions are learned embeddings that end there, so --allow-past-context "
        "cannot run past it";
  } else if (past == PastContext::Offer) {
    hint = " (--allow-past-context runs past it, with a warning)";
  }
  fail(what, " needs ", positions, " positions, which exceeds the model's context of ", context,
       " positions", hint);
}

std::string past_context_warning(const Config& config, int64_t positions, std::string_view what) {
  return str_cat("warning: ", what, " needs ", positions,
                 " positions, past the model's context of ", config.max_positions,
                 " (--allow-past-context): the model never saw those positions, so what it "
                 "computes there may be garbage");
}

}  // namespace visikv

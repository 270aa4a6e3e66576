#include <cblas.h>
#include <omp.h>

#include "visikv/cli/commands.h"
#include "visikv/kv/headq.h"

namespace visikv::cli {

GlobalOptions& global_options() {
  static GlobalOptions options;
  return options;
}

void apply_global_options() {
  const int threads = global_options().threads;
  if (threads > 0) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
  }
}

nlohmann::json headq_basis_json(const HeadqBasis& basis) {
  return {{"text", basis.text},
          {"tokens", basis.tokens},
          {"window", basis.window},
          {"rank", basis.rank},
          {"fingerprint", basis.fingerprint}};
}

}  // namespace visikv::cli

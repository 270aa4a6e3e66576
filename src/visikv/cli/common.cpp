#include <cblas.h>
#include <omp.h>

#include "visikv/calibration/headq_basis.h"
#include "visikv/cli/commands.h"
#include "visikv/eval/data_paths.h"
#include "visikv/model/decoder.h"

namespace visikv::cli {

GlobalOptions& global_options() {
  static GlobalOptions options;
  return options;
}

void add_numerics_option(CLI::App& cmd, std::string& numerics) {
  cmd.add_option("--numerics", numerics,
                 "exact (float32 products, transformers-equal), int8 (8-bit activations and "
                 "integer products for GGUF block weights, as llama.cpp) or int16 (the same with "
                 "16-bit activations: within about 1e-5 of exact)")
      ->check(CLI::IsMember({"exact", "int8", "int16"}))
      ->capture_default_str();
}

void apply_numerics(const std::string& numerics, Decoder& decoder) {
  decoder.set_product_rounding(numerics_rounding(numerics));
}

void apply_global_options() {
  const int threads = global_options().threads;
  if (threads > 0) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
  }
}

std::filesystem::path text_or_default_test_text(const std::string& flag) {
  return flag.empty() ? default_test_text() : std::filesystem::path(flag);
}

}  // namespace visikv::cli

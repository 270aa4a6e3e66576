// visikv: run real language-model checkpoints and measure KV-cache compression.
#include <cstdio>
#include <exception>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"visikv: an inference engine and toolkit for model-visible KV-cache compression"};
  app.require_subcommand(1);
  app.add_option("--threads,-t", visikv::cli::global_options().threads, "worker threads (default: all cores)")
      ->check(CLI::NonNegativeNumber);
  visikv::cli::add_info_command(app);
  visikv::cli::add_tokenize_command(app);
  visikv::cli::add_generate_command(app);
  visikv::cli::add_ppl_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const visikv::Error& e) {
    std::fprintf(stderr, "visikv: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "visikv: internal error: %s\n", e.what());
    return 2;
  }
  return 0;
}

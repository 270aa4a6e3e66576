// visikv: run real language-model checkpoints and measure KV-cache compression.
#include <cstdio>
#include <exception>
#include <string>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"visikv: an inference engine and toolkit for model-visible KV-cache compression"};
  app.require_subcommand(1);
  app.add_option("--threads,-t", visikv::cli::global_options().threads,
                 "worker threads (default: all cores)")
      ->check(CLI::NonNegativeNumber);
  visikv::cli::add_info_command(app);
  visikv::cli::add_tokenize_command(app);
  visikv::cli::add_generate_command(app);
  visikv::cli::add_ppl_command(app);
  // Further commands register here, one line each.
  visikv::cli::add_calibrate_command(app);
  visikv::cli::add_eval_command(app);
  visikv::cli::add_analyze_command(app);
  // Name an unknown command instead of CLI11's generic "a subcommand is required".
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.empty() || arg[0] == '-') {
      if (arg == "--threads" || arg == "-t") ++i;
      continue;
    }
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands({})) {
      names += (names.empty() ? "" : ", ") + sub->get_name();
      known = known || sub->get_name() == arg;
    }
    if (!known) {
      std::fprintf(stderr, "visikv: error: unknown command '%s' (commands: %s)\n", arg.c_str(),
                   names.c_str());
      return 1;
    }
    break;
  }
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

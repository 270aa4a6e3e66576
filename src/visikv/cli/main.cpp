// visikv: run real language-model checkpoints and measure KV-cache compression.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "visikv/cli/app.h"
#include "visikv/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"visikv: an inference engine and toolkit for model-visible KV-cache compression"};
  visikv::cli::add_commands(app);
  if (auto unknown =
          visikv::cli::unknown_command(app, std::vector<std::string>(argv + 1, argv + argc))) {
    std::fprintf(stderr, "visikv: error: %s\n", unknown->c_str());
    return 1;
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

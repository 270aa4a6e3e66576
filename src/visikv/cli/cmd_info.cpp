#include <iostream>
#include <memory>
#include <string>

#include "visikv/cli/commands.h"
#include "visikv/model/model.h"

namespace visikv::cli {

void add_info_command(CLI::App& app) {
  auto model = std::make_shared<std::string>();
  CLI::App* cmd =
      app.add_subcommand("info", "Describe a model: architecture, shapes, dtypes, tokenizer");
  cmd->add_option("model", *model, "Hugging Face directory, .gguf file, or 'default'")->required();
  cmd->callback([model] {
    apply_global_options();
    std::cout << Model::load(*model).describe();
  });
}

}  // namespace visikv::cli

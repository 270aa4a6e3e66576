#include <iostream>
#include <memory>
#include <string>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {
struct TokenizeFlags {
  std::string model, text, file;
  bool no_special = false, pieces = false, count = false;
};
}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto flags = std::make_shared<TokenizeFlags>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Print the token ids of a text");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  auto* text = cmd->add_option("text", flags->text, "the text to tokenize");
  cmd->add_option("--file,-f", flags->file, "read the text from a file")->excludes(text);
  cmd->add_flag("--no-special", flags->no_special, "do not add BOS or other special tokens");
  cmd->add_flag("--pieces", flags->pieces, "print each token's text beside its id");
  cmd->add_flag("--count", flags->count, "print only the number of tokens");
  cmd->callback([flags] {
    apply_global_options();
    require(!flags->text.empty() || !flags->file.empty(), "give a text or --file");
    const Model model = Model::load(flags->model);
    const std::string text = flags->file.empty() ? flags->text : read_text_file(flags->file);
    const std::vector<int32_t> ids = model.tokenizer().encode(text, !flags->no_special);
    if (flags->count) {
      std::cout << ids.size() << "\n";
      return;
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      if (flags->pieces) {
        std::cout << ids[i] << "\t" << model.tokenizer().token_bytes(ids[i]) << "\n";
      } else {
        std::cout << (i ? " " : "") << ids[i];
      }
    }
    if (!flags->pieces) std::cout << "\n";
  });
}

}  // namespace visikv::cli

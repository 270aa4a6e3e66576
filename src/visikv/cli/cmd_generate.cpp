#include <iostream>
#include <memory>
#include <optional>
#include <string>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/eval/generate.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {
struct GenerateFlags {
  std::string model, prompt, keys = "f32", values = "f32", selector = "dense", numerics = "exact";
  GenerationOptions options;
  bool ignore_eos = false, stats = false;
};
}  // namespace

void add_generate_command(CLI::App& app) {
  auto flags = std::make_shared<GenerateFlags>();
  CLI::App* cmd =
      app.add_subcommand("generate", "Continue a prompt (greedy unless --temperature > 0)");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("prompt", flags->prompt, "the prompt text")->required();
  cmd->add_option("-n,--tokens", flags->options.max_new_tokens, "new tokens at most")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--temperature", flags->options.sampling.temperature, "0 = greedy")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-k", flags->options.sampling.top_k,
                  "sample among the k most likely (0 = all)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", flags->options.sampling.top_p, "nucleus probability mass")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--seed", flags->options.sampling.seed, "random seed for sampling");
  cmd->add_option("--keys,--cache", flags->keys, "key cache codec (docs/CACHE_SPECS.md)");
  cmd->add_option("--values", flags->values, "value cache codec (docs/CACHE_SPECS.md)");
  cmd->add_option("--selector", flags->selector, "attention support (docs/SELECTOR_SPECS.md)");
  add_numerics_option(*cmd, flags->numerics);
  cmd->add_flag("--ignore-eos", flags->ignore_eos, "keep going past the end-of-sequence token");
  cmd->add_flag("--stats", flags->stats, "print timing to stderr");
  cmd->callback([flags] {
    apply_global_options();
    const Model model = Model::load(flags->model);
    Decoder decoder(model);
    apply_numerics(flags->numerics, decoder);
    const std::vector<int32_t> prompt = model.tokenizer().encode(flags->prompt, true);
    const SelectorSpec selector_spec = parse_selector_spec(flags->selector);
    // The cache keeps its block summaries at the selector's block size.
    auto cache = make_cache(decoder.cache_shape(), flags->keys, flags->values,
                            prompt.size() + flags->options.max_new_tokens,
                            selector_spec.block_size > 0 ? selector_spec.block_size : 32);
    const std::unique_ptr<Support> support = make_support(selector_spec);
    flags->options.support = support.get();
    flags->options.stop_at_eos = !flags->ignore_eos;
    std::cout << flags->prompt << std::flush;
    const Tokenizer& tokenizer = model.tokenizer();
    const GenerationResult result =
        generate(decoder, *cache, prompt, flags->options, [&](int32_t token) {
          if (!tokenizer.is_special(token)) std::cout << tokenizer.token_bytes(token) << std::flush;
        });
    std::cout << "\n";
    if (flags->stats) {
      std::cerr << "prompt: " << prompt.size() << " tokens in " << result.prefill_seconds
                << " s; generated " << result.tokens.size() << " tokens at "
                << (result.tokens.size() > 1 ? (result.tokens.size() - 1) / result.decode_seconds
                                             : 0.0)
                << " tokens/s" << (result.stopped_at_eos ? " (stopped at EOS)" : "") << "\n";
    }
  });
}

}  // namespace visikv::cli

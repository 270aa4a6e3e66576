#include <algorithm>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/generate.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {
struct GenerateFlags {
  // int16 by default: within the gate for a default numerics mode on both measured
  // models (docs/RESULTS.md) and faster in decode than exact.
  std::string model, prompt, file, keys = "f32", values = "f32", selector = "dense",
                                   numerics = "int16";
  GenerationOptions options;
  bool ignore_eos = false, stats = false, allow_past_context = false;
};

// The prompt's tokens, BOS or template tokens included. A prompt file may be large: unless the
// run may go past the context, its first tokens show whether it fits before all of it is
// tokenized.
std::vector<int32_t> prompt_tokens(const Model& model, const std::string& text, PastContext past) {
  const Config& config = model.config();
  const int64_t context = config.max_positions;
  if (context > 0 && (past != PastContext::Allow || config.positions == PositionKind::Learned)) {
    const std::vector<int32_t> head = leading_tokens(model.tokenizer(), text, context + 1);
    check_context(config, static_cast<int64_t>(head.size()),
                  str_cat("a prompt of more than ", context, " tokens"), past);
  }
  return model.tokenizer().encode(text, true);
}
}  // namespace

void add_generate_command(CLI::App& app) {
  auto flags = std::make_shared<GenerateFlags>();
  CLI::App* cmd =
      app.add_subcommand("generate", "Continue a prompt (greedy unless --temperature > 0)");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  auto* prompt = cmd->add_option("prompt", flags->prompt, "the prompt text");
  auto* file = cmd->add_option("--file,-f", flags->file, "read the prompt from a file");
  file->excludes(prompt);
  cmd->add_option("-n,--tokens", flags->options.max_new_tokens,
                  "new tokens at most (prompt + new tokens must fit the model's context)")
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
  cmd->add_flag("--allow-past-context", flags->allow_past_context,
                "let a RoPE model run past its trained context (warns; its output there may be "
                "garbage; never for learned positions)");
  cmd->add_flag("--stats", flags->stats, "print timing to stderr");
  cmd->callback([flags, prompt, file] {
    apply_global_options();
    // An empty prompt is fine where the model adds BOS.
    require(prompt->count() > 0 || file->count() > 0, "give a prompt or --file");
    const Model model = Model::load(flags->model);
    Decoder decoder(model);
    apply_numerics(flags->numerics, decoder);
    const std::string text = flags->file.empty() ? flags->prompt : read_text_file(flags->file);
    GenerationOptions& options = flags->options;
    options.past_context = flags->allow_past_context ? PastContext::Allow : PastContext::Offer;
    const std::vector<int32_t> prompt = prompt_tokens(model, text, options.past_context);
    const std::optional<std::string> warning =
        check_generation_context(model.config(), static_cast<int64_t>(prompt.size()),
                                 options.max_new_tokens, options.past_context);
    if (warning) std::cerr << "visikv: " << *warning << "\n";
    const SelectorSpec selector_spec = parse_selector_spec(flags->selector);
    // The cache keeps its block summaries at the selector's block size.
    const int64_t reserve =
        generation_cache_reserve(static_cast<int64_t>(prompt.size()), options.max_new_tokens);
    auto cache = make_cache(decoder.cache_shape(), flags->keys, flags->values, reserve,
                            selector_spec.cache_block_size());
    prepare_summaries(*cache, selector_spec, nullptr);
    const std::unique_ptr<Support> support = make_support(selector_spec);
    options.support = support.get();
    options.stop_at_eos = !flags->ignore_eos;
    std::cout << text << std::flush;
    const Tokenizer& tokenizer = model.tokenizer();
    const GenerationResult result = generate(decoder, *cache, prompt, options, [&](int32_t token) {
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

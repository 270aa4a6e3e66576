// The `visikv` subcommands. Each registers its flags on the app and runs when chosen; errors
// are thrown as visikv::Error and reported by main.
#pragma once

#include <CLI/CLI.hpp>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/core/error.h"

namespace visikv {
class Decoder;
}  // namespace visikv

namespace visikv::cli {

void add_info_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_ppl_command(CLI::App& app);
void add_calibrate_command(CLI::App& app);       // `calibrate`: HeadQ query bases
void add_eval_command(CLI::App& app);            // `eval` with its subcommands (sparse, needle)
void add_eval_kv_command(CLI::App& eval);        // `eval kv`: the K-only decode-perplexity grid
void add_eval_numerics_command(CLI::App& eval);  // `eval numerics`: fast vs exact products
void add_eval_ruler_command(CLI::App& eval);     // `eval ruler`: RULER-style retrieval suite
// The selectors the retrieval evaluations (`eval needle`, `eval ruler`) run by default.
const std::vector<std::string>& retrieval_selector_grid();
// `analyze`: key MSE and F against attention KL (eval/analyze.h).
void add_analyze_command(CLI::App& app);
// `serve`: the OpenAI-compatible HTTP server (serve/server.h).
void add_serve_command(CLI::App& app);

// Flags of the main program that every command honours.
struct GlobalOptions {
  int threads = 0;  // 0: all cores
};
GlobalOptions& global_options();
// `--numerics exact|int8|int16` of generate, serve and ppl: exact products (transformers-equal) or
// 8- or 16-bit activations with integer products for GGUF block weights (ProductRounding); the
// default is the flag's initial value (int16 for generate and serve, exact for ppl).
void add_numerics_option(CLI::App& cmd, std::string& numerics);
void apply_numerics(const std::string& numerics, Decoder& decoder);

// Parses a flag's text once, where it enters the program; a bad value fails naming the flag
// ("--keys: cache spec 'int5:g16:tok': ...").
template <typename Parse>
auto parse_flag(std::string_view flag, std::string_view text, Parse parse) {
  try {
    return parse(text);
  } catch (const Error& e) {
    fail(flag, ": ", e.what());
  }
}

// The text a command reads: the --text (or --file) flag, else WikiText-103 test.
std::filesystem::path text_or_default_test_text(const std::string& flag);

// Applies the global options (thread count for OpenMP and BLAS); each command calls it first.
void apply_global_options();

}  // namespace visikv::cli

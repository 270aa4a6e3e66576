// The `visikv` command line as a value: main() runs it on argv, the Python package runs command
// lines in-process (visikv.run) and gets back the JSON the command writes.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace visikv::cli {

// Registers every command and the global options on `app`.
void add_commands(CLI::App& app);

// The command `args` (without the program name) names, if it is not one: an error naming it and
// the commands. Checked before parsing, so that CLI11's generic message does not hide it.
std::optional<std::string> unknown_command(const CLI::App& app,
                                           const std::vector<std::string>& args);

// Runs one command line in-process, as the program runs it. Throws visikv::Error for bad flags
// (CLI11's message) and for the command's own failures. A command that can write JSON (--json)
// and was not asked to writes it to a temporary file, which is read back and returned; --help
// returns {"help": text}; otherwise null.
nlohmann::json run_command(const std::vector<std::string>& args);

}  // namespace visikv::cli

#include "visikv/cli/app.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>

#include "visikv/cli/commands.h"
#include "visikv/core/error.h"
#include "visikv/formats/json_file.h"

namespace visikv::cli {

void add_commands(CLI::App& app) {
  app.require_subcommand(1);
  app.add_option("--threads,-t", global_options().threads, "worker threads (default: all cores)")
      ->check(CLI::NonNegativeNumber);
  add_info_command(app);
  add_tokenize_command(app);
  add_generate_command(app);
  add_ppl_command(app);
  // Further commands register here, one line each.
  add_calibrate_command(app);
  add_eval_command(app);
  add_analyze_command(app);
  add_serve_command(app);
}

std::optional<std::string> unknown_command(const CLI::App& app,
                                           const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
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
    if (known) return std::nullopt;
    return str_cat("unknown command '", arg, "' (commands: ", names, ")");
  }
  return std::nullopt;
}

namespace {

// The command a line names: down the subcommands, each the first word that names one of the
// level above's (the words before it are options of that level).
CLI::App* named_command(CLI::App& app, const std::vector<std::string>& args) {
  CLI::App* at = &app;
  for (const std::string& arg : args) {
    if (at->get_subcommands({}).empty()) break;
    for (CLI::App* sub : at->get_subcommands({}))
      if (sub->check_name(arg)) {
        at = sub;
        break;
      }
  }
  return at;
}

bool asks_for_json(const std::vector<std::string>& args) {
  return std::any_of(args.begin(), args.end(), [](const std::string& a) {
    return a == "--json" || a.starts_with("--json=");
  });
}

// A file name no other run uses: the process id and a counter, in the temporary directory.
std::filesystem::path temporary_json_path() {
  static std::atomic<int64_t> counter{0};
  return std::filesystem::temp_directory_path() /
         str_cat("visikv-", ::getpid(), "-", counter++, ".json");
}

}  // namespace

nlohmann::json run_command(const std::vector<std::string>& args) {
  CLI::App app{"visikv"};
  add_commands(app);
  if (std::optional<std::string> unknown = unknown_command(app, args)) fail(*unknown);
  CLI::App* command = named_command(app, args);
  std::vector<std::string> line = args;
  // The temporary file goes however the run ends.
  struct TemporaryFile {
    std::filesystem::path path;
    ~TemporaryFile() {
      std::error_code ignored;
      if (!path.empty()) std::filesystem::remove(path, ignored);
    }
  } json;
  if (command->get_option_no_throw("--json") != nullptr && !asks_for_json(args)) {
    json.path = temporary_json_path();
    line.insert(line.end(), {"--json", json.path.string()});
  }
  // CLI11 takes the words last first.
  std::vector<std::string> reversed(line.rbegin(), line.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    return {{"help", command->help()}};
  } catch (const CLI::ParseError& e) {
    fail(e.what());
  }
  if (json.path.empty()) return nullptr;
  return read_json_file(json.path);
}

}  // namespace visikv::cli

#include "visikv/cli/long_run.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <tuple>

#include "visikv/core/error.h"
#include "visikv/eval/report.h"
#include "visikv/model/weight_kernels.h"

namespace visikv::cli {

void add_run_output_options(CLI::App& cmd, RunOutputFlags& flags, const std::string& what) {
  cmd.add_option("--json", flags.json, "write " + what + " as JSON to this file, row by row");
  cmd.add_option("--resume", flags.resume,
                 "continue the run whose JSON is in this file: rows already there are kept, not "
                 "run again (same parameters only); the file is written as with --json");
  cmd.add_flag("--quiet,-q", flags.quiet, "no progress on stderr");
}

RowJournal open_row_journal(const RunOutputFlags& flags, std::string command,
                            nlohmann::json parameters, RowLayout layout) {
  require(flags.json.empty() || flags.resume.empty() ||
              std::filesystem::path(flags.json) == std::filesystem::path(flags.resume),
          "--json ", flags.json, " and --resume ", flags.resume,
          ": a resumed run writes the file it resumes; give one of them");
  parameters["kernels"] = weight_kernel_target();
  const std::string path = flags.resume.empty() ? flags.json : flags.resume;
  RowJournal journal(path, !flags.resume.empty(), std::move(command), std::move(parameters),
                     std::move(layout));
  if (!flags.resume.empty() && !flags.quiet && !journal.resumed())
    std::fprintf(stderr, "resume: %s does not exist yet; every row runs\n", path.c_str());
  return journal;
}

RowProgress::RowProgress(int64_t rows, bool quiet)
    : rows_(rows), quiet_(quiet), terminal_(::isatty(STDERR_FILENO) != 0) {}

void RowProgress::kept(const std::string& name) {
  ++index_;
  print(str_cat("[", index_, "/", rows_, "] ", name, ": kept from the resumed file"), true);
}

std::string RowProgress::eta(double row_fraction) const {
  const double done = static_cast<double>(run_rows_) + row_fraction;
  if (done <= 0) return "ETA -";
  const double seconds = std::chrono::duration<double>(Clock::now() - first_start_).count();
  const double left = static_cast<double>(rows_ - index_) + (row_open_ ? 1 - row_fraction : 0);
  const auto s = static_cast<long long>(seconds / done * left + 0.5);
  char buffer[48];
  if (s >= 3600)
    std::snprintf(buffer, sizeof buffer, "ETA %lldh%02lldm", s / 3600, s / 60 % 60);
  else
    std::snprintf(buffer, sizeof buffer, "ETA %lldm%02llds", s / 60, s % 60);
  return buffer;
}

void RowProgress::start(const std::string& name) {
  if (row_open_) finish();
  const auto now = Clock::now();
  if (run_rows_ == 0) first_start_ = now;
  row_open_ = true;
  name_ = name;
  ++index_;
  row_start_ = now;
  last_tenth_ = -1;
}

void RowProgress::update(const std::string& name, int64_t done, int64_t total,
                         const std::string& unit) {
  if (!row_open_ || name != name_) start(name);
  const auto now = Clock::now();
  if (quiet_) return;
  const double fraction =
      static_cast<double>(done) / static_cast<double>(std::max<int64_t>(total, 1));
  if (terminal_) {
    if (done < total && now - last_draw_ < std::chrono::milliseconds(200)) return;
    last_draw_ = now;
  } else {
    const auto tenth = static_cast<int64_t>(10 * fraction);
    if (tenth <= last_tenth_) return;
    last_tenth_ = tenth;
  }
  const double seconds = std::chrono::duration<double>(now - row_start_).count();
  // No rate from the first instants of a row (a division by almost nothing).
  char rate[64];
  // Slow units (a long prompt: minutes on a loaded machine) read better as seconds each than
  // as "0.0 prompts/s".
  if (seconds >= 0.05 && done > 0 && seconds / done >= 10)
    std::snprintf(rate, sizeof rate, "%.0f s each", seconds / done);
  else if (seconds >= 0.05)
    std::snprintf(rate, sizeof rate, "%.1f %s/s", done / seconds, unit.c_str());
  else
    std::snprintf(rate, sizeof rate, "- %s/s", unit.c_str());
  print(str_cat("[", index_, "/", rows_, "] ", name, ": ", done, "/", total, " ", unit, ", ", rate,
                "; ", eta(fraction)),
        false);
}

void RowProgress::finish() {
  if (!row_open_) return;
  const double seconds = std::chrono::duration<double>(Clock::now() - row_start_).count();
  row_open_ = false;
  ++run_rows_;
  char took[32];
  std::snprintf(took, sizeof took, "%.1f s", seconds);
  print(str_cat("[", index_, "/", rows_, "] ", name_, ": done in ", took,
                index_ < rows_ ? "; " + eta(0) : std::string()),
        true);
}

void RowProgress::note(const std::string& line) { print(line, true); }

void RowProgress::print(const std::string& line, bool final) {
  if (quiet_) return;
  if (terminal_) {
    // Redrawn in place; a final line stays.
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

KvGridJournal kv_grid_journal(
    const RowJournal& journal, RowProgress& progress, const std::vector<KvGridRow>& grid,
    std::function<nlohmann::json(const std::vector<KvGridResult>&)> document) {
  std::vector<std::string> names;
  for (const KvGridRow& row : grid) names.push_back(row.name);
  journal.check_rows(names);
  KvGridJournal hooks;
  hooks.kept = [&journal, &progress](const KvGridRow& row) -> std::optional<PerplexityResult> {
    const nlohmann::json* kept = journal.kept_row(row.name);
    if (!kept) return std::nullopt;
    const std::string what = "row '" + row.name + "'";
    const auto [keys, values, selector] = journal.read(*kept, what, [](const nlohmann::json& r) {
      return std::tuple{r.at("key_codec").get<std::string>(),
                        r.at("value_codec").get<std::string>(),
                        r.at("selector").get<std::string>()};
    });
    require(keys == row.key_codec.text() && values == row.value_codec.text() &&
                selector == row.selector.text,
            "--resume ", journal.path().string(), ": ", what, " there has keys ", keys, ", values ",
            values, ", selector ", selector, "; this run's has keys ", row.key_codec.text(),
            ", values ", row.value_codec.text(), ", selector ", row.selector.text,
            " (the grid was built with other settings)");
    progress.kept(row.name);
    return journal.read(*kept, what, kv_grid_run_from_json);
  };
  hooks.finished = [&journal, &progress, rows = grid.size(),
                    document = std::move(document)](const std::vector<KvGridResult>& results) {
    progress.finish();
    journal.save(document(results), results.size() == rows);
  };
  return hooks;
}

KvGridProgress kv_grid_progress(RowProgress& progress) {
  return [&progress](int64_t, int64_t, const KvGridRow& row, int64_t done, int64_t total) {
    progress.update(row.name, done, total, "tokens");
  };
}

}  // namespace visikv::cli

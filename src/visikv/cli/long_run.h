// What every evaluation command shares for long runs: the --json, --resume and --quiet flags,
// the row journal they open (eval/row_journal.h), and progress on stderr.
#pragma once

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "visikv/eval/kv_grid.h"
#include "visikv/eval/row_journal.h"

namespace visikv::cli {

struct RunOutputFlags {
  std::string json, resume;
  bool quiet = false;
};

// Adds --json F, --resume F and --quiet; `what` says what the JSON holds.
void add_run_output_options(CLI::App& cmd, RunOutputFlags& flags, const std::string& what);

// The journal of a command's rows, written to --json or --resume (the same file when both are
// given) and read back with --resume. `parameters`: what the rows' figures depend on; the weight
// kernels are added (an AVX2 and an AVX-512 machine may differ in the last bits).
RowJournal open_row_journal(const RunOutputFlags& flags, std::string command,
                            nlohmann::json parameters, RowLayout layout = {});

// Progress of a command's rows on stderr, never stdout (the table): a line for each row kept
// from the resumed file; while a row runs, its count, rate and the ETA of the whole command
// (redrawn in place on a terminal, otherwise a line at each tenth of the row); a line when it
// ends. The ETA takes the rows still to run to cost what the rows run so far cost on average.
// Silent with --quiet.
class RowProgress {
 public:
  RowProgress(int64_t rows, bool quiet);

  void kept(const std::string& name);
  // Row `name` starts (its clock with it); update() with a new name also starts one.
  void start(const std::string& name);
  // Row `name` has done `done` of `total` units ("tokens", "samples", ...); a new name starts
  // the next row.
  void update(const std::string& name, int64_t done, int64_t total, const std::string& unit);
  // The current row has ended.
  void finish();
  // A line about the command (not a row), e.g. a reference computed first.
  void note(const std::string& line);

 private:
  using Clock = std::chrono::steady_clock;
  std::string eta(double row_fraction) const;
  void print(const std::string& line, bool final);

  int64_t rows_, index_ = 0, run_rows_ = 0, last_tenth_ = -1;
  bool quiet_, terminal_, row_open_ = false;
  std::string name_;
  Clock::time_point first_start_{}, row_start_{}, last_draw_{};
};

// The journal hooks of a decode-perplexity grid (`eval kv`, `eval sparse-ppl`): a run is kept
// when the resumed file has its first row with the same key codec, value codec and selector
// (a row of that name with other codecs is refused: the grid was built with other settings);
// after each run the file is saved with `document` of the rows so far, complete when all
// `rows` are in. Kept and finished runs are reported to `progress`. Throws visikv::Error when
// the resumed file holds a row that `rows` lacks.
KvGridJournal kv_grid_journal(
    const RowJournal& journal, RowProgress& progress, const std::vector<KvGridRow>& rows,
    std::function<nlohmann::json(const std::vector<KvGridResult>&)> document);

// RowProgress for run_kv_grid: its progress callback.
KvGridProgress kv_grid_progress(RowProgress& progress);

}  // namespace visikv::cli

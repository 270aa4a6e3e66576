// The JSON file of a long evaluation, kept up to date row by row and read back by `--resume`.
//
// An evaluation is a list of rows (a grid row, a selector, a key spec) that may each take
// minutes. Its JSON document holds, besides the rows, "command", "parameters" (everything the
// rows' figures depend on: model, text, sizes, codecs, the weight kernels) and "complete" (false
// until the last row is in). The command saves the whole document after every row; each save
// replaces the file atomically (write_json_file), so a run killed at any moment leaves the
// document of the rows finished before it, and loses at most the row in progress.
//
// Resuming reads that document back: its rows are kept and not run again. A document written by
// another command or with other parameters is refused, naming every parameter that differs:
// rows measured under different settings must not end up in one table. A command whose rows
// carry their own settings (a grid row's codecs) checks those too when it takes a row.
#pragma once

#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "visikv/core/error.h"

namespace visikv {

// Where the rows sit in a document: the array's field and the field that names a row. A command
// of one row (ppl) leaves `rows` empty: the document is its row, kept when complete.
struct RowLayout {
  std::string rows = "rows";
  std::string key = "name";
};

class RowJournal {
 public:
  // `path` empty: nothing is read or written. With `resume`, the document at `path` is read when
  // the file exists (a missing file starts from the first row). Throws visikv::Error naming the
  // file when it is not such a document, holds another command's results, was written with other
  // parameters, or names a row twice.
  RowJournal(std::filesystem::path path, bool resume, std::string command,
             nlohmann::json parameters, RowLayout layout = {});

  const std::filesystem::path& path() const { return path_; }
  // Whether a document was read back, and whether it held every row of its run.
  bool resumed() const { return !kept_.is_null(); }
  bool kept_complete() const { return resumed() && kept_.at("complete").get<bool>(); }
  // The document read back (null when none).
  const nlohmann::json& kept_document() const { return kept_; }

  // Throws visikv::Error naming the kept rows whose keys are not among `keys` (the rows this run
  // makes): a resumed run rewrites the file with its own rows, and must not drop others.
  void check_rows(const std::vector<std::string>& keys) const;

  // The kept row named `key`, or nullptr.
  const nlohmann::json* kept_row(const std::string& key) const;

  // Reads a kept document or row with `parse`; what does not parse (a field missing or of the
  // wrong type) is a visikv::Error naming the file and `what`.
  template <typename Parse>
  auto read(const nlohmann::json& value, const std::string& what, Parse parse) const {
    try {
      return parse(value);
    } catch (const nlohmann::json::exception& e) {
      fail("--resume ", path_.string(), ": ", what, " does not read back: ", e.what());
    }
  }

  // Writes `document` with "command", "parameters" and "complete" set, indented by `indent`; no
  // file: nothing.
  void save(nlohmann::json document, bool complete, int indent = 2) const;

 private:
  std::filesystem::path path_;
  std::string command_;
  nlohmann::json parameters_, kept_;
  RowLayout layout_;
};

}  // namespace visikv

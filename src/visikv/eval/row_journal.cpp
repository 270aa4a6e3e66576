#include "visikv/eval/row_journal.h"

#include <set>
#include <system_error>
#include <utility>

#include "visikv/eval/report.h"
#include "visikv/formats/json_file.h"

namespace visikv {

namespace {

std::string shown(const nlohmann::json& object, const std::string& key) {
  return object.contains(key) ? object.at(key).dump() : "nothing";
}

// Every top-level field whose value differs between the file's parameters and this run's, as
// "key: F in the file, R in this run; ..."; empty when they agree.
std::string differences(const nlohmann::json& file, const nlohmann::json& run) {
  std::set<std::string> keys;
  for (const auto& [key, value] : file.items()) keys.insert(key);
  for (const auto& [key, value] : run.items()) keys.insert(key);
  std::string out;
  for (const std::string& key : keys)
    if (!file.contains(key) || !run.contains(key) || file.at(key) != run.at(key))
      out += str_cat(out.empty() ? "" : "; ", key, ": ", shown(file, key), " in the file, ",
                     shown(run, key), " in this run");
  return out;
}

}  // namespace

RowJournal::RowJournal(std::filesystem::path path, bool resume, std::string command,
                       nlohmann::json parameters, RowLayout layout)
    : path_(std::move(path)),
      command_(std::move(command)),
      parameters_(std::move(parameters)),
      layout_(std::move(layout)) {
  require(parameters_.is_object(), "row journal: parameters must be a JSON object");
  std::error_code error;
  if (!resume || path_.empty() || !std::filesystem::exists(path_, error)) return;
  const std::string file = path_.string();
  nlohmann::json document = read_json_file(path_);
  const bool has_rows = !layout_.rows.empty();
  require(document.is_object() && document.contains("command") && document.contains("parameters") &&
              document.contains("complete") && (!has_rows || document.contains(layout_.rows)),
          "--resume ", file,
          ": not a visikv results file (a JSON object with \"command\", "
          "\"parameters\", \"complete\"",
          has_rows ? " and \"" + layout_.rows + "\"" : "", ")");
  require(document.at("command") == command_, "--resume ", file, ": holds the results of `",
          document.at("command").is_string() ? document.at("command").get<std::string>()
                                             : document.at("command").dump(),
          "`, not `", command_, "`");
  require(document.at("complete").is_boolean() && document.at("parameters").is_object() &&
              (!has_rows || document.at(layout_.rows).is_array()),
          "--resume ", file, ": \"complete\" must be true or false, \"parameters\" an object",
          has_rows ? " and \"" + layout_.rows + "\" an array" : "");
  if (const std::string d = differences(document.at("parameters"), parameters_); !d.empty())
    fail("--resume ", file, ": written with other parameters (", d,
         "); rows measured with other parameters are not mixed: give the same parameters or "
         "another file");
  std::set<std::string> names;
  for (const nlohmann::json& row : has_rows ? document.at(layout_.rows) : nlohmann::json::array()) {
    require(row.is_object() && row.contains(layout_.key) && row.at(layout_.key).is_string(),
            "--resume ", file, ": a row of \"", layout_.rows, "\" has no \"", layout_.key,
            "\" naming it");
    require(names.insert(row.at(layout_.key).get<std::string>()).second, "--resume ", file,
            ": row '", row.at(layout_.key).get<std::string>(), "' appears twice");
  }
  kept_ = std::move(document);
}

void RowJournal::check_rows(const std::vector<std::string>& keys) const {
  if (kept_.is_null() || layout_.rows.empty()) return;
  const std::set<std::string> made(keys.begin(), keys.end());
  std::string extra;
  for (const nlohmann::json& row : kept_.at(layout_.rows))
    if (!made.count(row.at(layout_.key).get<std::string>()))
      extra += str_cat(extra.empty() ? "" : ", ", row.at(layout_.key).get<std::string>());
  require(extra.empty(), "--resume ", path_.string(), ": holds rows this run does not make (",
          extra,
          "); a resumed run rewrites the file with its own rows, so give the rows of the "
          "first run (or write to another file)");
}

const nlohmann::json* RowJournal::kept_row(const std::string& key) const {
  if (kept_.is_null() || layout_.rows.empty()) return nullptr;
  for (const nlohmann::json& row : kept_.at(layout_.rows))
    if (row.at(layout_.key) == key) return &row;
  return nullptr;
}

void RowJournal::save(nlohmann::json document, bool complete, int indent) const {
  if (path_.empty()) return;
  document["command"] = command_;
  document["parameters"] = parameters_;
  document["complete"] = complete;
  write_json_file(path_, document, indent);
}

}  // namespace visikv

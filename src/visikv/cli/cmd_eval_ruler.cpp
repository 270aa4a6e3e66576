// `visikv eval ruler`: the RULER-style long-context retrieval suite (eval/ruler.h) over dense
// attention, sparse selectors and key/value cache codecs.
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "visikv/cli/commands.h"
#include "visikv/cli/long_run.h"
#include "visikv/core/error.h"
#include "visikv/eval/kv_grid.h"
#include "visikv/eval/ruler.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/model.h"

namespace visikv::cli {

namespace {

using nlohmann::json;

struct RulerFlags {
  std::string model, text;
  std::vector<int64_t> lengths;
  std::vector<std::string> tasks, selectors, kv;
  int64_t samples = 4, answer_tokens = 0;
  uint64_t seed = 1;
  bool allow_past_context = false;
  RunOutputFlags output;
};

// A --kv entry: "KEYS/VALUES", or one spec for both sides. Key specs never hold a '/' (only a
// value bit policy does, "a2:int2/int4:..."), so the first '/' separates the sides.
RulerConfig codec_config(const std::string& entry) {
  const size_t slash = entry.find('/');
  const std::string keys = slash == std::string::npos ? entry : entry.substr(0, slash);
  const std::string values = slash == std::string::npos ? entry : entry.substr(slash + 1);
  RulerConfig c;
  c.key_codec = parse_flag("--kv", keys, parse_key_codec_spec);
  c.value_codec = parse_flag("--kv", values, parse_value_codec_spec);
  c.name = c.key_codec.text() + "/" + c.value_codec.text();  // canonical: one name per cache
  return c;
}

// The default codec rows: keys and values at 2, 3 and 4 bits in per-token groups of 32 channels
// (fewer where the head dimension needs it), every vector quantized when written, no
// full-precision window: the plainest cache at each width, a floor for the better codecs.
std::vector<std::string> default_kv(int64_t head_dim) {
  const std::string group = std::to_string(token_group(head_dim, 32));
  std::vector<std::string> out;
  for (int bits : {2, 3, 4}) out.push_back(str_cat("int", bits, ":g", group, ":tok"));
  return out;
}

struct RulerRun {
  std::string model, text;
  RulerOptions options;
  std::vector<RulerConfig> configs;
  std::vector<RulerRow> rows;
};

json ruler_parameters(const RulerRun& run) {
  const RulerOptions& o = run.options;
  json tasks = json::array(), answers = json::object();
  for (RulerTask t : o.tasks) {
    tasks.push_back(ruler_task_name(t));
    answers[ruler_task_name(t)] = ruler_answer_tokens(o, t);
  }
  return {{"model", run.model},
          {"text", run.text},
          {"lengths", o.lengths},
          {"tasks", tasks},
          {"samples", o.samples},
          {"seed", o.seed},
          {"answer_tokens", answers},
          {"shape",
           {{"multi", o.multi},
            {"vt_hops", o.vt_hops},
            {"cwe_words", o.cwe_words},
            {"cwe_common", o.cwe_common},
            {"cwe_uncommon", o.cwe_uncommon}}}};
}

json nan_to_null(double x) { return std::isnan(x) ? json(nullptr) : json(x); }

json ruler_json(const RulerRun& run) {
  json out = ruler_parameters(run);
  out["rows"] = json::array();
  for (const RulerRow& r : run.rows) {
    json cells = json::array(), samples = json::array();
    for (RulerTask t : run.options.tasks)
      for (int64_t length : run.options.lengths)
        cells.push_back({{"task", ruler_task_name(t)},
                         {"length", length},
                         {"score", nan_to_null(ruler_mean(r, t, length))}});
    for (const RulerResult& x : r.results)
      samples.push_back({{"task", ruler_task_name(x.task)},
                         {"length", x.length},
                         {"expected", x.expected},
                         {"answer", x.answer},
                         {"score", x.score}});
    out["rows"].push_back({{"name", r.name},
                           {"keys", r.key_codec},
                           {"values", r.value_codec},
                           {"selector", r.selector},
                           {"score", nan_to_null(ruler_mean(r, std::nullopt, std::nullopt))},
                           {"seconds", r.seconds},
                           {"cells", cells},
                           {"samples", samples}});
  }
  return out;
}

// The row ruler_json wrote (--resume); the cells are derived from the samples again.
RulerRow ruler_row_from_json(const json& j) {
  RulerRow r;
  r.name = j.at("name").get<std::string>();
  r.key_codec = j.at("keys").get<std::string>();
  r.value_codec = j.at("values").get<std::string>();
  r.selector = j.at("selector").get<std::string>();
  r.seconds = j.at("seconds").get<double>();
  for (const json& s : j.at("samples"))
    r.results.push_back({parse_ruler_task(s.at("task").get<std::string>()),
                         s.at("length").get<int64_t>(),
                         s.at("expected").get<std::vector<std::string>>(),
                         s.at("answer").get<std::string>(), s.at("score").get<double>()});
  return r;
}

RulerRun run_eval_ruler(const RulerFlags& f) {
  RulerRun run;
  RulerOptions& o = run.options;
  if (!f.lengths.empty()) o.lengths = f.lengths;
  if (!f.tasks.empty()) {
    o.tasks.clear();
    for (const std::string& t : f.tasks)
      o.tasks.push_back(parse_flag("--tasks", t, parse_ruler_task));
  }
  o.samples = f.samples;
  o.seed = f.seed;
  o.answer_tokens = f.answer_tokens;
  o.past_context = f.allow_past_context ? PastContext::Allow : PastContext::Offer;

  const Model model = Model::load(f.model);
  run.model = model.source();
  Decoder decoder(model);
  if (const auto warning = check_ruler_options(model.config(), o))
    std::fprintf(stderr, "%s\n", warning->c_str());

  // The rows: dense, each selector (f32 cache), each codec pair (dense attention). "none" leaves
  // a kind of row out.
  run.configs.push_back({"dense", {}, {}, parse_named_selector_spec("dense")});
  const std::vector<std::string>& selectors =
      f.selectors.empty() ? retrieval_selector_grid() : f.selectors;
  for (const std::string& s : selectors) {
    if (s == "none" || s == "dense") continue;
    RulerConfig c;
    c.selector = parse_flag("--selectors", s, parse_named_selector_spec);
    c.name = c.selector.text;
    run.configs.push_back(c);
  }
  const int64_t head_dim = decoder.cache_shape().head_dim;
  for (const std::string& k : f.kv.empty() ? default_kv(head_dim) : f.kv)
    if (k != "none") run.configs.push_back(codec_config(k));
  std::vector<std::string> names;
  for (const RulerConfig& c : run.configs) {
    for (const std::string& n : names)
      require(n != c.name, "eval ruler: row '", n, "' is given twice");
    names.push_back(c.name);
    // Checks the codecs against the model's heads before any model time is spent.
    make_cache(decoder.cache_shape(), c.key_codec, c.value_codec, 1);
  }

  const std::filesystem::path text_path = text_or_default_test_text(f.text);
  run.text = text_path.string();
  int64_t longest = 0;
  for (int64_t l : o.lengths) longest = std::max(longest, l);
  // Twice the longest prompt: room for each sample's haystack offset, and words for cwe.
  const std::vector<int32_t> text_tokens =
      text_file_tokens(model.tokenizer(), text_path, 2 * longest);
  const std::vector<RulerSample> samples = ruler_samples(model.tokenizer(), text_tokens, o);

  const RowJournal journal = open_row_journal(f.output, "eval ruler", ruler_parameters(run));
  journal.check_rows(names);
  RowProgress progress(static_cast<int64_t>(run.configs.size()), f.output.quiet);
  // Every kept row is read back before any row runs, and each save holds all rows present, in
  // row order: a resumed run that adds a row before kept ones (a selector row to a file of codec
  // rows) and is killed during it must not lose the kept rows behind it.
  std::vector<std::optional<RulerRow>> rows(run.configs.size());
  for (size_t i = 0; i < run.configs.size(); ++i) {
    const RulerConfig& c = run.configs[i];
    const json* kept = journal.kept_row(c.name);
    if (!kept) continue;
    rows[i] = journal.read(*kept, "row '" + c.name + "'", ruler_row_from_json);
    // A name fixes the configuration, but a hand-edited file could say otherwise.
    require(rows[i]->key_codec == c.key_codec.text() &&
                rows[i]->value_codec == c.value_codec.text() &&
                rows[i]->selector == c.selector.text,
            "--resume ", journal.path().string(), ": row '", c.name,
            "' was run with other codecs or selector");
    progress.kept(c.name);
  }
  const auto save = [&] {
    run.rows.clear();
    for (const auto& row : rows)
      if (row) run.rows.push_back(*row);
    journal.save(ruler_json(run), run.rows.size() == run.configs.size());
  };
  for (size_t i = 0; i < run.configs.size(); ++i) {
    if (rows[i]) continue;
    const RulerConfig& c = run.configs[i];
    progress.start(c.name);
    const auto on_prompt = [&](int64_t done, int64_t n) {
      progress.update(c.name, done, n, "prompts");
    };
    rows[i] = ruler_row(decoder, samples, c, on_prompt, o.past_context);
    progress.finish();
    save();
  }
  save();  // also when every row was kept: the file is rewritten as it was
  return run;
}

void print_ruler_table(const RulerRun& run) {
  const RulerOptions& o = run.options;
  std::printf("model:   %s\ntext:    %s\n", run.model.c_str(), run.text.c_str());
  std::printf("samples: %lld per task and length, seed %llu; answer tokens:",
              static_cast<long long>(o.samples), static_cast<unsigned long long>(o.seed));
  for (RulerTask t : o.tasks)
    std::printf(" %s %lld", ruler_task_name(t).c_str(),
                static_cast<long long>(ruler_answer_tokens(o, t)));
  std::printf("\n");
  size_t width = 24;
  for (const RulerRow& r : run.rows) width = std::max(width, r.name.size());
  const auto table = [&](const std::string& title, std::optional<int64_t> length) {
    std::printf("\n%-*s", static_cast<int>(width), title.c_str());
    for (RulerTask t : o.tasks) std::printf(" %15s", ruler_task_name(t).c_str());
    std::printf(" %7s\n", "mean");
    for (const RulerRow& r : run.rows) {
      std::printf("%-*s", static_cast<int>(width), r.name.c_str());
      for (RulerTask t : o.tasks) std::printf(" %15.1f", 100 * ruler_mean(r, t, length));
      std::printf(" %7.1f\n", 100 * ruler_mean(r, std::nullopt, length));
    }
  };
  for (int64_t length : o.lengths) table(str_cat("length ", length, " (%)"), length);
  if (o.lengths.size() > 1) table("all lengths (%)", std::nullopt);
  std::printf(
      "\nScore: the share of expected strings found in the greedy answer (RULER's "
      "string_match_all), in %%, averaged over samples. A length is the prompt plus its answer "
      "tokens. Selector rows keep f32 keys and values; codec rows (keys/values) attend densely.\n");
}

}  // namespace

void add_eval_ruler_command(CLI::App& eval) {
  auto flags = std::make_shared<RulerFlags>();
  CLI::App* cmd = eval.add_subcommand(
      "ruler",
      "RULER-style long-context retrieval (needles, variable tracking, common words): accuracy "
      "per task and length for dense attention, selectors and cache codecs");
  cmd->add_option("model", flags->model, "Hugging Face directory, .gguf file, or 'default'")
      ->required();
  cmd->add_option("--lengths", flags->lengths,
                  "comma-separated lengths in tokens, prompt + answer (default "
                  "4096,8192,16384,32768)")
      ->delimiter(',');
  cmd->add_option("--tasks", flags->tasks,
                  "comma-separated tasks (default all: niah_single, niah_multikey, "
                  "niah_multivalue, niah_multiquery, vt, cwe)")
      ->delimiter(',');
  cmd->add_option("--samples", flags->samples, "prompts per task and length (default 4)");
  cmd->add_option("--seed", flags->seed, "seed of the generated prompts (default 1)");
  cmd->add_option("--answer-tokens", flags->answer_tokens,
                  "greedy answer tokens of every task (default: per task, 16 to 64)");
  cmd->add_option("--selectors", flags->selectors,
                  "comma-separated selector specs (docs/SELECTOR_SPECS.md) run with an f32 cache; "
                  "default: the needle grid; 'none': no selector rows")
      ->delimiter(',');
  cmd->add_option("--kv", flags->kv,
                  "comma-separated cache codecs KEYS/VALUES, or one spec for both "
                  "(docs/CACHE_SPECS.md), run with dense attention; default int2, int3, int4 "
                  "with per-token groups of 32; 'none': no codec rows")
      ->delimiter(',');
  cmd->add_option("--text", flags->text, "haystack text (default: WikiText-103 test)");
  cmd->add_flag("--allow-past-context", flags->allow_past_context,
                "run lengths past the model's context (RoPE models only; a warning on stderr)");
  add_run_output_options(*cmd, flags->output, "the results");
  cmd->callback([flags] {
    apply_global_options();
    // The JSON file is written row by row.
    print_ruler_table(run_eval_ruler(*flags));
  });
}

}  // namespace visikv::cli

// Jinja templates as Hugging Face chat templates use them: a lexer, a parser to a syntax tree and
// an evaluator whose output equals Python jinja2's (3.1) in the environment transformers renders
// chat templates with: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True), the
// loopcontrols extension, no autoescaping, no trailing newline kept, and the globals
// raise_exception, strftime_now, namespace and dict, with tojson replaced by json.dumps
// (ensure_ascii=False, sort_keys=False). Values follow Python: str() of a value is Python's
// (True, None, 1.0, ['a', 1]), strings index and measure by code point, dicts keep insertion order.
//
// Supported subset (docs/CHAT_TEMPLATES.md lists it with the reasons for what is left out):
//   {{ }} {% %} {# #}, whitespace control (- and +), {% raw %};
//   statements: if/elif/else, for (tuple targets, `if` filter, else, loop.index/index0/revindex/
//     revindex0/first/last/length/previtem/nextitem/depth/cycle), break/continue, set (names,
//     tuples, namespace attributes, block set), macro (defaults, caller), call, filter blocks,
//     generation (transformers' tag; renders its body);
//   expressions: literals (strings with Python escapes, ints, floats, true/false/none in either
//     case, lists, tuples, dicts), names, attributes, subscripts and slices, calls with keyword
//     arguments, filters, tests, `x if c else y`, and every operator of Jinja: or and not in
//     `not in` is `is not` == != < <= > >= ~ + - * / // % **;
//   filters: abs attr capitalize count d default dictsort e escape first float indent int items
//     join last length list lower map max min reject rejectattr replace reverse round safe select
//     selectattr sort string sum title tojson trim unique upper wordcount;
//   tests: boolean callable defined divisibleby eq equalto escaped even false float ge gt in
//     integer iterable le lower lt mapping ne none number odd sameas sequence string true
//     undefined upper == != < <= > >=;
//   methods: str strip lstrip rstrip split rsplit splitlines startswith endswith upper lower
//     title capitalize replace format join find count isdigit isalpha isspace; dict items keys
//     values get; list index count;
//   globals: range namespace dict raise_exception strftime_now.
// Undefined values behave like jinja2's default Undefined: they print as nothing, are false and
// empty, and only their attributes, items, arithmetic, ordering and calls are errors.
//
// Every failure (syntax, unknown filter, a type error, raise_exception, a limit) is a
// visikv::Error whose message names the line and column of the template it concerns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace visikv::jinja {

// Bounds on what a template may make the renderer do. Chat templates are a few KiB and render a
// conversation in well under a million steps; the limits turn a hostile or broken template into
// an error instead of unbounded time, memory or recursion.
struct Limits {
  size_t max_template_bytes = size_t{1} << 20;
  // Nesting of blocks and of expressions while parsing; of macro calls and of values (lists in
  // lists) while rendering.
  int max_depth = 128;
  // Loop iterations of one render, all loops together (range() counts its elements).
  int64_t max_iterations = 1'000'000;
  // Bytes of output, and bytes of any one string or elements of any one list a template builds.
  size_t max_output_bytes = size_t{16} << 20;
};

struct Program;

class Template {
 public:
  // Throws visikv::Error naming line and column for a syntax error, a name that is not a
  // statement, an unclosed block, a source that is not UTF-8 or one over the limits.
  static Template parse(std::string_view source, const Limits& limits = {});

  // `variables` (a JSON object) are the template's names; their key order is kept, as Python's
  // dicts keep it, since tojson prints keys in that order.
  std::string render(const nlohmann::ordered_json& variables) const;

 private:
  explicit Template(std::shared_ptr<const Program> program);
  std::shared_ptr<const Program> program_;
};

}  // namespace visikv::jinja

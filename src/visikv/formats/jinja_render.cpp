// The evaluator: walks a Program over the variables of one render, with jinja2's scoping (a for
// loop's body gets a fresh scope each iteration; macros see the template's top level and their
// arguments; `set` writes to the innermost scope) and its filters, tests and methods.
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <ctime>
#include <initializer_list>
#include <unordered_map>

#include "visikv/formats/jinja.h"
#include "visikv/formats/jinja_ast.h"

namespace visikv::jinja {

namespace {

using Frame = std::vector<std::pair<std::string, Value>>;
using Scopes = std::vector<std::shared_ptr<Frame>>;

const Value* find_in(const Frame& frame, std::string_view name) {
  for (const auto& [key, value] : frame)
    if (key == name) return &value;
  return nullptr;
}

void assign(Frame& frame, const std::string& name, Value value) {
  for (auto& [key, old] : frame)
    if (key == name) {
      old = std::move(value);
      return;
    }
  frame.emplace_back(name, std::move(value));
}

[[noreturn]] void fail_undefined(const Value& value, Pos pos) {
  fail_at(pos, value.as<Undefined>()->hint);
}

std::optional<int64_t> integer_of(const Value& v) {
  if (const auto* b = v.as<bool>()) return *b ? 1 : 0;
  if (const auto* i = v.as<int64_t>()) return *i;
  return std::nullopt;
}

double double_of(const Value& v) {
  if (const auto i = integer_of(v)) return static_cast<double>(*i);
  return *v.as<double>();
}

// Parameters of a builtin bound from a call's arguments, Python-style.
std::vector<std::optional<Value>> bind(const CallArgs& args,
                                       std::initializer_list<std::string_view> names,
                                       std::string_view what, Pos pos) {
  std::vector<std::optional<Value>> bound(names.size());
  if (args.positional.size() > names.size())
    fail_at(pos, what, "() takes at most ", names.size(), " arguments (", args.positional.size(),
            " given)");
  for (size_t k = 0; k < args.positional.size(); ++k) bound[k] = args.positional[k];
  for (const auto& [key, value] : args.keyword) {
    const auto it = std::find(names.begin(), names.end(), key);
    if (it == names.end()) fail_at(pos, what, "() got an unexpected keyword argument '", key, "'");
    bound[static_cast<size_t>(it - names.begin())] = value;
  }
  return bound;
}

const std::string& require_string(const Value& v, std::string_view what, Pos pos) {
  if (v.is_undefined()) fail_undefined(v, pos);
  const auto* s = v.as<std::string>();
  if (!s) fail_at(pos, what, ": expected a string, got ", type_name(v));
  return *s;
}

int64_t require_int(const Value& v, std::string_view what, Pos pos) {
  if (v.is_undefined()) fail_undefined(v, pos);
  const auto i = integer_of(v);
  if (!i) fail_at(pos, what, ": expected an integer, got ", type_name(v));
  return *i;
}

// --- strings by code point -----------------------------------------------------------------

std::string map_case(std::string_view text, bool upper) {
  std::string out;
  out.reserve(text.size());
  size_t at = 0;
  while (at < text.size()) {
    const char32_t c = decode_utf8(text, at);
    const auto mapped = upper ? utf8proc_toupper(static_cast<utf8proc_int32_t>(c))
                              : utf8proc_tolower(static_cast<utf8proc_int32_t>(c));
    append_utf8(out, static_cast<char32_t>(mapped));
  }
  return out;
}

bool is_alpha(char32_t c) {
  const auto category = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return category >= UTF8PROC_CATEGORY_LU && category <= UTF8PROC_CATEGORY_LO;
}

bool is_digit(char32_t c) {
  return utf8proc_category(static_cast<utf8proc_int32_t>(c)) == UTF8PROC_CATEGORY_ND;
}

// Python's str.title(): a letter after a non-letter starts a word.
std::string python_title(std::string_view text) {
  std::string out;
  bool previous_cased = false;
  size_t at = 0;
  while (at < text.size()) {
    const size_t start = at;
    const char32_t c = decode_utf8(text, at);
    const bool letter = is_alpha(c);
    out += map_case(text.substr(start, at - start), !previous_cased);
    previous_cased = letter;
  }
  return out;
}

// jinja2's title filter: words start after '-', whitespace, or one of ({[<.
std::string jinja_title(std::string_view text) {
  std::string out;
  bool word_start = true;
  size_t at = 0;
  while (at < text.size()) {
    const size_t start = at;
    const char32_t c = decode_utf8(text, at);
    const bool separator =
        python_isspace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    out += map_case(text.substr(start, at - start), word_start && !separator);
    word_start = separator;
  }
  return out;
}

std::string capitalize(std::string_view text) {
  if (text.empty()) return "";
  size_t at = 0;
  decode_utf8(text, at);
  return map_case(text.substr(0, at), true) + map_case(text.substr(at), false);
}

bool in_chars(char32_t c, const std::optional<std::string>& chars) {
  if (!chars) return python_isspace(c);
  size_t at = 0;
  while (at < chars->size())
    if (decode_utf8(*chars, at) == c) return true;
  return false;
}

std::string strip(std::string_view text, const std::optional<std::string>& chars, bool left,
                  bool right) {
  const std::vector<std::string> points = code_points(text);
  size_t begin = 0, end = points.size();
  const auto stripped = [&](size_t k) {
    size_t at = 0;
    return in_chars(decode_utf8(points[k], at), chars);
  };
  if (left)
    while (begin < end && stripped(begin)) ++begin;
  if (right)
    while (end > begin && stripped(end - 1)) --end;
  std::string out;
  for (size_t k = begin; k < end; ++k) out += points[k];
  return out;
}

std::string replace_all(std::string_view text, std::string_view old, std::string_view with,
                        int64_t count, size_t limit, Pos pos) {
  std::string out;
  int64_t done = 0;
  if (old.empty()) {
    // Python inserts `with` before every code point and at the end.
    const auto points = code_points(text);
    for (const auto& point : points) {
      if (count < 0 || done < count) {
        out += with;
        ++done;
      }
      out += point;
    }
    if (count < 0 || done < count) out += with;
  } else {
    size_t at = 0;
    while (true) {
      const size_t found = text.find(old, at);
      if (found == std::string_view::npos || (count >= 0 && done >= count)) break;
      out.append(text.substr(at, found - at));
      out.append(with);
      at = found + old.size();
      ++done;
      if (out.size() > limit) break;
    }
    out.append(text.substr(at));
  }
  if (out.size() > limit)
    fail_at(pos, "replace: the result is over the size limit of ", limit, " bytes");
  return out;
}

std::vector<std::string> python_split(std::string_view text, const std::optional<std::string>& sep,
                                      int64_t max_split, bool from_right) {
  std::vector<std::string> parts;
  if (sep) {
    if (sep->empty()) fail("split: empty separator");
    if (!from_right) {
      size_t at = 0;
      while (max_split < 0 || static_cast<int64_t>(parts.size()) < max_split) {
        const size_t found = text.find(*sep, at);
        if (found == std::string_view::npos) break;
        parts.emplace_back(text.substr(at, found - at));
        at = found + sep->size();
      }
      parts.emplace_back(text.substr(at));
    } else {
      size_t end = text.size();
      while (max_split < 0 || static_cast<int64_t>(parts.size()) < max_split) {
        if (end < sep->size()) break;
        const size_t found = text.rfind(*sep, end - sep->size());
        if (found == std::string_view::npos) break;
        parts.emplace_back(text.substr(found + sep->size(), end - found - sep->size()));
        end = found;
      }
      parts.emplace_back(text.substr(0, end));
      std::reverse(parts.begin(), parts.end());
    }
    return parts;
  }
  // Runs of whitespace separate; leading and trailing whitespace give no empty parts.
  const auto points = code_points(text);
  const auto space = [&](size_t k) {
    size_t at = 0;
    return python_isspace(decode_utf8(points[k], at));
  };
  if (!from_right) {
    size_t k = 0;
    while (true) {
      while (k < points.size() && space(k)) ++k;
      if (k == points.size()) break;
      std::string part;
      if (max_split >= 0 && static_cast<int64_t>(parts.size()) == max_split) {
        size_t end = points.size();
        while (end > k && space(end - 1)) --end;
        for (; k < end; ++k) part += points[k];
        parts.push_back(std::move(part));
        break;
      }
      while (k < points.size() && !space(k)) part += points[k++];
      parts.push_back(std::move(part));
    }
  } else {
    size_t k = points.size();
    while (true) {
      while (k > 0 && space(k - 1)) --k;
      if (k == 0) break;
      std::string part;
      if (max_split >= 0 && static_cast<int64_t>(parts.size()) == max_split) {
        size_t begin = 0;
        while (begin < k && space(begin)) ++begin;
        for (size_t j = begin; j < k; ++j) part += points[j];
        parts.push_back(std::move(part));
        break;
      }
      size_t begin = k;
      while (begin > 0 && !space(begin - 1)) --begin;
      for (size_t j = begin; j < k; ++j) part += points[j];
      parts.push_back(std::move(part));
      k = begin;
    }
    std::reverse(parts.begin(), parts.end());
  }
  return parts;
}

// str.splitlines(): the line boundaries Python knows, separators dropped.
std::vector<std::string> split_lines(std::string_view text) {
  std::vector<std::string> lines;
  std::string line;
  size_t at = 0;
  bool pending = false;
  while (at < text.size()) {
    const size_t start = at;
    const char32_t c = decode_utf8(text, at);
    const bool boundary = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C ||
                          c == 0x1D || c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!boundary) {
      line.append(text.substr(start, at - start));
      pending = true;
      continue;
    }
    if (c == '\r' && at < text.size() && text[at] == '\n') ++at;
    lines.push_back(std::move(line));
    line.clear();
    pending = false;
  }
  if (pending) lines.push_back(std::move(line));
  return lines;
}

std::string html_escape(std::string_view text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Python's slice indices for a sequence of `length` items.
std::vector<size_t> slice_indices(int64_t length, const std::optional<int64_t>& start_arg,
                                  const std::optional<int64_t>& stop_arg,
                                  const std::optional<int64_t>& step_arg, Pos pos) {
  const int64_t step = step_arg.value_or(1);
  if (step == 0) fail_at(pos, "slice step cannot be zero");
  const auto clamp = [&](std::optional<int64_t> value, int64_t low_default, int64_t high_default) {
    if (!value) return step > 0 ? low_default : high_default;
    int64_t v = *value;
    if (v < 0) v += length;
    if (step > 0) return std::clamp<int64_t>(v, 0, length);
    return std::clamp<int64_t>(v, -1, length - 1);
  };
  const int64_t start = clamp(start_arg, 0, length - 1);
  const int64_t stop = clamp(stop_arg, length, -1);
  std::vector<size_t> out;
  for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step)
    out.push_back(static_cast<size_t>(k));
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

class Renderer {
 public:
  Renderer(const Program& program, const nlohmann::ordered_json& variables)
      : limits_(program.limits), program_(program) {
    if (!variables.is_object()) fail("template variables must be a JSON object");
    auto context = std::make_shared<Frame>();
    for (const auto& [key, value] : variables.items())
      context->emplace_back(key, from_json(value, limits_.max_depth));
    scopes_ = {context, std::make_shared<Frame>()};
  }

  std::string run() {
    std::string out;
    out_ = &out;
    exec(program_.body);
    return out;
  }

  const Limits& limits() const { return limits_; }

  // A string or list the template builds must stay within the size limit.
  void check_size(size_t size, Pos pos, std::string_view what) const {
    if (size > limits_.max_output_bytes)
      fail_at(pos, what, " is over the size limit of ", limits_.max_output_bytes);
  }

  void count_iterations(int64_t count, Pos pos) {
    iterations_ += count;
    if (iterations_ > limits_.max_iterations)
      fail_at(pos, "the template ran more than ", limits_.max_iterations, " loop iterations");
  }

  Value eval(const Expr& expr);
  Value call_value(const Value& callee, CallArgs& args, Pos pos);
  Value apply_filter(const std::string& name, Value operand, CallArgs& args, Pos pos);
  bool apply_test(const std::string& name, const Value& operand, CallArgs& args, Pos pos);
  Value get_attribute(const Value& object, const std::string& name, Pos pos);
  Value get_item(const Value& object, const Value& key, Pos pos);
  std::vector<Value> iterate(const Value& value, Pos pos);

 private:
  enum class Flow { Normal, Break, Continue };

  class Nesting {
   public:
    Nesting(Renderer& renderer, Pos pos) : renderer_(renderer) {
      if (++renderer_.depth_ > renderer_.limits_.max_depth)
        fail_at(pos, "calls nest deeper than ", renderer_.limits_.max_depth, " levels");
    }
    ~Nesting() { --renderer_.depth_; }
    Nesting(const Nesting&) = delete;
    Nesting& operator=(const Nesting&) = delete;

   private:
    Renderer& renderer_;
  };

  void emit(std::string_view text, Pos pos) {
    if (out_->size() + text.size() > limits_.max_output_bytes)
      fail_at(pos, "the output is over the size limit of ", limits_.max_output_bytes, " bytes");
    out_->append(text);
  }

  // Renders `body` into a string of its own.
  std::string capture(const Body& body) {
    std::string text;
    std::string* saved = std::exchange(out_, &text);
    try {
      exec(body);
    } catch (...) {
      out_ = saved;
      throw;
    }
    out_ = saved;
    return text;
  }

  Value lookup(const std::string& name);
  Value builtin(const std::string& name);
  Value binary(const Expr& expr);
  Value make_macro(const Stmt& stmt);
  void assign_targets(const std::vector<Target>& targets, const Value& value, Pos pos);
  Flow exec(const Body& body);
  Flow exec_for(const Stmt& stmt);
  CallArgs eval_args(const Expr& expr, size_t first);
  Value call_method(const Value& object, const std::string& name, CallArgs& args, Pos pos);

  const Limits limits_;
  const Program& program_;
  Scopes scopes_;
  std::string* out_ = nullptr;
  int64_t iterations_ = 0;
  int depth_ = 0;
};

namespace {

bool is_string_method(std::string_view name) {
  static const std::vector<std::string_view> kNames = {
      "strip",      "lstrip",   "rstrip",  "split",   "rsplit", "splitlines",
      "startswith", "endswith", "upper",   "lower",   "title",  "capitalize",
      "replace",    "format",   "join",    "find",    "count",  "isdigit",
      "isalpha",    "isspace",  "isalnum", "islower", "isupper"};
  return std::find(kNames.begin(), kNames.end(), name) != kNames.end();
}

bool is_dict_method(std::string_view name) {
  return name == "items" || name == "keys" || name == "values" || name == "get";
}

bool is_list_method(std::string_view name) { return name == "index" || name == "count"; }

// Methods that would modify a value: jinja2's immutable sandbox refuses them.
bool is_mutating_method(std::string_view name) {
  static const std::vector<std::string_view> kNames = {"append", "extend",     "insert", "pop",
                                                       "remove", "clear",      "sort",   "reverse",
                                                       "update", "setdefault", "popitem"};
  return std::find(kNames.begin(), kNames.end(), name) != kNames.end();
}

}  // namespace

Value Renderer::get_attribute(const Value& object, const std::string& name, Pos pos) {
  if (object.is_undefined()) fail_undefined(object, pos);
  const auto bound = [&]() -> Value {
    auto callable = std::make_shared<Callable>();
    callable->name = name;
    callable->call = [object, name](Renderer& renderer, CallArgs& args, Pos at) {
      return renderer.call_method(object, name, args, at);
    };
    return CallablePtr(callable);
  };
  const std::string missing = "'" + type_name(object) + " object' has no attribute '" + name + "'";
  if (const auto* dict = object.as<DictPtr>()) {
    if (!(*dict)->is_namespace && is_dict_method(name)) return bound();
    if (const Value* found = (*dict)->find(name)) return *found;
    if (!(*dict)->is_namespace && is_mutating_method(name)) return bound();
    return Undefined{missing};
  }
  if (object.is_string() && is_string_method(name)) return bound();
  if (const auto* list = object.as<ListPtr>();
      list && (is_list_method(name) || is_mutating_method(name)))
    return bound();
  return Undefined{missing};
}

Value Renderer::get_item(const Value& object, const Value& key, Pos pos) {
  if (object.is_undefined()) fail_undefined(object, pos);
  if (const auto* dict = object.as<DictPtr>()) {
    if (const auto* name = key.as<std::string>()) {
      if (const Value* found = (*dict)->find(*name)) return *found;
      return get_attribute(object, *name, pos);
    }
    return Undefined{"'dict object' has no attribute " + repr(key, limits_.max_depth)};
  }
  const auto index = integer_of(key);
  if (const auto* list = object.as<ListPtr>(); list && index) {
    const auto size = static_cast<int64_t>((*list)->items.size());
    const int64_t at = *index < 0 ? *index + size : *index;
    if (at < 0 || at >= size)
      return Undefined{"'" + type_name(object) + " object' has no element " +
                       std::to_string(*index)};
    return (*list)->items[static_cast<size_t>(at)];
  }
  if (const auto* text = object.as<std::string>(); text && index) {
    const auto points = code_points(*text);
    const auto size = static_cast<int64_t>(points.size());
    const int64_t at = *index < 0 ? *index + size : *index;
    if (at < 0 || at >= size)
      return Undefined{"'str object' has no element " + std::to_string(*index)};
    return points[static_cast<size_t>(at)];
  }
  if (const auto* name = key.as<std::string>()) return get_attribute(object, *name, pos);
  return Undefined{"'" + type_name(object) + " object' has no element " +
                   repr(key, limits_.max_depth)};
}

std::vector<Value> Renderer::iterate(const Value& value, Pos pos) {
  if (value.is_undefined()) return {};
  if (const auto* list = value.as<ListPtr>()) return (*list)->items;
  if (const auto* dict = value.as<DictPtr>()) {
    if ((*dict)->is_namespace) fail_at(pos, "'Namespace' object is not iterable");
    std::vector<Value> keys;
    for (const auto& entry : (*dict)->entries) keys.emplace_back(entry.first);
    return keys;
  }
  if (const auto* text = value.as<std::string>()) {
    std::vector<Value> out;
    for (auto& point : code_points(*text)) out.emplace_back(std::move(point));
    return out;
  }
  fail_at(pos, "'", type_name(value), "' object is not iterable");
}

namespace {

int64_t length_of(const Value& value, Pos pos) {
  if (value.is_undefined()) return 0;
  if (const auto* text = value.as<std::string>())
    return static_cast<int64_t>(code_point_count(*text));
  if (const auto* list = value.as<ListPtr>()) return static_cast<int64_t>((*list)->items.size());
  if (const auto* dict = value.as<DictPtr>(); dict && !(*dict)->is_namespace)
    return static_cast<int64_t>((*dict)->entries.size());
  fail_at(pos, "object of type '", type_name(value), "' has no len()");
}

bool contains(Renderer& renderer, const Value& container, const Value& item, Pos pos) {
  if (const auto* text = container.as<std::string>()) {
    if (item.is_undefined()) fail_undefined(item, pos);
    const auto* needle = item.as<std::string>();
    if (!needle)
      fail_at(pos, "'in <string>' requires string as left operand, not ", type_name(item));
    return text->find(*needle) != std::string::npos;
  }
  if (const auto* dict = container.as<DictPtr>()) {
    const auto* key = item.as<std::string>();
    return key && (*dict)->find(*key) != nullptr;
  }
  if (container.is_undefined()) return false;
  if (!container.as<ListPtr>())
    fail_at(pos, "argument of type '", type_name(container), "' is not iterable");
  for (const Value& element : (*container.as<ListPtr>())->items)
    if (equal(element, item, renderer.limits().max_depth)) return true;
  return false;
}

Value arithmetic(Renderer& renderer, const std::string& op, const Value& a, const Value& b,
                 Pos pos) {
  if (a.is_undefined()) fail_undefined(a, pos);
  if (b.is_undefined()) fail_undefined(b, pos);
  const auto unsupported = [&]() -> Value {
    fail_at(pos, "unsupported operand type(s) for ", op, ": '", type_name(a), "' and '",
            type_name(b), "'");
  };
  const auto ia = integer_of(a), ib = integer_of(b);
  if (a.is_number() && b.is_number()) {
    if (ia && ib) {
      int64_t result = 0;
      bool overflow = false;
      if (op == "+") {
        overflow = __builtin_add_overflow(*ia, *ib, &result);
      } else if (op == "-") {
        overflow = __builtin_sub_overflow(*ia, *ib, &result);
      } else if (op == "*") {
        overflow = __builtin_mul_overflow(*ia, *ib, &result);
      } else if (op == "/") {
        if (*ib == 0) fail_at(pos, "division by zero");
        return static_cast<double>(*ia) / static_cast<double>(*ib);
      } else if (op == "//" || op == "%") {
        if (*ib == 0) fail_at(pos, "integer division or modulo by zero");
        if (*ia == INT64_MIN && *ib == -1) fail_at(pos, "integer overflow in ", op);
        int64_t quotient = *ia / *ib, remainder = *ia % *ib;
        if (remainder != 0 && ((remainder < 0) != (*ib < 0))) {
          --quotient;
          remainder += *ib;
        }
        return op == "//" ? quotient : remainder;
      } else if (op == "**") {
        if (*ib < 0) return std::pow(static_cast<double>(*ia), static_cast<double>(*ib));
        result = 1;
        for (int64_t k = 0; k < *ib && !overflow; ++k) {
          overflow = __builtin_mul_overflow(result, *ia, &result);
          if (result == 0 || result == 1) break;
        }
        if (*ia == -1) result = (*ib % 2 == 0) ? 1 : -1;
      }
      if (overflow) fail_at(pos, "integer overflow in ", op, " (Python would use a big integer)");
      return result;
    }
    const double x = double_of(a), y = double_of(b);
    if (op == "+") return x + y;
    if (op == "-") return x - y;
    if (op == "*") return x * y;
    if (op == "/") {
      if (y == 0) fail_at(pos, "float division by zero");
      return x / y;
    }
    if (op == "//" || op == "%") {
      if (y == 0) fail_at(pos, "float modulo by zero");
      double remainder = std::fmod(x, y);
      if (remainder != 0 && ((remainder < 0) != (y < 0))) remainder += y;
      return op == "//" ? std::floor((x - remainder) / y + 0.5) : remainder;
    }
    return std::pow(x, y);
  }
  const size_t limit = renderer.limits().max_output_bytes;
  if (op == "+") {
    if (a.is_string() && b.is_string()) {
      renderer.check_size(a.as<std::string>()->size() + b.as<std::string>()->size(), pos,
                          "a string");
      return *a.as<std::string>() + *b.as<std::string>();
    }
    const auto* la = a.as<ListPtr>();
    const auto* lb = b.as<ListPtr>();
    if (la && lb && (*la)->tuple == (*lb)->tuple) {
      renderer.check_size((*la)->items.size() + (*lb)->items.size(), pos, "a list");
      std::vector<Value> items = (*la)->items;
      items.insert(items.end(), (*lb)->items.begin(), (*lb)->items.end());
      return make_list(std::move(items), (*la)->tuple);
    }
    return unsupported();
  }
  if (op == "*" && (ia || ib)) {
    const Value& sequence = ia ? b : a;
    const int64_t times = std::max<int64_t>(0, ia ? *ia : *ib);
    if (const auto* text = sequence.as<std::string>()) {
      if (!text->empty() && static_cast<uint64_t>(times) > limit / text->size())
        renderer.check_size(limit + 1, pos, "a repeated string");
      std::string out;
      for (int64_t k = 0; k < times; ++k) out += *text;
      return out;
    }
    if (const auto* list = sequence.as<ListPtr>()) {
      if (!(*list)->items.empty() && static_cast<uint64_t>(times) > limit / (*list)->items.size())
        renderer.check_size(limit + 1, pos, "a repeated list");
      std::vector<Value> items;
      for (int64_t k = 0; k < times; ++k)
        items.insert(items.end(), (*list)->items.begin(), (*list)->items.end());
      return make_list(std::move(items), (*list)->tuple);
    }
  }
  if (op == "%" && a.is_string())
    fail_at(pos, "printf-style string formatting ('%') is not supported");
  return unsupported();
}

}  // namespace

Value Renderer::builtin(const std::string& name) {
  const auto make = [&](auto body) -> Value {
    auto callable = std::make_shared<Callable>();
    callable->name = name;
    callable->call = body;
    return CallablePtr(callable);
  };
  if (name == "range") {
    return make([](Renderer& r, CallArgs& args, Pos pos) -> Value {
      if (!args.keyword.empty()) fail_at(pos, "range() takes no keyword arguments");
      if (args.positional.empty() || args.positional.size() > 3)
        fail_at(pos, "range() takes 1 to 3 arguments");
      int64_t start = 0, stop = 0, step = 1;
      if (args.positional.size() == 1) {
        stop = require_int(args.positional[0], "range", pos);
      } else {
        start = require_int(args.positional[0], "range", pos);
        stop = require_int(args.positional[1], "range", pos);
        if (args.positional.size() == 3) step = require_int(args.positional[2], "range", pos);
      }
      if (step == 0) fail_at(pos, "range() arg 3 must not be zero");
      std::vector<Value> items;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
        r.count_iterations(1, pos);
        items.emplace_back(k);
        if (__builtin_add_overflow(k, step, &k)) break;
        k -= step;
      }
      return make_list(std::move(items));
    });
  }
  if (name == "namespace" || name == "dict") {
    const bool is_namespace = name == "namespace";
    return make([is_namespace](Renderer& r, CallArgs& args, Pos pos) -> Value {
      auto dict = std::make_shared<DictData>();
      dict->is_namespace = is_namespace;
      if (args.positional.size() > 1)
        fail_at(pos, "namespace()/dict() take at most one positional argument");
      if (!args.positional.empty()) {
        const auto* source = args.positional[0].as<DictPtr>();
        if (!source) fail_at(pos, "namespace()/dict(): the positional argument must be a mapping");
        dict->entries = (*source)->entries;
      }
      for (auto& [key, value] : args.keyword) {
        // transformers' namespace refuses underscore-prefixed attributes.
        if (is_namespace && !key.empty() && key[0] == '_')
          fail_at(pos, "namespace attributes may not start with '_': '", key, "'");
        dict->set(key, value);
      }
      return DictPtr(dict);
    });
  }
  if (name == "raise_exception") {
    return make([](Renderer& r, CallArgs& args, Pos pos) -> Value {
      const auto bound = bind(args, {"message"}, "raise_exception", pos);
      fail_at(pos, "raise_exception: ", bound[0] ? to_str(*bound[0], r.limits().max_depth) : "");
    });
  }
  if (name == "strftime_now") {
    return make([](Renderer&, CallArgs& args, Pos pos) -> Value {
      const auto bound = bind(args, {"format"}, "strftime_now", pos);
      const Value format_value = bound[0].value_or(Value{});  // the string lives in it
      const std::string& format = require_string(format_value, "strftime_now", pos);
      const std::time_t now =
          std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
      std::tm local{};
      localtime_r(&now, &local);
      std::string out(256 + format.size() * 8, '\0');
      const size_t written = std::strftime(out.data(), out.size(), format.c_str(), &local);
      if (written == 0 && !format.empty())
        fail_at(pos, "strftime_now: format '", format, "' gives no text");
      out.resize(written);
      return out;
    });
  }
  return Undefined{"'" + name + "' is undefined"};
}

Value Renderer::lookup(const std::string& name) {
  for (auto scope = scopes_.rbegin(); scope != scopes_.rend(); ++scope)
    if (const Value* found = find_in(**scope, name)) return *found;
  return builtin(name);
}

CallArgs Renderer::eval_args(const Expr& expr, size_t first) {
  CallArgs args;
  for (size_t k = first; k < expr.items.size(); ++k)
    args.positional.push_back(eval(*expr.items[k]));
  for (const auto& [key, value] : expr.keyword) args.keyword.emplace_back(key, eval(*value));
  return args;
}

Value Renderer::call_value(const Value& callee, CallArgs& args, Pos pos) {
  if (callee.is_undefined()) fail_undefined(callee, pos);
  const auto* callable = callee.as<CallablePtr>();
  if (!callable) fail_at(pos, "'", type_name(callee), "' object is not callable");
  const Nesting nesting(*this, pos);
  return (*callable)->call(*this, args, pos);
}

Value Renderer::eval(const Expr& expr) {
  const Pos pos = expr.pos;
  switch (expr.kind) {
    case Expr::Kind::Literal:
      return expr.literal;
    case Expr::Kind::Name:
      return lookup(expr.name);
    case Expr::Kind::List:
    case Expr::Kind::Tuple: {
      std::vector<Value> items;
      for (const auto& item : expr.items) items.push_back(eval(*item));
      return make_list(std::move(items), expr.kind == Expr::Kind::Tuple);
    }
    case Expr::Kind::Dict: {
      auto dict = std::make_shared<DictData>();
      for (size_t k = 0; k + 1 < expr.items.size(); k += 2) {
        Value key = eval(*expr.items[k]);
        if (!key.is_string())
          fail_at(expr.items[k]->pos, "dict keys must be strings here, got ", type_name(key));
        dict->set(*key.as<std::string>(), eval(*expr.items[k + 1]));
      }
      return DictPtr(dict);
    }
    case Expr::Kind::Attribute:
      return get_attribute(eval(*expr.items[0]), expr.name, pos);
    case Expr::Kind::Subscript: {
      Value object = eval(*expr.items[0]);
      return get_item(object, eval(*expr.items[1]), pos);
    }
    case Expr::Kind::Slice: {
      const Value object = eval(*expr.items[0]);
      if (object.is_undefined()) fail_undefined(object, pos);
      std::array<std::optional<int64_t>, 3> parts;
      for (size_t k = 0; k < 3; ++k) {
        if (!expr.items[k + 1]) continue;
        const Value part = eval(*expr.items[k + 1]);
        if (part.is_none()) continue;
        parts[k] = require_int(part, "slice index", expr.items[k + 1]->pos);
      }
      if (const auto* text = object.as<std::string>()) {
        const auto points = code_points(*text);
        std::string out;
        for (size_t k :
             slice_indices(static_cast<int64_t>(points.size()), parts[0], parts[1], parts[2], pos))
          out += points[k];
        return out;
      }
      if (const auto* list = object.as<ListPtr>()) {
        std::vector<Value> items;
        for (size_t k : slice_indices(static_cast<int64_t>((*list)->items.size()), parts[0],
                                      parts[1], parts[2], pos))
          items.push_back((*list)->items[k]);
        return make_list(std::move(items), (*list)->tuple);
      }
      fail_at(pos, "'", type_name(object), "' object is not subscriptable");
    }
    case Expr::Kind::Call: {
      const Value callee = eval(*expr.items[0]);
      CallArgs args = eval_args(expr, 1);
      return call_value(callee, args, pos);
    }
    case Expr::Kind::Filter: {
      Value operand = eval(*expr.items[0]);
      CallArgs args = eval_args(expr, 1);
      return apply_filter(expr.name, std::move(operand), args, pos);
    }
    case Expr::Kind::Test: {
      const Value operand = eval(*expr.items[0]);
      CallArgs args = eval_args(expr, 1);
      return apply_test(expr.name, operand, args, pos) != expr.negated;
    }
    case Expr::Kind::Unary: {
      const Value operand = eval(*expr.items[0]);
      if (expr.name == "not") return !truthy(operand);
      if (operand.is_undefined()) fail_undefined(operand, pos);
      if (const auto i = integer_of(operand)) {
        if (expr.name == "+") return *i;
        if (*i == INT64_MIN) fail_at(pos, "integer overflow in unary -");
        return -*i;
      }
      if (const auto* d = operand.as<double>()) return expr.name == "-" ? -*d : *d;
      fail_at(pos, "bad operand type for unary ", expr.name, ": '", type_name(operand), "'");
    }
    case Expr::Kind::Binary:
      return binary(expr);
    case Expr::Kind::Conditional: {
      if (truthy(eval(*expr.items[0]))) return eval(*expr.items[1]);
      if (expr.items[2]) return eval(*expr.items[2]);
      return Undefined{"the inline if expression on line " + std::to_string(pos.line) +
                       " evaluated to false and no else section was defined."};
    }
  }
  fail_at(pos, "unknown expression");
}

Value Renderer::binary(const Expr& expr) {
  const std::string& op = expr.name;
  const Pos pos = expr.pos;
  Value left = eval(*expr.items[0]);
  if (op == "and") return truthy(left) ? eval(*expr.items[1]) : left;
  if (op == "or") return truthy(left) ? left : eval(*expr.items[1]);
  const Value right = eval(*expr.items[1]);
  const int depth = limits_.max_depth;
  if (op == "==") return equal(left, right, depth);
  if (op == "!=") return !equal(left, right, depth);
  if (op == "<") return less(left, right, pos, depth);
  if (op == ">") return less(right, left, pos, depth);
  if (op == "<=") return less(left, right, pos, depth) || equal(left, right, depth);
  if (op == ">=") return less(right, left, pos, depth) || equal(left, right, depth);
  if (op == "in") return contains(*this, right, left, pos);
  if (op == "not in") return !contains(*this, right, left, pos);
  if (op == "~") {
    std::string text = to_str(left, depth) + to_str(right, depth);
    check_size(text.size(), pos, "a string");
    return text;
  }
  return arithmetic(*this, op, left, right, pos);
}

// ---------------------------------------------------------------------------------------------
// Statements

void Renderer::assign_targets(const std::vector<Target>& targets, const Value& value, Pos pos) {
  if (targets.size() == 1 && targets[0].attribute.empty()) {
    assign(*scopes_.back(), targets[0].name, value);
    return;
  }
  if (targets.size() == 1) {
    const Value object = lookup(targets[0].name);
    const auto* dict = object.as<DictPtr>();
    if (!dict || !(*dict)->is_namespace)
      fail_at(pos, "cannot assign attribute '", targets[0].attribute, "' on '", targets[0].name,
              "': only namespace() objects take attribute assignment");
    if (targets[0].attribute[0] == '_')
      fail_at(pos, "namespace attributes may not start with '_': '", targets[0].attribute, "'");
    (*dict)->set(targets[0].attribute, value);
    return;
  }
  const std::vector<Value> items = iterate(value, pos);
  if (items.size() != targets.size())
    fail_at(pos, "cannot unpack ", items.size(), " values into ", targets.size(), " names");
  for (size_t k = 0; k < targets.size(); ++k) {
    if (!targets[k].attribute.empty()) fail_at(pos, "namespace attributes cannot be unpacked into");
    assign(*scopes_.back(), targets[k].name, items[k]);
  }
}

Value Renderer::make_macro(const Stmt& stmt) {
  auto callable = std::make_shared<Callable>();
  callable->name = stmt.text;
  // Macros see the context and the template's top level as they are when called, and their own
  // arguments (and `caller` inside a call block).
  callable->call = [&stmt](Renderer& r, CallArgs& args, Pos pos) -> Value {
    auto frame = std::make_shared<Frame>();
    const size_t count = stmt.params.size();
    if (args.positional.size() > count)
      fail_at(pos, "macro '", stmt.text, "' takes at most ", count, " arguments (",
              args.positional.size(), " given)");
    std::vector<std::optional<Value>> values(count);
    for (size_t k = 0; k < args.positional.size(); ++k) values[k] = args.positional[k];
    std::optional<Value> caller;
    for (auto& [name, value] : args.keyword) {
      const std::string& key = name;  // clang cannot capture a structured binding
      const auto it = std::find_if(stmt.params.begin(), stmt.params.end(),
                                   [&](const MacroParam& p) { return p.name == key; });
      if (it != stmt.params.end()) {
        values[static_cast<size_t>(it - stmt.params.begin())] = value;
      } else if (key == "caller") {
        caller = value;
      } else {
        fail_at(pos, "macro '", stmt.text, "' takes no keyword argument '", key, "'");
      }
    }
    Scopes saved = std::exchange(r.scopes_, Scopes{r.scopes_[0], r.scopes_[1], frame});
    try {
      for (size_t k = 0; k < count; ++k) {
        Value value;
        if (values[k])
          value = *values[k];
        else if (stmt.params[k].default_value)
          value = r.eval(*stmt.params[k].default_value);
        else
          value = Undefined{"parameter '" + stmt.params[k].name + "' was not provided"};
        assign(*frame, stmt.params[k].name, std::move(value));
      }
      if (caller) assign(*frame, "caller", *caller);
      std::string text = r.capture(stmt.body);
      r.scopes_ = std::move(saved);
      return text;
    } catch (...) {
      r.scopes_ = std::move(saved);
      throw;
    }
  };
  return CallablePtr(callable);
}

Renderer::Flow Renderer::exec(const Body& body) {
  for (const StmtPtr& statement : body) {
    const Stmt& stmt = *statement;
    switch (stmt.kind) {
      case Stmt::Kind::Text:
        emit(stmt.text, stmt.pos);
        break;
      case Stmt::Kind::Output: {
        const Value value = eval(*stmt.expr);
        emit(to_str(value, limits_.max_depth), stmt.pos);
        break;
      }
      case Stmt::Kind::If:
        for (const auto& [condition, branch] : stmt.branches) {
          if (condition && !truthy(eval(*condition))) continue;
          const Flow flow = exec(branch);
          if (flow != Flow::Normal) return flow;
          break;
        }
        break;
      case Stmt::Kind::For:
        exec_for(stmt);
        break;
      case Stmt::Kind::Set:
        assign_targets(stmt.targets, eval(*stmt.expr), stmt.pos);
        break;
      case Stmt::Kind::SetBlock:
        assign_targets(stmt.targets, capture(stmt.body), stmt.pos);
        break;
      case Stmt::Kind::Macro:
        assign(*scopes_.back(), stmt.text, make_macro(stmt));
        break;
      case Stmt::Kind::CallBlock: {
        const Expr& call = *stmt.expr;
        const Value callee = eval(*call.items[0]);
        CallArgs args = eval_args(call, 1);
        auto caller = std::make_shared<Callable>();
        caller->name = "caller";
        const Scopes scopes = scopes_;  // the body renders where the call block stands
        caller->call = [&stmt, scopes](Renderer& r, CallArgs& caller_args, Pos pos) -> Value {
          auto frame = std::make_shared<Frame>();
          if (caller_args.positional.size() > stmt.params.size())
            fail_at(pos, "caller() got too many arguments");
          for (size_t k = 0; k < stmt.params.size(); ++k) {
            Value value =
                k < caller_args.positional.size() ? caller_args.positional[k]
                : stmt.params[k].default_value
                    ? r.eval(*stmt.params[k].default_value)
                    : Value{Undefined{"parameter '" + stmt.params[k].name + "' was not provided"}};
            assign(*frame, stmt.params[k].name, std::move(value));
          }
          Scopes inner = scopes;
          inner.push_back(frame);
          Scopes saved = std::exchange(r.scopes_, std::move(inner));
          try {
            std::string text = r.capture(stmt.body);
            r.scopes_ = std::move(saved);
            return text;
          } catch (...) {
            r.scopes_ = std::move(saved);
            throw;
          }
        };
        args.keyword.emplace_back("caller", CallablePtr(caller));
        emit(to_str(call_value(callee, args, stmt.pos), limits_.max_depth), stmt.pos);
        break;
      }
      case Stmt::Kind::FilterBlock: {
        Value value = capture(stmt.body);
        // The chain is nested innermost first; apply from the innermost (null operand) out.
        std::vector<const Expr*> chain;
        for (const Expr* filter = stmt.expr.get(); filter; filter = filter->items[0].get())
          chain.push_back(filter);
        for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
          CallArgs args = eval_args(**it, 1);
          value = apply_filter((*it)->name, std::move(value), args, (*it)->pos);
        }
        emit(to_str(value, limits_.max_depth), stmt.pos);
        break;
      }
      case Stmt::Kind::Break:
        return Flow::Break;
      case Stmt::Kind::Continue:
        return Flow::Continue;
      case Stmt::Kind::Scope: {
        const Flow flow = exec(stmt.body);
        if (flow != Flow::Normal) return flow;
        break;
      }
    }
  }
  return Flow::Normal;
}

Renderer::Flow Renderer::exec_for(const Stmt& stmt) {
  std::vector<Value> items = iterate(eval(*stmt.expr), stmt.pos);
  if (stmt.condition) {
    // The loop's `if` filters before loop.length and loop.index are counted.
    std::vector<Value> kept;
    for (Value& item : items) {
      count_iterations(1, stmt.pos);
      auto frame = std::make_shared<Frame>();
      scopes_.push_back(frame);
      try {
        assign_targets(stmt.targets, item, stmt.pos);
        const bool keep = truthy(eval(*stmt.condition));
        scopes_.pop_back();
        if (keep) kept.push_back(std::move(item));
      } catch (...) {
        scopes_.pop_back();
        throw;
      }
    }
    items = std::move(kept);
  }
  if (items.empty()) {
    exec(stmt.else_body);
    return Flow::Normal;
  }
  // loop.depth counts recursive loops only (not supported), so it is always 1, as in jinja2
  // for nested plain loops.
  const int64_t depth = 1;
  const auto n = static_cast<int64_t>(items.size());
  for (int64_t k = 0; k < n; ++k) {
    count_iterations(1, stmt.pos);
    auto loop = std::make_shared<DictData>();
    loop->entries = {
        {"index", k + 1},     {"index0", k},        {"revindex", n - k}, {"revindex0", n - k - 1},
        {"first", k == 0},    {"last", k == n - 1}, {"length", n},       {"depth", depth},
        {"depth0", depth - 1}};
    loop->entries.emplace_back("previtem", k > 0 ? items[static_cast<size_t>(k - 1)]
                                                 : Value{Undefined{"there is no previous item"}});
    loop->entries.emplace_back("nextitem", k + 1 < n ? items[static_cast<size_t>(k + 1)]
                                                     : Value{Undefined{"there is no next item"}});
    auto cycle = std::make_shared<Callable>();
    cycle->name = "cycle";
    cycle->call = [k](Renderer&, CallArgs& args, Pos pos) -> Value {
      if (args.positional.empty()) fail_at(pos, "loop.cycle() needs at least one argument");
      return args.positional[static_cast<size_t>(k) % args.positional.size()];
    };
    loop->entries.emplace_back("cycle", CallablePtr(cycle));
    auto frame = std::make_shared<Frame>();
    frame->emplace_back("loop", DictPtr(loop));
    scopes_.push_back(frame);
    Flow flow;
    try {
      assign_targets(stmt.targets, items[static_cast<size_t>(k)], stmt.pos);
      flow = exec(stmt.body);
    } catch (...) {
      scopes_.pop_back();
      throw;
    }
    scopes_.pop_back();
    if (flow == Flow::Break) break;
  }
  return Flow::Normal;
}

// ---------------------------------------------------------------------------------------------
// Methods of str, dict and list that templates call.

Value Renderer::call_method(const Value& object, const std::string& name, CallArgs& args, Pos pos) {
  const int depth = limits_.max_depth;
  if (is_mutating_method(name))
    fail_at(pos, "'", type_name(object), ".", name,
            "' is not allowed: template values cannot be modified");
  if (const auto* dict = object.as<DictPtr>()) {
    if (name == "get") {
      const auto bound = bind(args, {"key", "default"}, "get", pos);
      if (!bound[0]) fail_at(pos, "get() needs a key");
      if (const auto* key = bound[0]->as<std::string>())
        if (const Value* found = (*dict)->find(*key)) return *found;
      return bound[1].value_or(None{});
    }
    bind(args, {}, name, pos);
    std::vector<Value> out;
    for (const auto& [key, value] : (*dict)->entries) {
      if (name == "items")
        out.push_back(make_list({key, value}, true));
      else if (name == "keys")
        out.emplace_back(key);
      else
        out.push_back(value);
    }
    return make_list(std::move(out));
  }
  if (const auto* list = object.as<ListPtr>()) {
    const auto bound = bind(args, {"value"}, name, pos);
    if (!bound[0]) fail_at(pos, name, "() needs an argument");
    int64_t count = 0;
    for (size_t k = 0; k < (*list)->items.size(); ++k) {
      if (!equal((*list)->items[k], *bound[0], depth)) continue;
      if (name == "index") return static_cast<int64_t>(k);
      ++count;
    }
    if (name == "index") fail_at(pos, repr(*bound[0], depth), " is not in list");
    return count;
  }
  const std::string& text = *object.as<std::string>();
  const auto optional_string = [&](const std::optional<Value>& v) -> std::optional<std::string> {
    if (!v || v->is_none()) return std::nullopt;
    return require_string(*v, name, pos);
  };
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    const auto bound = bind(args, {"chars"}, name, pos);
    return strip(text, optional_string(bound[0]), name != "rstrip", name != "lstrip");
  }
  if (name == "split" || name == "rsplit") {
    const auto bound = bind(args, {"sep", "maxsplit"}, name, pos);
    std::vector<Value> parts;
    for (auto& part :
         python_split(text, optional_string(bound[0]),
                      bound[1] ? require_int(*bound[1], name, pos) : -1, name == "rsplit"))
      parts.emplace_back(std::move(part));
    return make_list(std::move(parts));
  }
  if (name == "splitlines") {
    bind(args, {}, name, pos);
    std::vector<Value> lines;
    for (auto& line : split_lines(text)) lines.emplace_back(std::move(line));
    return make_list(std::move(lines));
  }
  if (name == "startswith" || name == "endswith") {
    const auto bound = bind(args, {"prefix"}, name, pos);
    if (!bound[0]) fail_at(pos, name, "() needs an argument");
    std::vector<Value> candidates;
    if (const auto* tuple = bound[0]->as<ListPtr>(); tuple && (*tuple)->tuple)
      candidates = (*tuple)->items;
    else
      candidates = {*bound[0]};
    for (const Value& candidate : candidates) {
      const std::string& affix = require_string(candidate, name, pos);
      if (name == "startswith" ? text.starts_with(affix) : text.ends_with(affix)) return true;
    }
    return false;
  }
  if (name == "upper" || name == "lower") {
    bind(args, {}, name, pos);
    return map_case(text, name == "upper");
  }
  if (name == "title") {
    bind(args, {}, name, pos);
    return python_title(text);
  }
  if (name == "capitalize") {
    bind(args, {}, name, pos);
    return capitalize(text);
  }
  if (name == "replace") {
    const auto bound = bind(args, {"old", "new", "count"}, name, pos);
    if (!bound[0] || !bound[1]) fail_at(pos, "replace() needs two arguments");
    return replace_all(
        text, require_string(*bound[0], name, pos), require_string(*bound[1], name, pos),
        bound[2] ? require_int(*bound[2], name, pos) : -1, limits_.max_output_bytes, pos);
  }
  if (name == "join") {
    const auto bound = bind(args, {"iterable"}, name, pos);
    if (!bound[0]) fail_at(pos, "join() needs an argument");
    std::string out;
    const auto items = iterate(*bound[0], pos);
    for (size_t k = 0; k < items.size(); ++k) {
      if (k) out += text;
      out += require_string(items[k], "join", pos);
      check_size(out.size(), pos, "a joined string");
    }
    return out;
  }
  if (name == "find" || name == "count") {
    const auto bound = bind(args, {"sub"}, name, pos);
    if (!bound[0]) fail_at(pos, name, "() needs an argument");
    const std::string& sub = require_string(*bound[0], name, pos);
    if (name == "find") {
      const size_t at = text.find(sub);
      return at == std::string::npos
                 ? int64_t{-1}
                 : static_cast<int64_t>(code_point_count(std::string_view(text).substr(0, at)));
    }
    if (sub.empty()) return static_cast<int64_t>(code_point_count(text) + 1);
    int64_t count = 0;
    for (size_t at = text.find(sub); at != std::string::npos; at = text.find(sub, at + sub.size()))
      ++count;
    return count;
  }
  if (name == "format") {
    // str.format with {} / {0} / {name} fields and no format specs.
    std::string out;
    size_t next_auto = 0;
    for (size_t i = 0; i < text.size(); ++i) {
      const char c = text[i];
      if (c == '{' && i + 1 < text.size() && text[i + 1] == '{') {
        out += '{';
        ++i;
      } else if (c == '}' && i + 1 < text.size() && text[i + 1] == '}') {
        out += '}';
        ++i;
      } else if (c == '{') {
        const size_t close = text.find('}', i);
        if (close == std::string::npos) fail_at(pos, "format(): single '{' in format string");
        const std::string field = text.substr(i + 1, close - i - 1);
        if (field.find_first_of(":!.[") != std::string::npos)
          fail_at(pos, "format(): field '{", field,
                  "}' uses a conversion or spec, which is not supported");
        const Value* value = nullptr;
        if (field.empty() ||
            std::all_of(field.begin(), field.end(), [](char d) { return d >= '0' && d <= '9'; })) {
          const size_t index = field.empty() ? next_auto++ : std::stoul(field);
          if (index >= args.positional.size())
            fail_at(pos, "format(): replacement index ", index, " out of range");
          value = &args.positional[index];
        } else {
          for (const auto& [key, v] : args.keyword)
            if (key == field) value = &v;
          if (!value) fail_at(pos, "format(): no argument named '", field, "'");
        }
        out += to_str(*value, depth);
        i = close;
      } else if (c == '}') {
        fail_at(pos, "format(): single '}' in format string");
      } else {
        out += c;
      }
      check_size(out.size(), pos, "a formatted string");
    }
    return out;
  }
  // is* predicates: true when not empty and every code point qualifies.
  bind(args, {}, name, pos);
  if (text.empty()) return false;
  size_t at = 0;
  bool cased = false;
  while (at < text.size()) {
    const char32_t c = decode_utf8(text, at);
    const auto category = utf8proc_category(static_cast<utf8proc_int32_t>(c));
    const bool ok = name == "isdigit"   ? is_digit(c)
                    : name == "isalpha" ? is_alpha(c)
                    : name == "isalnum" ? is_alpha(c) || is_digit(c)
                    : name == "isspace" ? python_isspace(c)
                    : name == "islower"
                        ? category != UTF8PROC_CATEGORY_LU && category != UTF8PROC_CATEGORY_LT
                        : category != UTF8PROC_CATEGORY_LL;
    if (!ok) return false;
    cased = cased || category == UTF8PROC_CATEGORY_LU || category == UTF8PROC_CATEGORY_LL ||
            category == UTF8PROC_CATEGORY_LT;
  }
  return (name == "islower" || name == "isupper") ? cased : true;
}

// ---------------------------------------------------------------------------------------------
// Filters and tests

namespace {

// `attribute` of a filter (selectattr, map, sort, ...): dotted path, integer parts index lists.
Value attribute_path(Renderer& r, const Value& item, const std::string& path, Pos pos) {
  Value value = item;
  size_t at = 0;
  while (true) {
    const size_t dot = path.find('.', at);
    const std::string part =
        path.substr(at, dot == std::string::npos ? std::string::npos : dot - at);
    const bool numeric = !part.empty() && std::all_of(part.begin(), part.end(),
                                                      [](char c) { return c >= '0' && c <= '9'; });
    value = numeric ? r.get_item(value, static_cast<int64_t>(std::stoll(part)), pos)
                    : r.get_item(value, part, pos);
    if (dot == std::string::npos) return value;
    at = dot + 1;
  }
}

// The sort key jinja2 compares with: strings lowered unless case_sensitive.
Value sort_key(const Value& value, bool case_sensitive) {
  if (!case_sensitive)
    if (const auto* text = value.as<std::string>()) return map_case(*text, false);
  return value;
}

const std::vector<std::string_view>& filter_names() {
  static const std::vector<std::string_view> kNames = {
      "abs",    "attr",       "capitalize", "count",    "d",       "default", "dictsort",
      "e",      "escape",     "first",      "float",    "indent",  "int",     "items",
      "join",   "last",       "length",     "list",     "lower",   "map",     "max",
      "min",    "reject",     "rejectattr", "replace",  "reverse", "round",   "safe",
      "select", "selectattr", "sort",       "string",   "sum",     "title",   "tojson",
      "trim",   "unique",     "upper",      "wordcount"};
  return kNames;
}

const std::vector<std::string_view>& test_names() {
  static const std::vector<std::string_view> kNames = {
      "boolean",  "callable", "defined", "divisibleby", "eq",      "equalto", "escaped",  "even",
      "false",    "float",    "ge",      "gt",          "in",      "integer", "iterable", "le",
      "lower",    "lt",       "mapping", "ne",          "none",    "number",  "odd",      "sameas",
      "sequence", "string",   "true",    "undefined",   "upper",   "==",      "!=",       "<",
      "<=",       ">",        ">=",      "greaterthan", "lessthan"};
  return kNames;
}

}  // namespace

bool is_known_filter(std::string_view name) {
  const auto& names = filter_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

bool is_known_test(std::string_view name) {
  const auto& names = test_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

bool Renderer::apply_test(const std::string& name, const Value& value, CallArgs& args, Pos pos) {
  const int depth = limits_.max_depth;
  const auto argument = [&]() -> const Value& {
    if (args.positional.empty()) fail_at(pos, "test '", name, "' needs an argument");
    return args.positional[0];
  };
  if (name == "defined") return !value.is_undefined();
  if (name == "undefined") return value.is_undefined();
  if (name == "none") return value.is_none();
  if (name == "boolean") return value.as<bool>() != nullptr;
  if (name == "true") return value.as<bool>() && *value.as<bool>();
  if (name == "false") return value.as<bool>() && !*value.as<bool>();
  if (name == "integer") return value.as<int64_t>() != nullptr;
  if (name == "float") return value.as<double>() != nullptr;
  if (name == "number") return value.is_number();
  if (name == "string") return value.is_string();
  if (name == "mapping") return value.as<DictPtr>() && !(*value.as<DictPtr>())->is_namespace;
  if (name == "iterable")
    return value.is_string() || value.as<ListPtr>() || value.as<DictPtr>() || value.is_undefined();
  if (name == "sequence")
    return value.is_string() || value.as<ListPtr>() ||
           (value.as<DictPtr>() && !(*value.as<DictPtr>())->is_namespace);
  if (name == "callable") return value.as<CallablePtr>() != nullptr;
  if (name == "escaped") return false;
  if (name == "lower" || name == "upper") {
    const auto* text = value.as<std::string>();
    if (!text) fail_at(pos, "test '", name, "' needs a string, got ", type_name(value));
    return map_case(*text, name == "upper") == *text;
  }
  if (name == "odd" || name == "even" || name == "divisibleby") {
    const int64_t n = require_int(value, name, pos);
    if (name == "divisibleby") {
      const int64_t d = require_int(argument(), name, pos);
      if (d == 0) fail_at(pos, "divisibleby 0");
      return n % d == 0;
    }
    return (n % 2 != 0) == (name == "odd");
  }
  if (name == "eq" || name == "equalto" || name == "==") return equal(value, argument(), depth);
  if (name == "ne" || name == "!=") return !equal(value, argument(), depth);
  if (name == "lt" || name == "<" || name == "lessthan") return less(value, argument(), pos, depth);
  if (name == "gt" || name == ">" || name == "greaterthan")
    return less(argument(), value, pos, depth);
  if (name == "le" || name == "<=") return !less(argument(), value, pos, depth);
  if (name == "ge" || name == ">=") return !less(value, argument(), pos, depth);
  if (name == "in") return contains(*this, argument(), value, pos);
  if (name == "sameas") {
    const Value& other = argument();
    if (value.is_none() || other.is_none() || value.as<bool>() || other.as<bool>())
      return equal(value, other, depth) && value.v.index() == other.v.index();
    if (const auto* a = value.as<ListPtr>(); a && other.as<ListPtr>())
      return a->get() == other.as<ListPtr>()->get();
    if (const auto* a = value.as<DictPtr>(); a && other.as<DictPtr>())
      return a->get() == other.as<DictPtr>()->get();
    return false;
  }
  fail_at(pos, "no test named '", name, "'");
}

Value Renderer::apply_filter(const std::string& name, Value value, CallArgs& args, Pos pos) {
  const int depth = limits_.max_depth;
  const auto text_of = [&](const Value& v) { return to_str(v, depth); };
  const auto flag = [](const std::optional<Value>& v, bool fallback) {
    return v ? truthy(*v) : fallback;
  };
  if (name == "safe") return value;
  if (name == "d" || name == "default") {
    const auto bound = bind(args, {"default_value", "boolean"}, name, pos);
    if (value.is_undefined() || (flag(bound[1], false) && !truthy(value)))
      return bound[0].value_or(std::string());
    return value;
  }
  if (name == "tojson") {
    const auto bound = bind(args, {"indent", "ensure_ascii", "separators", "sort_keys"}, name, pos);
    JsonStyle style;
    if (bound[0] && !bound[0]->is_none()) {
      if (const auto* text = bound[0]->as<std::string>()) {
        style.indent = *text;
      } else {
        const int64_t indent = require_int(*bound[0], "tojson indent", pos);
        if (indent > 64) fail_at(pos, "tojson: indent ", indent, " is over 64");
        style.indent = std::string(static_cast<size_t>(std::max<int64_t>(0, indent)), ' ');
      }
      style.item_separator = ",";
    }
    style.ensure_ascii = flag(bound[1], false);
    if (bound[2] && !bound[2]->is_none()) {
      const auto* pair = bound[2]->as<ListPtr>();
      if (!pair || (*pair)->items.size() != 2)
        fail_at(pos, "tojson: separators must be a pair of strings");
      style.item_separator = require_string((*pair)->items[0], "tojson separators", pos);
      style.key_separator = require_string((*pair)->items[1], "tojson separators", pos);
    }
    style.sort_keys = flag(bound[3], false);
    std::string json = to_json(value, style, pos, depth);
    check_size(json.size(), pos, "tojson output");
    return json;
  }
  if (name == "string") return text_of(value);
  if (name == "e" || name == "escape") return html_escape(text_of(value));
  if (name == "trim") {
    const auto bound = bind(args, {"chars"}, name, pos);
    std::optional<std::string> chars;
    if (bound[0] && !bound[0]->is_none()) chars = require_string(*bound[0], name, pos);
    return strip(text_of(value), chars, true, true);
  }
  if (name == "upper" || name == "lower") return map_case(text_of(value), name == "upper");
  if (name == "title") return jinja_title(text_of(value));
  if (name == "capitalize") return capitalize(text_of(value));
  if (name == "replace") {
    const auto bound = bind(args, {"old", "new", "count"}, name, pos);
    if (!bound[0] || !bound[1]) fail_at(pos, "replace needs two arguments");
    return replace_all(text_of(value), text_of(*bound[0]), text_of(*bound[1]),
                       bound[2] && !bound[2]->is_none() ? require_int(*bound[2], name, pos) : -1,
                       limits_.max_output_bytes, pos);
  }
  if (name == "length" || name == "count") return length_of(value, pos);
  if (name == "wordcount")
    return static_cast<int64_t>(python_split(text_of(value), std::nullopt, -1, false).size());
  if (name == "indent") {
    const auto bound = bind(args, {"width", "first", "blank"}, name, pos);
    std::string indentation = "    ";
    if (bound[0]) {
      if (const auto* text = bound[0]->as<std::string>()) {
        indentation = *text;
      } else {
        const int64_t width = require_int(*bound[0], "indent width", pos);
        if (width > 1024) fail_at(pos, "indent width ", width, " is over 1024");
        indentation = std::string(static_cast<size_t>(std::max<int64_t>(0, width)), ' ');
      }
    }
    // jinja2 appends a newline before splitting, so a trailing newline leaves no extra line.
    const std::vector<std::string> lines = split_lines(text_of(value) + "\n");
    std::string out;
    if (flag(bound[2], false)) {
      for (size_t k = 0; k < lines.size(); ++k) out += (k ? "\n" + indentation : "") + lines[k];
    } else {
      out = lines.empty() ? "" : lines[0];
      for (size_t k = 1; k < lines.size(); ++k)
        out += "\n" + (lines[k].empty() ? "" : indentation) + lines[k];
    }
    if (flag(bound[1], false)) out = indentation + out;
    check_size(out.size(), pos, "indent output");
    return out;
  }
  if (name == "int") {
    const auto bound = bind(args, {"default", "base"}, name, pos);
    const Value fallback = bound[0].value_or(int64_t{0});
    if (const auto i = integer_of(value)) return *i;
    if (const auto* d = value.as<double>()) {
      if (!std::isfinite(*d) || std::fabs(*d) >= 9.2e18) return fallback;
      return static_cast<int64_t>(*d);
    }
    if (const auto* text = value.as<std::string>()) {
      const std::string trimmed = strip(*text, std::nullopt, true, true);
      try {
        size_t used = 0;
        const long long parsed = std::stoll(trimmed, &used, 10);
        if (used == trimmed.size()) return static_cast<int64_t>(parsed);
        const double real = std::stod(trimmed, &used);
        if (used == trimmed.size() && std::isfinite(real) && std::fabs(real) < 9.2e18)
          return static_cast<int64_t>(real);
      } catch (const std::exception&) {
      }
    }
    return fallback;
  }
  if (name == "float") {
    const auto bound = bind(args, {"default"}, name, pos);
    if (value.is_number()) return double_of(value);
    if (const auto* text = value.as<std::string>()) {
      const std::string trimmed = strip(*text, std::nullopt, true, true);
      try {
        size_t used = 0;
        const double parsed = std::stod(trimmed, &used);
        if (used == trimmed.size() && !trimmed.empty()) return parsed;
      } catch (const std::exception&) {
      }
    }
    return bound[0].value_or(0.0);
  }
  if (name == "abs") {
    if (const auto i = integer_of(value)) {
      if (*i == INT64_MIN) fail_at(pos, "integer overflow in abs");
      return *i < 0 ? -*i : *i;
    }
    if (const auto* d = value.as<double>()) return std::fabs(*d);
    if (value.is_undefined()) fail_undefined(value, pos);
    fail_at(pos, "bad operand type for abs(): '", type_name(value), "'");
  }
  if (name == "round") {
    const auto bound = bind(args, {"precision", "method"}, name, pos);
    const int64_t precision = bound[0] ? require_int(*bound[0], "round", pos) : 0;
    const std::string method = bound[1] ? require_string(*bound[1], "round", pos) : "common";
    if (value.is_undefined()) fail_undefined(value, pos);
    if (!value.is_number()) fail_at(pos, "round: expected a number, got ", type_name(value));
    const double x = double_of(value);
    const double scale = std::pow(10.0, static_cast<double>(precision));
    if (method == "common")
      return std::nearbyint(x * scale) / scale;  // Python's round: ties to even
    if (method == "floor") return std::floor(x * scale) / scale;
    if (method == "ceil") return std::ceil(x * scale) / scale;
    fail_at(pos, "round: method must be 'common', 'ceil' or 'floor'");
  }
  if (name == "first" || name == "last") {
    if (const auto* text = value.as<std::string>()) {
      if (text->empty()) return Undefined{"No " + name + " item, sequence was empty."};
      const auto points = code_points(*text);
      return name == "first" ? points.front() : points.back();
    }
    const std::vector<Value> items = iterate(value, pos);
    if (items.empty()) return Undefined{"No " + name + " item, sequence was empty."};
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") return make_list(iterate(value, pos));
  if (name == "reverse") {
    if (const auto* text = value.as<std::string>()) {
      auto points = code_points(*text);
      std::string out;
      for (auto it = points.rbegin(); it != points.rend(); ++it) out += *it;
      return out;
    }
    std::vector<Value> items = iterate(value, pos);
    std::reverse(items.begin(), items.end());
    return make_list(std::move(items));
  }
  if (name == "items") {
    if (value.is_undefined()) return make_list({});
    const auto* dict = value.as<DictPtr>();
    if (!dict) fail_at(pos, "items: expected a mapping, got ", type_name(value));
    std::vector<Value> out;
    for (const auto& [key, item] : (*dict)->entries) out.push_back(make_list({key, item}, true));
    return make_list(std::move(out));
  }
  if (name == "dictsort") {
    const auto bound = bind(args, {"case_sensitive", "by", "reverse"}, name, pos);
    const auto* dict = value.as<DictPtr>();
    if (!dict) fail_at(pos, "dictsort: expected a mapping, got ", type_name(value));
    const bool by_value = bound[1] && require_string(*bound[1], name, pos) == "value";
    std::vector<Value> out;
    for (const auto& [key, item] : (*dict)->entries) out.push_back(make_list({key, item}, true));
    const bool case_sensitive = flag(bound[0], false);
    std::stable_sort(out.begin(), out.end(), [&](const Value& a, const Value& b) {
      const size_t k = by_value ? 1 : 0;
      return less(sort_key((*a.as<ListPtr>())->items[k], case_sensitive),
                  sort_key((*b.as<ListPtr>())->items[k], case_sensitive), pos, depth);
    });
    if (flag(bound[2], false)) std::reverse(out.begin(), out.end());
    return make_list(std::move(out));
  }
  if (name == "join") {
    const auto bound = bind(args, {"d", "attribute"}, name, pos);
    const std::string separator = bound[0] ? text_of(*bound[0]) : "";
    std::string out;
    const std::vector<Value> items = iterate(value, pos);
    for (size_t k = 0; k < items.size(); ++k) {
      if (k) out += separator;
      out +=
          text_of(bound[1] ? attribute_path(*this, items[k], text_of(*bound[1]), pos) : items[k]);
      check_size(out.size(), pos, "a joined string");
    }
    return out;
  }
  if (name == "attr") {
    const auto bound = bind(args, {"name"}, name, pos);
    return get_attribute(value, require_string(bound[0].value_or(Value{}), "attr", pos), pos);
  }
  if (name == "sort" || name == "unique" || name == "min" || name == "max") {
    const bool is_sort = name == "sort";
    const auto bound =
        is_sort ? bind(args, {"reverse", "case_sensitive", "attribute"}, name, pos) : [&] {
          auto b = bind(args, {"case_sensitive", "attribute"}, name, pos);
          b.insert(b.begin(), std::nullopt);
          return b;
        }();
    const bool case_sensitive = flag(bound[1], false);
    std::vector<Value> items = iterate(value, pos);
    const auto key = [&](const Value& item) {
      return sort_key(bound[2] ? attribute_path(*this, item, text_of(*bound[2]), pos) : item,
                      case_sensitive);
    };
    if (name == "unique") {
      std::vector<Value> out, seen;
      for (const Value& item : items) {
        const Value k = key(item);
        if (std::any_of(seen.begin(), seen.end(),
                        [&](const Value& s) { return equal(s, k, depth); }))
          continue;
        seen.push_back(k);
        out.push_back(item);
      }
      return make_list(std::move(out));
    }
    if (!is_sort) {
      if (items.empty()) return Undefined{"No aggregated item, sequence was empty."};
      size_t best = 0;
      for (size_t k = 1; k < items.size(); ++k) {
        const bool better = name == "min" ? less(key(items[k]), key(items[best]), pos, depth)
                                          : less(key(items[best]), key(items[k]), pos, depth);
        if (better) best = k;
      }
      return items[best];
    }
    const bool reverse = flag(bound[0], false);
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
      return reverse ? less(key(b), key(a), pos, depth) : less(key(a), key(b), pos, depth);
    });
    return make_list(std::move(items));
  }
  if (name == "sum") {
    const auto bound = bind(args, {"attribute", "start"}, name, pos);
    Value total = bound[1].value_or(int64_t{0});
    for (const Value& item : iterate(value, pos))
      total =
          arithmetic(*this, "+", total,
                     bound[0] ? attribute_path(*this, item, text_of(*bound[0]), pos) : item, pos);
    return total;
  }
  if (name == "map") {
    std::vector<Value> out;
    const std::vector<Value> items = iterate(value, pos);
    const auto attribute = std::find_if(args.keyword.begin(), args.keyword.end(),
                                        [](const auto& kw) { return kw.first == "attribute"; });
    if (attribute != args.keyword.end()) {
      const auto bound = bind(args, {"attribute", "default"}, name, pos);
      for (const Value& item : items) {
        Value mapped = attribute_path(*this, item, text_of(*bound[0]), pos);
        if (mapped.is_undefined() && bound[1]) mapped = *bound[1];
        out.push_back(std::move(mapped));
      }
      return make_list(std::move(out));
    }
    if (args.positional.empty()) fail_at(pos, "map needs a filter name or attribute=");
    const std::string filter = require_string(args.positional[0], "map", pos);
    if (!is_known_filter(filter)) fail_at(pos, "no filter named '", filter, "'");
    CallArgs rest{std::vector<Value>(args.positional.begin() + 1, args.positional.end()),
                  args.keyword};
    for (const Value& item : items) {
      CallArgs copy = rest;
      out.push_back(apply_filter(filter, item, copy, pos));
    }
    return make_list(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool by_attribute = name.ends_with("attr");
    const bool keep_when = name.starts_with("select");
    size_t at = 0;
    std::string attribute;
    if (by_attribute) {
      if (args.positional.empty()) fail_at(pos, name, " needs an attribute name");
      attribute = require_string(args.positional[at++], name, pos);
    }
    std::optional<std::string> test;
    if (at < args.positional.size()) {
      test = require_string(args.positional[at++], name, pos);
      if (!is_known_test(*test)) fail_at(pos, "no test named '", *test, "'");
    }
    CallArgs test_args{std::vector<Value>(args.positional.begin() + static_cast<std::ptrdiff_t>(at),
                                          args.positional.end()),
                       args.keyword};
    std::vector<Value> out;
    for (const Value& item : iterate(value, pos)) {
      const Value subject = by_attribute ? attribute_path(*this, item, attribute, pos) : item;
      CallArgs copy = test_args;
      const bool passed = test ? apply_test(*test, subject, copy, pos) : truthy(subject);
      if (passed == keep_when) out.push_back(item);
    }
    return make_list(std::move(out));
  }
  fail_at(pos, "no filter named '", name, "'");
}

Template::Template(std::shared_ptr<const Program> program) : program_(std::move(program)) {}

Template Template::parse(std::string_view source, const Limits& limits) {
  return Template(std::make_shared<const Program>(parse_program(source, limits)));
}

std::string Template::render(const nlohmann::ordered_json& variables) const {
  return Renderer(*program_, variables).run();
}

}  // namespace visikv::jinja

// The values a Jinja template computes with (internal to formats/jinja*.cpp): Python's types as
// jinja2 sees them, with Python's str(), repr(), truth, equality, ordering and arithmetic, and
// json.dumps as transformers' tojson calls it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "visikv/core/error.h"

namespace visikv::jinja {

// A place in the template, for error messages.
struct Pos {
  int line = 0;
  int column = 0;
};

template <typename... Args>
[[noreturn]] void fail_at(Pos pos, Args&&... args) {
  fail("template line ", pos.line, ", column ", pos.column, ": ", std::forward<Args>(args)...);
}

struct Value;
struct ListData;
struct DictData;
struct Callable;
using ListPtr = std::shared_ptr<ListData>;
using DictPtr = std::shared_ptr<DictData>;
using CallablePtr = std::shared_ptr<const Callable>;

// jinja2's default Undefined; `hint` is the message jinja2 raises when it is used where that is
// an error ("'x' is undefined", "'dict object' has no attribute 'y'").
struct Undefined {
  std::string hint;
};
struct None {};

struct Value {
  std::variant<Undefined, None, bool, int64_t, double, std::string, ListPtr, DictPtr, CallablePtr>
      v;

  Value() : v(Undefined{}) {}
  template <typename T>
  requires(!std::is_same_v<std::decay_t<T>, Value>) Value(T&& value)
      : v(std::forward<T>(value)) {}  // NOLINT: values convert implicitly

  template <typename T>
  const T* as() const {
    return std::get_if<T>(&v);
  }
  bool is_undefined() const { return std::holds_alternative<Undefined>(v); }
  bool is_none() const { return std::holds_alternative<None>(v); }
  bool is_string() const { return std::holds_alternative<std::string>(v); }
  // Python's int includes bool.
  bool is_integer() const {
    return std::holds_alternative<int64_t>(v) || std::holds_alternative<bool>(v);
  }
  bool is_number() const { return is_integer() || std::holds_alternative<double>(v); }
};

// A list or a tuple (sandboxed templates cannot modify either; tuples differ in repr and equality).
struct ListData {
  std::vector<Value> items;
  bool tuple = false;
};

// A dict (string keys, insertion order) or a namespace() object, whose attributes `set` may assign.
struct DictData {
  std::vector<std::pair<std::string, Value>> entries;
  bool is_namespace = false;

  const Value* find(std::string_view key) const {
    for (const auto& [name, value] : entries)
      if (name == key) return &value;
    return nullptr;
  }
  void set(std::string key, Value value) {
    for (auto& [name, old] : entries)
      if (name == key) {
        old = std::move(value);
        return;
      }
    entries.emplace_back(std::move(key), std::move(value));
  }
};

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

class Renderer;
struct Callable {
  std::string name;
  std::function<Value(Renderer&, CallArgs&, Pos)> call;
};

inline Value make_list(std::vector<Value> items, bool tuple = false) {
  auto list = std::make_shared<ListData>();
  list->items = std::move(items);
  list->tuple = tuple;
  return list;
}
inline Value make_dict() { return std::make_shared<DictData>(); }

// Python's type name, as its error messages use it.
std::string type_name(const Value& value);
bool truthy(const Value& value);
// str(value): what {{ value }} prints (nothing for Undefined). `depth_limit` bounds recursion.
std::string to_str(const Value& value, int depth_limit);
std::string repr(const Value& value, int depth_limit);
std::string python_float_repr(double value);

bool equal(const Value& a, const Value& b, int depth_limit);
// a < b as Python orders them; throws (naming `pos`) for types Python does not order.
bool less(const Value& a, const Value& b, Pos pos, int depth_limit);

struct JsonStyle {
  std::optional<std::string> indent;  // nullopt: one line
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool ensure_ascii = false;
  bool sort_keys = false;
};
// json.dumps(value, ...); throws for values JSON cannot hold (Undefined, macros, namespaces).
std::string to_json(const Value& value, const JsonStyle& style, Pos pos, int depth_limit);

// The template's view of JSON input (objects keep their key order).
Value from_json(const nlohmann::ordered_json& json, int depth_limit);

// UTF-8 by code point, as Python's str indexes it. Strings here are valid UTF-8 (templates are
// checked when parsed, JSON input by nlohmann's parser).
std::vector<std::string> code_points(std::string_view text);
size_t code_point_count(std::string_view text);
bool python_isspace(char32_t c);
char32_t decode_utf8(std::string_view text, size_t& at);
void append_utf8(std::string& out, char32_t c);

}  // namespace visikv::jinja

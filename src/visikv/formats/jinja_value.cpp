#include "visikv/formats/jinja_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

namespace visikv::jinja {

namespace {

void check_depth(int depth_limit) {
  if (depth_limit <= 0)
    fail("template values nest too deeply (limit reached while printing or comparing)");
}

}  // namespace

char32_t decode_utf8(std::string_view text, size_t& at) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(at);
  int extra = lead < 0x80 ? 0 : lead < 0xE0 ? 1 : lead < 0xF0 ? 2 : 3;
  char32_t c = extra == 0   ? lead
               : extra == 1 ? (lead & 0x1F)
               : extra == 2 ? (lead & 0x0F)
                            : (lead & 0x07);
  ++at;
  for (int i = 0; i < extra && at < text.size(); ++i, ++at) c = (c << 6) | (byte(at) & 0x3F);
  return c;
}

void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

std::vector<std::string> code_points(std::string_view text) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at < text.size()) {
    const size_t start = at;
    decode_utf8(text, at);
    out.emplace_back(text.substr(start, at - start));
  }
  return out;
}

size_t code_point_count(std::string_view text) {
  // Every byte that is not a continuation byte starts a code point.
  return static_cast<size_t>(std::count_if(text.begin(), text.end(), [](char c) {
    return (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  }));
}

bool python_isspace(char32_t c) {
  // str.isspace(): Unicode White_Space plus the ASCII separators \x1c-\x1f.
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

std::string type_name(const Value& value) {
  struct Visitor {
    std::string operator()(const Undefined&) const { return "Undefined"; }
    std::string operator()(const None&) const { return "NoneType"; }
    std::string operator()(bool) const { return "bool"; }
    std::string operator()(int64_t) const { return "int"; }
    std::string operator()(double) const { return "float"; }
    std::string operator()(const std::string&) const { return "str"; }
    std::string operator()(const ListPtr& list) const { return list->tuple ? "tuple" : "list"; }
    std::string operator()(const DictPtr& dict) const {
      return dict->is_namespace ? "Namespace" : "dict";
    }
    std::string operator()(const CallablePtr&) const { return "function"; }
  };
  return std::visit(Visitor{}, value.v);
}

bool truthy(const Value& value) {
  struct Visitor {
    bool operator()(const Undefined&) const { return false; }
    bool operator()(const None&) const { return false; }
    bool operator()(bool b) const { return b; }
    bool operator()(int64_t i) const { return i != 0; }
    bool operator()(double d) const { return d != 0.0; }
    bool operator()(const std::string& s) const { return !s.empty(); }
    bool operator()(const ListPtr& list) const { return !list->items.empty(); }
    bool operator()(const DictPtr& dict) const {
      return dict->is_namespace || !dict->entries.empty();
    }
    bool operator()(const CallablePtr&) const { return true; }
  };
  return std::visit(Visitor{}, value.v);
}

std::string python_float_repr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value < 0 ? "-inf" : "inf";
  // Shortest round-trip digits (what repr() prints), then Python's layout: scientific below 1e-4
  // and from 1e16 on, positional otherwise, always with a '.' or an exponent.
  char buffer[64];
  const auto result =
      std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::scientific);
  std::string_view text(buffer, static_cast<size_t>(result.ptr - buffer));
  std::string sign;
  if (text.front() == '-') {
    sign = "-";
    text.remove_prefix(1);
  }
  const size_t e = text.find('e');
  std::string digits;
  for (char c : text.substr(0, e))
    if (c != '.') digits += c;
  const int exponent = std::stoi(std::string(text.substr(e + 1)));
  std::string out = sign;
  if (exponent < -4 || exponent >= 16) {
    out += digits[0];
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp_text[16];
    std::snprintf(exp_text, sizeof exp_text, "e%c%02d", exponent < 0 ? '-' : '+',
                  std::abs(exponent));
    return out + exp_text;
  }
  if (exponent < 0)
    return out + "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  const size_t int_digits = static_cast<size_t>(exponent) + 1;
  if (digits.size() <= int_digits)
    return out + digits + std::string(int_digits - digits.size(), '0') + ".0";
  return out + digits.substr(0, int_digits) + "." + digits.substr(int_digits);
}

namespace {

std::string repr_string(const std::string& s) {
  // Python picks single quotes unless the text has one and no double quote.
  const bool has_single = s.find('\'') != std::string::npos;
  const char quote = has_single && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, quote);
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == quote || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (u < 0x20 || u == 0x7F) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", u);
      out += hex;
    } else {
      out += c;
    }
  }
  return out + quote;
}

std::string repr_impl(const Value& value, int depth_limit, bool top);

std::string container_str(const Value& value, int depth_limit) {
  check_depth(depth_limit);
  if (const auto* list = value.as<ListPtr>()) {
    const auto& items = (*list)->items;
    std::string out = (*list)->tuple ? "(" : "[";
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out += ", ";
      out += repr_impl(items[i], depth_limit - 1, false);
    }
    if ((*list)->tuple && items.size() == 1) out += ",";
    return out + ((*list)->tuple ? ")" : "]");
  }
  const auto& dict = *value.as<DictPtr>();
  std::string out = dict->is_namespace ? "<Namespace {" : "{";
  for (size_t i = 0; i < dict->entries.size(); ++i) {
    if (i) out += ", ";
    out += repr_string(dict->entries[i].first) + ": " +
           repr_impl(dict->entries[i].second, depth_limit - 1, false);
  }
  return out + (dict->is_namespace ? "}>" : "}");
}

std::string repr_impl(const Value& value, int depth_limit, bool top) {
  if (const auto* s = value.as<std::string>()) return top ? *s : repr_string(*s);
  if (value.is_undefined()) return top ? "" : "Undefined";
  if (value.is_none()) return "None";
  if (const auto* b = value.as<bool>()) return *b ? "True" : "False";
  if (const auto* i = value.as<int64_t>()) return std::to_string(*i);
  if (const auto* d = value.as<double>()) return python_float_repr(*d);
  if (const auto* f = value.as<CallablePtr>()) return "<function " + (*f)->name + ">";
  return container_str(value, depth_limit);
}

}  // namespace

std::string to_str(const Value& value, int depth_limit) {
  return repr_impl(value, depth_limit, true);
}

std::string repr(const Value& value, int depth_limit) {
  if (const auto* s = value.as<std::string>()) return repr_string(*s);
  return repr_impl(value, depth_limit, false);
}

namespace {

double as_double(const Value& v) {
  if (const auto* b = v.as<bool>()) return *b ? 1.0 : 0.0;
  if (const auto* i = v.as<int64_t>()) return static_cast<double>(*i);
  return *v.as<double>();
}

std::optional<int64_t> as_int(const Value& v) {
  if (const auto* b = v.as<bool>()) return *b ? 1 : 0;
  if (const auto* i = v.as<int64_t>()) return *i;
  return std::nullopt;
}

}  // namespace

bool equal(const Value& a, const Value& b, int depth_limit) {
  check_depth(depth_limit);
  if (a.is_number() && b.is_number()) {
    const auto ia = as_int(a), ib = as_int(b);
    if (ia && ib) return *ia == *ib;
    return as_double(a) == as_double(b);
  }
  if (a.v.index() != b.v.index()) return false;
  if (a.is_undefined() || a.is_none()) return true;
  if (const auto* s = a.as<std::string>()) return *s == *b.as<std::string>();
  if (const auto* list = a.as<ListPtr>()) {
    const auto& other = *b.as<ListPtr>();
    if ((*list)->tuple != other->tuple || (*list)->items.size() != other->items.size())
      return false;
    for (size_t i = 0; i < other->items.size(); ++i)
      if (!equal((*list)->items[i], other->items[i], depth_limit - 1)) return false;
    return true;
  }
  if (const auto* dict = a.as<DictPtr>()) {
    const auto& other = *b.as<DictPtr>();
    if ((*dict)->is_namespace || other->is_namespace) return dict->get() == other.get();
    if ((*dict)->entries.size() != other->entries.size()) return false;
    for (const auto& [key, value] : (*dict)->entries) {
      const Value* found = other->find(key);
      if (!found || !equal(value, *found, depth_limit - 1)) return false;
    }
    return true;
  }
  return a.as<CallablePtr>()->get() == b.as<CallablePtr>()->get();
}

bool less(const Value& a, const Value& b, Pos pos, int depth_limit) {
  check_depth(depth_limit);
  if (a.is_undefined()) fail_at(pos, a.as<Undefined>()->hint);
  if (b.is_undefined()) fail_at(pos, b.as<Undefined>()->hint);
  if (a.is_number() && b.is_number()) {
    const auto ia = as_int(a), ib = as_int(b);
    if (ia && ib) return *ia < *ib;
    return as_double(a) < as_double(b);
  }
  if (a.is_string() && b.is_string()) return *a.as<std::string>() < *b.as<std::string>();
  const auto* la = a.as<ListPtr>();
  const auto* lb = b.as<ListPtr>();
  if (la && lb && (*la)->tuple == (*lb)->tuple) {
    const auto& x = (*la)->items;
    const auto& y = (*lb)->items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (equal(x[i], y[i], depth_limit - 1)) continue;
      return less(x[i], y[i], pos, depth_limit - 1);
    }
    return x.size() < y.size();
  }
  fail_at(pos, "'<' not supported between instances of '", type_name(a), "' and '", type_name(b),
          "'");
}

namespace {

void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  size_t at = 0;
  while (at < s.size()) {
    const size_t start = at;
    const char32_t c = decode_utf8(s, at);
    char hex[16];
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
          if (c >= 0x10000) {
            const char32_t v = c - 0x10000;
            std::snprintf(hex, sizeof hex, "\\u%04x\\u%04x",
                          static_cast<unsigned>(0xD800 + (v >> 10)),
                          static_cast<unsigned>(0xDC00 + (v & 0x3FF)));
          } else {
            std::snprintf(hex, sizeof hex, "\\u%04x", static_cast<unsigned>(c));
          }
          out += hex;
        } else {
          out.append(s, start, at - start);
        }
    }
  }
  out += '"';
}

void json_value(std::string& out, const Value& value, const JsonStyle& style, Pos pos,
                int depth_limit, int level) {
  if (depth_limit <= 0) fail_at(pos, "tojson: value nests too deeply");
  const auto newline = [&](int at_level) {
    out += '\n';
    for (int i = 0; i < at_level; ++i) out += *style.indent;
  };
  if (value.is_none()) {
    out += "null";
  } else if (const auto* b = value.as<bool>()) {
    out += *b ? "true" : "false";
  } else if (const auto* i = value.as<int64_t>()) {
    out += std::to_string(*i);
  } else if (const auto* d = value.as<double>()) {
    out += std::isnan(*d)   ? "NaN"
           : std::isinf(*d) ? (*d < 0 ? "-Infinity" : "Infinity")
                            : python_float_repr(*d);
  } else if (const auto* s = value.as<std::string>()) {
    json_string(out, *s, style.ensure_ascii);
  } else if (const auto* list = value.as<ListPtr>()) {
    const auto& items = (*list)->items;
    if (items.empty()) {
      out += "[]";
      return;
    }
    out += '[';
    for (size_t k = 0; k < items.size(); ++k) {
      if (k) out += style.item_separator;
      if (style.indent) newline(level + 1);
      json_value(out, items[k], style, pos, depth_limit - 1, level + 1);
    }
    if (style.indent) newline(level);
    out += ']';
  } else if (const auto* dict = value.as<DictPtr>(); dict && !(*dict)->is_namespace) {
    std::vector<const std::pair<std::string, Value>*> entries;
    for (const auto& entry : (*dict)->entries) entries.push_back(&entry);
    if (style.sort_keys)
      std::stable_sort(entries.begin(), entries.end(),
                       [](auto* x, auto* y) { return x->first < y->first; });
    if (entries.empty()) {
      out += "{}";
      return;
    }
    out += '{';
    for (size_t k = 0; k < entries.size(); ++k) {
      if (k) out += style.item_separator;
      if (style.indent) newline(level + 1);
      json_string(out, entries[k]->first, style.ensure_ascii);
      out += style.key_separator;
      json_value(out, entries[k]->second, style, pos, depth_limit - 1, level + 1);
    }
    if (style.indent) newline(level);
    out += '}';
  } else {
    fail_at(pos, "tojson: Object of type ", type_name(value), " is not JSON serializable");
  }
}

}  // namespace

std::string to_json(const Value& value, const JsonStyle& style, Pos pos, int depth_limit) {
  std::string out;
  json_value(out, value, style, pos, depth_limit, 0);
  return out;
}

Value from_json(const nlohmann::ordered_json& json, int depth_limit) {
  if (depth_limit <= 0) fail("template variables nest too deeply");
  switch (json.type()) {
    case nlohmann::ordered_json::value_t::null:
      return None{};
    case nlohmann::ordered_json::value_t::boolean:
      return json.get<bool>();
    case nlohmann::ordered_json::value_t::number_integer:
      return json.get<int64_t>();
    case nlohmann::ordered_json::value_t::number_unsigned: {
      const uint64_t u = json.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX))
        fail("template variable: integer ", u, " is too large");
      return static_cast<int64_t>(u);
    }
    case nlohmann::ordered_json::value_t::number_float:
      return json.get<double>();
    case nlohmann::ordered_json::value_t::string:
      return json.get<std::string>();
    case nlohmann::ordered_json::value_t::array: {
      std::vector<Value> items;
      items.reserve(json.size());
      for (const auto& item : json) items.push_back(from_json(item, depth_limit - 1));
      return make_list(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto dict = std::make_shared<DictData>();
      for (const auto& [key, item] : json.items())
        dict->entries.emplace_back(key, from_json(item, depth_limit - 1));
      return dict;
    }
    default:
      fail("template variables: binary JSON values are not supported");
  }
}

}  // namespace visikv::jinja

// Lexer and parser: template text -> Program. The lexer follows jinja2's (lexer.py) rules for
// whitespace in the environment transformers uses: newlines normalized to \n, one trailing newline
// dropped, `-` strips all whitespace on its side, trim_blocks drops the newline after a block or
// comment tag, lstrip_blocks drops the spaces and tabs before a block or comment tag that starts
// a line (unless the tag opens with `+`).
#include <algorithm>
#include <array>
#include <charconv>
#include <initializer_list>

#include "visikv/formats/jinja_ast.h"

namespace visikv::jinja {

namespace {

enum class Tok { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, End };

struct Token {
  Tok kind;
  std::string text;  // Data, Name, String (unescaped), Op
  int64_t integer = 0;
  double real = 0;
  Pos pos;
};

std::string_view describe(Tok kind) {
  switch (kind) {
    case Tok::Data:
      return "text";
    case Tok::VarBegin:
      return "'{{'";
    case Tok::VarEnd:
      return "'}}'";
    case Tok::BlockBegin:
      return "'{%'";
    case Tok::BlockEnd:
      return "'%}'";
    case Tok::Name:
      return "name";
    case Tok::String:
      return "string";
    case Tok::Int:
      return "integer";
    case Tok::Float:
      return "float";
    case Tok::Op:
      return "operator";
    case Tok::End:
      return "end of template";
  }
  return "token";
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// Python's str.rstrip() / the `\s` of jinja2's regexes, over code points.
std::string_view rstrip_space(std::string_view text) {
  size_t end = text.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
    size_t at = start;
    if (!python_isspace(decode_utf8(text, at))) break;
    end = start;
  }
  return text.substr(0, end);
}

size_t skip_space(std::string_view text, size_t at) {
  while (at < text.size()) {
    size_t next = at;
    if (!python_isspace(decode_utf8(text, next))) break;
    at = next;
  }
  return at;
}

class Lexer {
 public:
  explicit Lexer(std::string_view source) : src_(source) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    size_t pos = 0;
    bool line_starting = true;  // the last tag ended a line (or nothing came before)
    while (pos < src_.size()) {
      const size_t tag = find_tag(pos);
      std::string_view text =
          src_.substr(pos, (tag == std::string_view::npos ? src_.size() : tag) - pos);
      if (tag == std::string_view::npos) {
        push_data(text, pos);
        break;
      }
      const char kind = src_[tag + 1];
      size_t at = tag + 2;
      const char sign = at < src_.size() && (src_[at] == '-' || src_[at] == '+') ? src_[at] : 0;
      if (sign) ++at;
      if (sign == '-') {
        text = rstrip_space(text);
      } else if (sign != '+' && kind != '{') {
        const size_t newline = text.rfind('\n');
        const size_t line_start = newline == std::string_view::npos ? 0 : newline + 1;
        if ((line_start > 0 || line_starting) && line_start < text.size() &&
            skip_space(text, line_start) == text.size())
          text = text.substr(0, line_start);
      }
      push_data(text, pos);
      size_t end;
      if (kind == '#') {
        const size_t close = src_.find("#}", at);
        if (close == std::string_view::npos)
          fail_at(pos_of(tag), "unclosed comment: '{#' without '#}'");
        end = close + 2;
        if (close > at && src_[close - 1] == '-')
          end = skip_space(src_, end);
        else if (end < src_.size() && src_[end] == '\n')
          ++end;
      } else {
        end = lex_tag(kind == '{', tag, at);
      }
      line_starting = end > 0 && src_[end - 1] == '\n';
      pos = end;
    }
    tokens_.push_back({Tok::End, "", 0, 0, pos_of(src_.size())});
    return std::move(tokens_);
  }

 private:
  Pos pos_of(size_t offset) const {
    const auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), offset);
    const size_t line = static_cast<size_t>(it - line_starts_.begin());
    return {static_cast<int>(line), static_cast<int>(offset - line_starts_[line - 1] + 1)};
  }

  size_t find_tag(size_t from) const {
    for (size_t at = src_.find('{', from); at != std::string_view::npos;
         at = src_.find('{', at + 1))
      if (at + 1 < src_.size() &&
          (src_[at + 1] == '{' || src_[at + 1] == '%' || src_[at + 1] == '#'))
        return at;
    return std::string_view::npos;
  }

  void push_data(std::string_view text, size_t offset) {
    if (!text.empty()) tokens_.push_back({Tok::Data, std::string(text), 0, 0, pos_of(offset)});
  }

  // Lexes the inside of a {{ }} or {% %} tag opened at `tag` (contents from `at`); returns the
  // offset after its closing delimiter and the whitespace control that follows it.
  size_t lex_tag(bool variable, size_t tag, size_t at) {
    tokens_.push_back({variable ? Tok::VarBegin : Tok::BlockBegin, "", 0, 0, pos_of(tag)});
    const std::string_view close = variable ? "}}" : "%}";
    int brackets = 0;  // as jinja2, '}}' inside open brackets closes a dict, not the tag
    while (true) {
      while (at < src_.size() && is_space(src_[at])) ++at;
      if (at >= src_.size())
        fail_at(pos_of(tag), "unclosed tag: '", variable ? "{{" : "{%", "' without '", close, "'");
      if (brackets == 0) {
        const bool minus = src_[at] == '-' && src_.substr(at + 1, 2) == close;
        if (minus || src_.substr(at, 2) == close) {
          tokens_.push_back({variable ? Tok::VarEnd : Tok::BlockEnd, "", 0, 0, pos_of(at)});
          size_t end = at + (minus ? 3 : 2);
          if (minus) return skip_space(src_, end);
          if (!variable && end < src_.size() && src_[end] == '\n') ++end;
          if (!variable && is_raw_start()) return lex_raw(end);
          return end;
        }
      }
      const char c = src_[at];
      const Pos pos = pos_of(at);
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t end = at;
        while (end < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[end])) || src_[end] == '_'))
          ++end;
        tokens_.push_back({Tok::Name, std::string(src_.substr(at, end - at)), 0, 0, pos});
        at = end;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        at = lex_number(at);
      } else if (c == '\'' || c == '"') {
        at = lex_string(at);
      } else {
        static constexpr std::array<std::string_view, 25> kOps = {
            "**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
            ">",  "=",  ".",  ",",  ":",  "|",  "(", ")", "[", "]", "{", "}"};
        const auto op = std::find_if(kOps.begin(), kOps.end(), [&](std::string_view o) {
          return src_.substr(at, o.size()) == o;
        });
        if (op == kOps.end()) fail_at(pos, "unexpected character '", c, "'");
        if (*op == "(" || *op == "[" || *op == "{") ++brackets;
        if (*op == ")" || *op == "]" || *op == "}") {
          if (brackets == 0) fail_at(pos, "unexpected '", *op, "'");
          --brackets;
        }
        tokens_.push_back({Tok::Op, std::string(*op), 0, 0, pos});
        at += op->size();
      }
    }
  }

  size_t lex_number(size_t at) {
    const Pos pos = pos_of(at);
    size_t end = at;
    const auto digits = [&](auto is_digit) {
      while (end < src_.size() &&
             (is_digit(src_[end]) ||
              (src_[end] == '_' && end + 1 < src_.size() && is_digit(src_[end + 1]))))
        ++end;
    };
    const auto decimal = [](char c) { return c >= '0' && c <= '9'; };
    std::string clean;
    if (src_[at] == '0' && at + 1 < src_.size() &&
        std::string_view("xXoObB").find(src_[at + 1]) != std::string_view::npos) {
      const char prefix = static_cast<char>(std::tolower(static_cast<unsigned char>(src_[at + 1])));
      const int base = prefix == 'x' ? 16 : prefix == 'o' ? 8 : 2;
      end = at + 2;
      digits([&](char c) {
        return std::isxdigit(static_cast<unsigned char>(c)) &&
               std::stoi(std::string(1, c), nullptr, 16) < base;
      });
      for (char c : src_.substr(at + 2, end - at - 2))
        if (c != '_') clean += c;
      int64_t value = 0;
      const auto result = std::from_chars(clean.data(), clean.data() + clean.size(), value, base);
      if (clean.empty() || result.ec != std::errc()) fail_at(pos, "invalid integer literal");
      tokens_.push_back({Tok::Int, "", value, 0, pos});
      return end;
    }
    digits(decimal);
    bool is_float = false;
    if (end + 1 < src_.size() && src_[end] == '.' && decimal(src_[end + 1])) {
      is_float = true;
      ++end;
      digits(decimal);
    }
    if (end < src_.size() && (src_[end] == 'e' || src_[end] == 'E')) {
      size_t exp = end + 1;
      if (exp < src_.size() && (src_[exp] == '+' || src_[exp] == '-')) ++exp;
      if (exp < src_.size() && decimal(src_[exp])) {
        is_float = true;
        end = exp;
        digits(decimal);
      }
    }
    for (char c : src_.substr(at, end - at))
      if (c != '_') clean += c;
    if (is_float) {
      double value = 0;
      const auto result = std::from_chars(clean.data(), clean.data() + clean.size(), value);
      if (result.ec != std::errc()) fail_at(pos, "invalid float literal '", clean, "'");
      tokens_.push_back({Tok::Float, "", 0, value, pos});
    } else {
      int64_t value = 0;
      const auto result = std::from_chars(clean.data(), clean.data() + clean.size(), value);
      if (result.ec != std::errc()) fail_at(pos, "integer literal '", clean, "' is out of range");
      tokens_.push_back({Tok::Int, "", value, 0, pos});
    }
    return end;
  }

  // A string literal with Python's escapes (jinja2 decodes them with "unicode-escape"; an unknown
  // escape such as \d stays as written).
  size_t lex_string(size_t at) {
    const Pos pos = pos_of(at);
    const char quote = src_[at];
    std::string value;
    size_t i = at + 1;
    const auto hex = [&](size_t count) {
      if (i + count > src_.size()) fail_at(pos_of(i), "truncated escape in string literal");
      uint32_t code = 0;
      const auto result = std::from_chars(src_.data() + i, src_.data() + i + count, code, 16);
      if (result.ptr != src_.data() + i + count)
        fail_at(pos_of(i), "invalid escape in string literal");
      if (code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF))
        fail_at(pos_of(i), "escape is not a Unicode scalar value");
      i += count;
      append_utf8(value, code);
    };
    while (true) {
      if (i >= src_.size()) fail_at(pos, "unterminated string literal");
      const char c = src_[i];
      if (c == quote) break;
      if (c != '\\') {
        value += c;
        ++i;
        continue;
      }
      if (i + 1 >= src_.size()) fail_at(pos, "unterminated string literal");
      const char e = src_[i + 1];
      i += 2;
      switch (e) {
        case 'n':
          value += '\n';
          break;
        case 't':
          value += '\t';
          break;
        case 'r':
          value += '\r';
          break;
        case '\\':
          value += '\\';
          break;
        case '\'':
          value += '\'';
          break;
        case '"':
          value += '"';
          break;
        case 'a':
          value += '\a';
          break;
        case 'b':
          value += '\b';
          break;
        case 'f':
          value += '\f';
          break;
        case 'v':
          value += '\v';
          break;
        case '\n':
          break;  // a backslash before a newline continues the line
        case 'x':
          hex(2);
          break;
        case 'u':
          hex(4);
          break;
        case 'U':
          hex(8);
          break;
        default:
          if (e >= '0' && e <= '7') {
            uint32_t code = static_cast<uint32_t>(e - '0');
            for (int k = 0; k < 2 && i < src_.size() && src_[i] >= '0' && src_[i] <= '7'; ++k, ++i)
              code = code * 8 + static_cast<uint32_t>(src_[i] - '0');
            append_utf8(value, code);
          } else {
            value += '\\';
            value += e;
          }
      }
    }
    tokens_.push_back({Tok::String, std::move(value), 0, 0, pos});
    return i + 1;
  }

  // The tokens just pushed are `{% raw %}`.
  bool is_raw_start() const {
    const size_t n = tokens_.size();
    return n >= 3 && tokens_[n - 3].kind == Tok::BlockBegin && tokens_[n - 2].kind == Tok::Name &&
           tokens_[n - 2].text == "raw" && tokens_[n - 1].kind == Tok::BlockEnd;
  }

  // Everything up to {% endraw %} is text.
  size_t lex_raw(size_t at) {
    const Pos pos = tokens_[tokens_.size() - 3].pos;
    tokens_.resize(tokens_.size() - 3);
    for (size_t open = src_.find("{%", at); open != std::string_view::npos;
         open = src_.find("{%", open + 1)) {
      size_t i = open + 2;
      const bool minus = i < src_.size() && src_[i] == '-';
      if (i < src_.size() && (src_[i] == '-' || src_[i] == '+')) ++i;
      while (i < src_.size() && is_space(src_[i])) ++i;
      if (src_.substr(i, 6) != "endraw") continue;
      i += 6;
      while (i < src_.size() && is_space(src_[i])) ++i;
      const bool close_minus = i < src_.size() && src_[i] == '-';
      if (close_minus) ++i;
      if (src_.substr(i, 2) != "%}") continue;
      std::string_view text = src_.substr(at, open - at);
      if (minus) text = rstrip_space(text);
      push_data(text, at);
      size_t end = i + 2;
      if (close_minus)
        end = skip_space(src_, end);
      else if (end < src_.size() && src_[end] == '\n')
        ++end;
      return end;
    }
    fail_at(pos, "'{% raw %}' without '{% endraw %}'");
  }

  std::string_view src_;
  std::vector<size_t> line_starts_;
  std::vector<Token> tokens_;
};

// ---------------------------------------------------------------------------------------------

class Parser {
 public:
  Parser(std::vector<Token> tokens, const Limits& limits)
      : t_(std::move(tokens)), limits_(limits) {}

  Body parse_template() {
    std::string end;
    Body body = parse_body({}, end, Pos{});
    return body;
  }

 private:
  // Counts nesting (blocks and expressions) against the limit while it lives.
  class DepthGuard {
   public:
    DepthGuard(Parser& parser, Pos pos) : parser_(parser) {
      if (++parser_.depth_ > parser_.limits_.max_depth)
        fail_at(pos, "template nests deeper than ", parser_.limits_.max_depth, " levels");
    }
    ~DepthGuard() { --parser_.depth_; }
    DepthGuard(const DepthGuard&) = delete;
    DepthGuard& operator=(const DepthGuard&) = delete;

   private:
    Parser& parser_;
  };

  const Token& peek(size_t ahead = 0) const { return t_[std::min(i_ + ahead, t_.size() - 1)]; }
  const Token& next() {
    const Token& token = t_[i_];
    if (i_ + 1 < t_.size()) ++i_;
    return token;
  }
  bool at_op(std::string_view op) const { return peek().kind == Tok::Op && peek().text == op; }
  bool at_name(std::string_view name) const {
    return peek().kind == Tok::Name && peek().text == name;
  }
  bool skip_op(std::string_view op) {
    if (!at_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(std::string_view name) {
    if (!at_name(name)) return false;
    next();
    return true;
  }
  [[noreturn]] void unexpected(std::string_view wanted) const {
    const Token& token = peek();
    std::string got(describe(token.kind));
    if (token.kind == Tok::Name || token.kind == Tok::Op) got += " '" + token.text + "'";
    fail_at(token.pos, "expected ", wanted, ", got ", got);
  }
  void expect_op(std::string_view op) {
    if (!skip_op(op)) unexpected("'" + std::string(op) + "'");
  }
  void expect(Tok kind) {
    if (peek().kind != kind) unexpected(describe(kind));
    next();
  }
  std::string expect_name() {
    if (peek().kind != Tok::Name) unexpected("a name");
    return next().text;
  }

  // Statements up to a block tag whose name is in `ends` (left unconsumed, its name in `end`).
  Body parse_body(std::initializer_list<std::string_view> ends, std::string& end, Pos opened) {
    const DepthGuard guard(*this, opened);
    Body body;
    while (true) {
      const Token& token = peek();
      if (token.kind == Tok::End) {
        if (ends.size() == 0) return body;
        fail_at(opened, "block is not closed: expected '{% ", *ends.begin(),
                " %}' before the end of the template");
      }
      if (token.kind == Tok::Data) {
        auto stmt = make_stmt(Stmt::Kind::Text, token.pos);
        stmt->text = next().text;
        body.push_back(std::move(stmt));
      } else if (token.kind == Tok::VarBegin) {
        auto stmt = make_stmt(Stmt::Kind::Output, next().pos);
        stmt->expr = parse_tuple_expression();
        expect(Tok::VarEnd);
        body.push_back(std::move(stmt));
      } else if (token.kind == Tok::BlockBegin) {
        const Token& name = peek(1);
        if (name.kind != Tok::Name) {
          next();
          unexpected("a statement name");
        }
        if (std::find(ends.begin(), ends.end(), name.text) != ends.end()) {
          next();
          end = next().text;
          return body;
        }
        body.push_back(parse_statement());
      } else {
        unexpected("text or a tag");
      }
    }
  }

  static StmtPtr make_stmt(Stmt::Kind kind, Pos pos) {
    auto stmt = std::make_unique<Stmt>();
    stmt->kind = kind;
    stmt->pos = pos;
    return stmt;
  }

  StmtPtr parse_statement() {
    const Pos pos = next().pos;  // {%
    const Token& name_token = peek();
    const std::string name = next().text;
    std::string end;
    if (name == "if") {
      auto stmt = make_stmt(Stmt::Kind::If, pos);
      ExprPtr condition = parse_expression();
      while (true) {
        expect(Tok::BlockEnd);
        Body body = parse_body({"elif", "else", "endif"}, end, pos);
        stmt->branches.emplace_back(std::move(condition), std::move(body));
        if (end == "elif") {
          condition = parse_expression();
        } else if (end == "else") {
          expect(Tok::BlockEnd);
          stmt->branches.emplace_back(nullptr, parse_body({"endif"}, end, pos));
          break;
        } else {
          break;
        }
      }
      expect(Tok::BlockEnd);
      return stmt;
    }
    if (name == "for") {
      auto stmt = make_stmt(Stmt::Kind::For, pos);
      do {
        stmt->targets.push_back({expect_name(), ""});
      } while (skip_op(","));
      if (!skip_name("in")) unexpected("'in'");
      stmt->expr = parse_tuple_expression(/*with_condition=*/false);
      if (skip_name("if")) stmt->condition = parse_expression();
      if (at_name("recursive")) fail_at(peek().pos, "recursive loops are not supported");
      expect(Tok::BlockEnd);
      ++loops_;
      stmt->body = parse_body({"else", "endfor"}, end, pos);
      --loops_;
      if (end == "else") {
        expect(Tok::BlockEnd);
        stmt->else_body = parse_body({"endfor"}, end, pos);
      }
      expect(Tok::BlockEnd);
      return stmt;
    }
    if (name == "set") {
      auto stmt = make_stmt(Stmt::Kind::Set, pos);
      do {
        Target target{expect_name(), ""};
        if (skip_op(".")) target.attribute = expect_name();
        stmt->targets.push_back(std::move(target));
      } while (skip_op(","));
      if (skip_op("=")) {
        stmt->expr = parse_tuple_expression();
        expect(Tok::BlockEnd);
        return stmt;
      }
      if (stmt->targets.size() != 1 || !stmt->targets[0].attribute.empty()) unexpected("'='");
      expect(Tok::BlockEnd);
      stmt->kind = Stmt::Kind::SetBlock;
      stmt->body = parse_body({"endset"}, end, pos);
      expect(Tok::BlockEnd);
      return stmt;
    }
    if (name == "macro") {
      auto stmt = make_stmt(Stmt::Kind::Macro, pos);
      stmt->text = expect_name();
      parse_params(*stmt);
      expect(Tok::BlockEnd);
      const int loops = std::exchange(loops_, 0);
      stmt->body = parse_body({"endmacro"}, end, pos);
      loops_ = loops;
      expect(Tok::BlockEnd);
      return stmt;
    }
    if (name == "call") {
      auto stmt = make_stmt(Stmt::Kind::CallBlock, pos);
      if (at_op("(")) parse_params(*stmt);
      stmt->expr = parse_expression();
      if (stmt->expr->kind != Expr::Kind::Call)
        fail_at(stmt->expr->pos, "'{% call %}' needs a call");
      expect(Tok::BlockEnd);
      const int loops = std::exchange(loops_, 0);
      stmt->body = parse_body({"endcall"}, end, pos);
      loops_ = loops;
      expect(Tok::BlockEnd);
      return stmt;
    }
    if (name == "filter") {
      auto stmt = make_stmt(Stmt::Kind::FilterBlock, pos);
      stmt->expr = parse_filter(nullptr, peek().pos);
      while (skip_op("|")) stmt->expr = parse_filter(std::move(stmt->expr), peek().pos);
      expect(Tok::BlockEnd);
      stmt->body = parse_body({"endfilter"}, end, pos);
      expect(Tok::BlockEnd);
      return stmt;
    }
    if (name == "break" || name == "continue") {
      if (loops_ == 0) fail_at(name_token.pos, "'", name, "' outside of a loop");
      expect(Tok::BlockEnd);
      return make_stmt(name == "break" ? Stmt::Kind::Break : Stmt::Kind::Continue, pos);
    }
    if (name == "generation") {
      auto stmt = make_stmt(Stmt::Kind::Scope, pos);
      expect(Tok::BlockEnd);
      stmt->body = parse_body({"endgeneration"}, end, pos);
      expect(Tok::BlockEnd);
      return stmt;
    }
    fail_at(name_token.pos, "unknown or unsupported tag '", name, "'");
  }

  void parse_params(Stmt& stmt) {
    expect_op("(");
    while (!at_op(")")) {
      MacroParam param{expect_name(), nullptr};
      if (skip_op("=")) param.default_value = parse_expression();
      stmt.params.push_back(std::move(param));
      if (!skip_op(",")) break;
    }
    expect_op(")");
  }

  static ExprPtr make_expr(Expr::Kind kind, Pos pos) {
    auto expr = std::make_unique<Expr>();
    expr->kind = kind;
    expr->pos = pos;
    return expr;
  }

  // `a, b` without brackets is a tuple where jinja2 allows it ({{ }}, set, for ... in).
  ExprPtr parse_tuple_expression(bool with_condition = true) {
    const Pos pos = peek().pos;
    ExprPtr first = with_condition ? parse_expression() : parse_or();
    if (!at_op(",")) return first;
    auto tuple = make_expr(Expr::Kind::Tuple, pos);
    tuple->items.push_back(std::move(first));
    while (skip_op(",")) {
      if (peek().kind == Tok::VarEnd || peek().kind == Tok::BlockEnd || at_name("if")) break;
      tuple->items.push_back(with_condition ? parse_expression() : parse_or());
    }
    return tuple;
  }

  ExprPtr parse_expression() {
    const DepthGuard guard(*this, peek().pos);
    ExprPtr value = parse_or();
    while (at_name("if")) {
      auto conditional = make_expr(Expr::Kind::Conditional, next().pos);
      conditional->items.push_back(parse_or());
      conditional->items.insert(conditional->items.begin() + 1, std::move(value));
      if (skip_name("else"))
        conditional->items.push_back(parse_expression());
      else
        conditional->items.push_back(nullptr);
      // items: condition, value, else
      value = std::move(conditional);
    }
    return value;
  }

  ExprPtr binary(std::string op, ExprPtr left, ExprPtr right, Pos pos) {
    auto expr = make_expr(Expr::Kind::Binary, pos);
    expr->name = std::move(op);
    expr->items.push_back(std::move(left));
    expr->items.push_back(std::move(right));
    return expr;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (at_name("or")) {
      const Pos pos = next().pos;
      left = binary("or", std::move(left), parse_and(), pos);
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (at_name("and")) {
      const Pos pos = next().pos;
      left = binary("and", std::move(left), parse_not(), pos);
    }
    return left;
  }

  ExprPtr parse_not() {
    if (at_name("not")) {
      const DepthGuard guard(*this, peek().pos);
      auto expr = make_expr(Expr::Kind::Unary, next().pos);
      expr->name = "not";
      expr->items.push_back(parse_not());
      return expr;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    ExprPtr left = parse_math1();
    while (true) {
      const Pos pos = peek().pos;
      std::string op;
      if (peek().kind == Tok::Op &&
          (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
           peek().text == "<=" || peek().text == ">" || peek().text == ">=")) {
        op = next().text;
      } else if (skip_name("in")) {
        op = "in";
      } else if (at_name("not") && peek(1).kind == Tok::Name && peek(1).text == "in") {
        next();
        next();
        op = "not in";
      } else {
        return left;
      }
      left = binary(op, std::move(left), parse_math1(), pos);
    }
  }

  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (at_op("+") || at_op("-")) {
      const Token& op = next();
      left = binary(op.text, std::move(left), parse_concat(), op.pos);
    }
    return left;
  }

  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (at_op("~")) {
      const Pos pos = next().pos;
      left = binary("~", std::move(left), parse_math2(), pos);
    }
    return left;
  }

  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (at_op("*") || at_op("/") || at_op("//") || at_op("%")) {
      const Token& op = next();
      left = binary(op.text, std::move(left), parse_pow(), op.pos);
    }
    return left;
  }

  ExprPtr parse_pow() {
    ExprPtr left = parse_unary(true);
    while (at_op("**")) {
      const Pos pos = next().pos;
      left = binary("**", std::move(left), parse_unary(true), pos);
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    const DepthGuard guard(*this, peek().pos);
    ExprPtr node;
    if (at_op("-") || at_op("+")) {
      const Token& op = next();
      node = make_expr(Expr::Kind::Unary, op.pos);
      node->name = op.text;
      node->items.push_back(parse_unary(false));
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    if (!with_filter) return node;
    while (true) {
      if (at_op("|")) {
        const Pos pos = next().pos;
        node = parse_filter(std::move(node), pos);
      } else if (at_name("is")) {
        node = parse_test(std::move(node));
      } else if (at_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_primary() {
    const Token& token = peek();
    const Pos pos = token.pos;
    if (token.kind == Tok::Name) {
      const std::string name = next().text;
      auto literal = make_expr(Expr::Kind::Literal, pos);
      if (name == "true" || name == "True") {
        literal->literal = true;
      } else if (name == "false" || name == "False") {
        literal->literal = false;
      } else if (name == "none" || name == "None") {
        literal->literal = None{};
      } else {
        literal->kind = Expr::Kind::Name;
        literal->name = name;
      }
      return literal;
    }
    if (token.kind == Tok::String) {
      std::string text;
      while (peek().kind == Tok::String) text += next().text;
      auto literal = make_expr(Expr::Kind::Literal, pos);
      literal->literal = std::move(text);
      return literal;
    }
    if (token.kind == Tok::Int || token.kind == Tok::Float) {
      auto literal = make_expr(Expr::Kind::Literal, pos);
      if (token.kind == Tok::Int)
        literal->literal = token.integer;
      else
        literal->literal = token.real;
      next();
      return literal;
    }
    if (skip_op("(")) {
      if (skip_op(")")) return make_expr(Expr::Kind::Tuple, pos);
      ExprPtr first = parse_expression();
      if (skip_op(")")) return first;
      auto tuple = make_expr(Expr::Kind::Tuple, pos);
      tuple->items.push_back(std::move(first));
      while (skip_op(",")) {
        if (at_op(")")) break;
        tuple->items.push_back(parse_expression());
      }
      expect_op(")");
      return tuple;
    }
    if (skip_op("[")) {
      auto list = make_expr(Expr::Kind::List, pos);
      while (!at_op("]")) {
        list->items.push_back(parse_expression());
        if (!skip_op(",")) break;
      }
      expect_op("]");
      return list;
    }
    if (skip_op("{")) {
      auto dict = make_expr(Expr::Kind::Dict, pos);
      while (!at_op("}")) {
        dict->items.push_back(parse_expression());
        expect_op(":");
        dict->items.push_back(parse_expression());
        if (!skip_op(",")) break;
      }
      expect_op("}");
      return dict;
    }
    unexpected("an expression");
  }

  ExprPtr parse_postfix(ExprPtr node) {
    while (true) {
      const Pos pos = peek().pos;
      if (skip_op(".")) {
        if (peek().kind == Tok::Int) {
          auto subscript = make_expr(Expr::Kind::Subscript, pos);
          subscript->items.push_back(std::move(node));
          auto index = make_expr(Expr::Kind::Literal, pos);
          index->literal = next().integer;
          subscript->items.push_back(std::move(index));
          node = std::move(subscript);
        } else {
          auto attribute = make_expr(Expr::Kind::Attribute, pos);
          attribute->name = expect_name();
          attribute->items.push_back(std::move(node));
          node = std::move(attribute);
        }
      } else if (skip_op("[")) {
        node = parse_subscript(std::move(node), pos);
      } else if (at_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr object, Pos pos) {
    std::array<ExprPtr, 3> parts;
    bool slice = false;
    for (size_t k = 0; k < 3; ++k) {
      if (!at_op(":") && !at_op("]")) parts[k] = parse_expression();
      if (k < 2 && skip_op(":")) {
        slice = true;
        continue;
      }
      break;
    }
    expect_op("]");
    auto node = make_expr(slice ? Expr::Kind::Slice : Expr::Kind::Subscript, pos);
    node->items.push_back(std::move(object));
    if (!slice && !parts[0]) fail_at(pos, "empty subscript");
    for (size_t k = 0; k < (slice ? 3u : 1u); ++k) node->items.push_back(std::move(parts[k]));
    return node;
  }

  // Arguments after '(' into expr->items (after what is there) and expr->keyword.
  void parse_arguments(Expr& expr) {
    expect_op("(");
    while (!at_op(")")) {
      if (at_op("*") || at_op("**"))
        fail_at(peek().pos, "*args and **kwargs in calls are not supported");
      if (peek().kind == Tok::Name && peek(1).kind == Tok::Op && peek(1).text == "=") {
        std::string key = next().text;
        next();
        expr.keyword.emplace_back(std::move(key), parse_expression());
      } else {
        if (!expr.keyword.empty())
          fail_at(peek().pos, "positional argument after keyword argument");
        expr.items.push_back(parse_expression());
      }
      if (!skip_op(",")) break;
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto call = make_expr(Expr::Kind::Call, peek().pos);
    call->items.push_back(std::move(callee));
    parse_arguments(*call);
    return call;
  }

  ExprPtr parse_filter(ExprPtr operand, Pos pos) {
    auto filter = make_expr(Expr::Kind::Filter, pos);
    const Pos name_pos = peek().pos;
    filter->name = expect_name();
    while (at_op(".")) {
      next();
      filter->name += "." + expect_name();
    }
    if (!is_known_filter(filter->name)) fail_at(name_pos, "no filter named '", filter->name, "'");
    filter->items.push_back(std::move(operand));
    if (at_op("(")) parse_arguments(*filter);
    return filter;
  }

  ExprPtr parse_test(ExprPtr operand) {
    auto test = make_expr(Expr::Kind::Test, next().pos);  // is
    test->negated = skip_name("not");
    const Pos name_pos = peek().pos;
    if (peek().kind == Tok::Name) {
      test->name = next().text;
    } else if (peek().kind == Tok::Op &&
               (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                peek().text == "<=" || peek().text == ">" || peek().text == ">=")) {
      test->name = next().text;
    } else {
      unexpected("a test name");
    }
    if (!is_known_test(test->name)) fail_at(name_pos, "no test named '", test->name, "'");
    test->items.push_back(std::move(operand));
    if (at_op("(")) {
      parse_arguments(*test);
    } else if ((peek().kind == Tok::Name && peek().text != "else" && peek().text != "or" &&
                peek().text != "and" && peek().text != "if" && peek().text != "is" &&
                peek().text != "in" && peek().text != "not") ||
               peek().kind == Tok::String || peek().kind == Tok::Int || peek().kind == Tok::Float ||
               at_op("[") || at_op("{")) {
      // `x is divisibleby 3`: one argument without brackets.
      test->items.push_back(parse_postfix(parse_primary()));
    }
    return test;
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  const Limits& limits_;
  int depth_ = 0;
  int loops_ = 0;  // enclosing for loops (break/continue need one)
};

// Newlines become \n and one trailing newline goes, as jinja2 reads a source.
std::string normalize_source(std::string_view source) {
  std::string out;
  out.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      out += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      out += source[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

void require_utf8(std::string_view source) {
  int line = 1;
  size_t line_start = 0;
  for (size_t i = 0; i < source.size();) {
    const auto b = static_cast<unsigned char>(source[i]);
    if (b == '\n') {
      ++line;
      line_start = i + 1;
    }
    const size_t length = b < 0x80         ? 1
                          : (b >> 5) == 6  ? 2
                          : (b >> 4) == 14 ? 3
                          : (b >> 3) == 30 ? 4
                                           : 0;
    bool ok = length > 0 && i + length <= source.size();
    for (size_t k = 1; ok && k < length; ++k)
      ok = (static_cast<unsigned char>(source[i + k]) & 0xC0) == 0x80;
    if (ok && length > 1) {
      size_t at = i;
      const char32_t c = decode_utf8(source, at);
      const char32_t min = length == 2 ? 0x80 : length == 3 ? 0x800 : 0x10000;
      ok = c >= min && c <= 0x10FFFF && !(c >= 0xD800 && c <= 0xDFFF);
    }
    if (!ok)
      fail("template line ", line, ", column ", i - line_start + 1,
           ": the template is not valid UTF-8");
    i += length;
  }
}

}  // namespace

Program parse_program(std::string_view source, const Limits& limits) {
  if (source.size() > limits.max_template_bytes)
    fail("template is ", source.size(), " bytes, over the limit of ", limits.max_template_bytes);
  require_utf8(source);
  const std::string text = normalize_source(source);
  Program program;
  program.limits = limits;
  program.body = Parser(Lexer(text).run(), limits).parse_template();
  return program;
}

}  // namespace visikv::jinja

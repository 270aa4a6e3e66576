// The syntax tree of a Jinja template (internal to formats/jinja*.cpp): jinja_parse.cpp builds it,
// jinja_render.cpp walks it.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "visikv/formats/jinja.h"
#include "visikv/formats/jinja_value.h"

namespace visikv::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    Literal,      // literal
    Name,         // name
    List,         // items
    Tuple,        // items
    Dict,         // items: key, value, key, value, ...
    Attribute,    // items[0].name
    Subscript,    // items[0][items[1]]
    Slice,        // items[0][items[1]:items[2]:items[3]] (any of 1-3 may be null)
    Call,         // items[0](items[1:], keyword)
    Filter,       // items[0] | name(items[1:], keyword)
    Test,         // items[0] is [not] name(items[1:], keyword)
    Unary,        // name ("-", "+", "not") items[0]
    Binary,       // items[0] name items[1]; "and"/"or" short-circuit
    Conditional,  // items[1] if items[0] else items[2] (null: undefined)
  };
  Kind kind;
  Pos pos;
  Value literal;
  std::string name;
  bool negated = false;  // Test: `is not`
  std::vector<ExprPtr> items;
  std::vector<std::pair<std::string, ExprPtr>> keyword;
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

// A name a for loop or set assigns: a plain name, or (set only) `object.attribute`.
struct Target {
  std::string name;
  std::string attribute;
};

struct MacroParam {
  std::string name;
  ExprPtr default_value;  // may be null
};

struct Stmt {
  enum class Kind {
    Text,         // text
    Output,       // {{ expr }}
    If,           // branches (a null condition is the else branch)
    For,          // targets in expr [if condition]: body, else_body
    Set,          // targets = expr
    SetBlock,     // targets[0] = rendered body
    Macro,        // name(params): body
    CallBlock,    // expr (a call), with `caller(params)` rendering body
    FilterBlock,  // body rendered, then the filter chain in expr (its innermost operand null)
    Break,
    Continue,
    Scope,  // body rendered in place (transformers' {% generation %})
  };
  Kind kind;
  Pos pos;
  std::string text;
  ExprPtr expr;
  ExprPtr condition;
  std::vector<std::pair<ExprPtr, Body>> branches;
  std::vector<Target> targets;
  std::vector<MacroParam> params;
  Body body;
  Body else_body;
};

struct Program {
  Body body;
  Limits limits;
};

// The filters and tests a template may name; an unknown one is a syntax error, as in jinja2.
bool is_known_filter(std::string_view name);
bool is_known_test(std::string_view name);

Program parse_program(std::string_view source, const Limits& limits);

}  // namespace visikv::jinja

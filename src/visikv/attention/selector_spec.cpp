#include "visikv/attention/selector_spec.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/spec_fields.h"

namespace visikv {

namespace {

// Positions are int32 in a PositionSet, so no size may exceed that.
int64_t parse_count(std::string_view spec, std::string_view field, std::string_view digits,
                    int64_t minimum) {
  int64_t value = -1;
  const bool all_digits =
      !digits.empty() && digits.find_first_not_of("0123456789") == std::string_view::npos;
  const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  require(all_digits && error == std::errc() && end == digits.data() + digits.size() &&
              value <= std::numeric_limits<int32_t>::max(),
          "selector spec '", spec, "': field '", field, "' needs a non-negative integer");
  require(value >= minimum, "selector spec '", spec, "': field '", field, "' must be at least ",
          minimum);
  return value;
}

double parse_epsilon(std::string_view spec, std::string_view field, std::string_view text) {
  // std::from_chars for double is available in g++ 12; reject signs, spaces and trailing bytes.
  double value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  require(!text.empty() && error == std::errc() && end == text.data() + text.size() &&
              std::isfinite(value) && value > 0 && value < 1,
          "selector spec '", spec, "': field '", field, "' needs a number with 0 < eps < 1");
  return value;
}

}  // namespace

SelectorSpec parse_selector_spec(std::string_view text) {
  const std::vector<std::string_view> fields = split_fields(text);
  SelectorSpec spec;
  const std::string_view kind = fields[0];
  if (kind == "dense") {
    require(fields.size() == 1, "selector spec '", text, "': 'dense' takes no fields");
    return spec;
  }
  if (kind == "sparse")
    spec.kind = SelectorKind::Sparse;
  else if (kind == "certified")
    spec.kind = SelectorKind::Certified;
  else
    fail("selector spec '", text, "': unknown kind '", kind,
         "' (expected dense, sparse or certified)");

  std::set<char> seen;  // one letter per field family, to reject repeats
  const auto once = [&](char family, std::string_view field) {
    require(seen.insert(family).second, "selector spec '", text, "': field '", field,
            "' repeats an earlier field of the same kind");
  };
  bool has_k = false, has_eps = false;
  for (size_t i = 1; i < fields.size(); ++i) {
    const std::string_view f = fields[i];
    require(!f.empty(), "selector spec '", text, "': empty field");
    if (f == "exact" || f == "centroid" || f == "bound") {
      once('R', f);
      spec.rule = f == "exact"      ? SelectorRule::Exact
                  : f == "centroid" ? SelectorRule::Centroid
                                    : SelectorRule::Bound;
    } else if (f.starts_with("gqa=")) {
      once('G', f);
      if (f == "gqa=shared")
        spec.gqa = GqaChoice::Shared;
      else if (f == "gqa=head")
        spec.gqa = GqaChoice::PerHead;
      else
        fail("selector spec '", text, "': unknown field '", f,
             "' (expected gqa=shared or gqa=head)");
    } else if (f.starts_with("eps")) {
      once('e', f);
      spec.epsilon = parse_epsilon(text, f, f.substr(3));
      has_eps = true;
    } else if (f[0] == 'a') {
      once('a', f);
      spec.anchors = parse_count(text, f, f.substr(1), 0);
    } else if (f[0] == 'w') {
      once('w', f);
      spec.window = parse_count(text, f, f.substr(1), 0);
    } else if (f[0] == 'k') {
      once('k', f);
      spec.top_k = parse_count(text, f, f.substr(1), 1);
      has_k = true;
    } else if (f[0] == 'b') {
      once('b', f);
      spec.block_size = parse_count(text, f, f.substr(1), 1);
    } else if (f[0] == 'r') {
      once('r', f);
      spec.refresh = parse_count(text, f, f.substr(1), 1);
    } else if (f[0] == 'p') {
      once('p', f);
      spec.sketch_bits = parse_count(text, f, f.substr(1), 2);
      require(spec.sketch_bits <= 8, "selector spec '", text, "': field '", f,
              "': position sketches take 2 to 8 bits");
    } else if (f[0] == 'q') {
      once('q', f);
      spec.frame_rank = parse_count(text, f, f.substr(1), 1);
    } else {
      fail(
          "selector spec '", text, "': unknown field '", f,
          "' (expected aN, wN, kN, bN, rN, pN, qN, epsX, exact, centroid, bound, gqa=shared|head)");
    }
  }
  require(spec.sketch_bits == 0 || spec.kind == SelectorKind::Certified, "selector spec '", text,
          "': position sketches pN belong to the certified kind");
  require(spec.sketch_bits == 0 || spec.frame_rank == 0, "selector spec '", text,
          "': position sketches pN bound every position; a query frame qN sharpens block "
          "bounds: give one of them");
  require(spec.frame_rank == 0 || spec.kind == SelectorKind::Certified ||
              spec.rule == SelectorRule::Bound,
          "selector spec '", text,
          "': a query frame qN sharpens the block bound: it belongs to certified and the bound "
          "rule");

  if (spec.kind == SelectorKind::Sparse) {
    require(!has_eps, "selector spec '", text, "': eps belongs to the certified kind");
    require(has_k == (spec.rule != SelectorRule::None), "selector spec '", text,
            "': a dynamic size kN and a rule (exact, centroid or bound) go together");
    require(!(spec.rule == SelectorRule::Exact && seen.count('b')), "selector spec '", text,
            "': the exact rule reads every score and takes no block size");
    require(!(spec.rule == SelectorRule::None && seen.count('b')), "selector spec '", text,
            "': a block size needs a block rule (centroid or bound)");
  } else {
    require(has_eps, "selector spec '", text, "': certified needs epsN (0 < eps < 1)");
    require(!has_k, "selector spec '", text,
            "': certified chooses its own support by the bound; it takes no kN");
    require(spec.rule == SelectorRule::None || spec.rule == SelectorRule::Exact, "selector spec '",
            text,
            "': certified bounds scores from block summaries, position sketches (pN) or every "
            "score (exact); centroid and bound are rules of the sparse kind");
    require(spec.rule != SelectorRule::Exact ||
                (!seen.count('b') && spec.sketch_bits == 0 && spec.frame_rank == 0),
            "selector spec '", text,
            "': certified:exact reads every score and needs no blocks (bN), sketches (pN) or "
            "query frame (qN)");
    require(!seen.count('r'), "selector spec '", text,
            "': certified re-checks its bound at every query; it takes no refresh rN");
  }
  return spec;
}

std::string describe(const SelectorSpec& spec) {
  if (spec.kind == SelectorKind::Dense) return "dense";
  std::string text = spec.kind == SelectorKind::Sparse ? "sparse" : "certified";
  text += str_cat(":a", spec.anchors, ":w", spec.window);
  if (spec.kind == SelectorKind::Sparse && spec.rule != SelectorRule::None)
    text += str_cat(":k", spec.top_k);
  if (spec.uses_blocks() && spec.block_size > 0) text += str_cat(":b", spec.block_size);
  switch (spec.rule) {
    case SelectorRule::Exact:
      text += ":exact";
      break;
    case SelectorRule::Centroid:
      text += ":centroid";
      break;
    case SelectorRule::Bound:
      text += ":bound";
      break;
    case SelectorRule::None:
      break;
  }
  if (spec.frame_rank > 0) text += str_cat(":q", spec.frame_rank);
  if (spec.sketch_bits > 0) text += str_cat(":p", spec.sketch_bits);
  if (spec.kind == SelectorKind::Certified) {
    char digits[32];  // shortest text that reads back as the same double
    const auto result = std::to_chars(digits, digits + sizeof(digits), spec.epsilon);
    text += ":eps" + std::string(digits, result.ptr);
  }
  text += spec.gqa == GqaChoice::Shared ? ":gqa=shared" : ":gqa=head";
  if (spec.kind == SelectorKind::Sparse) text += str_cat(":r", spec.refresh);
  return text;
}

}  // namespace visikv

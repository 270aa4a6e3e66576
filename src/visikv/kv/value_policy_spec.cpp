#include "visikv/kv/value_policy_spec.h"

#include <algorithm>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/spec_fields.h"
#include "visikv/kv/codec_spec.h"

namespace visikv {

namespace {

constexpr std::string_view kGrammar =
    "expected <rule>:int<L>[/int<M>]/int<H>:g<G>[:w<W>]:avg<A>[:ramp][:fromfloat] with rule a2, "
    "a2e, a1, "
    "recency or uniform, e.g. a2:int2/int4:g64:w64:avg3 or a2e:int2/int3/int4:g64:w64:avg3";
constexpr int64_t kMaxNumber = int64_t{1} << 30;

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

int64_t number_after(std::string_view spec, std::string_view field, std::string_view prefix,
                     std::string_view what, int64_t min) {
  const std::string_view digits = after_prefix(field, prefix);
  require(all_digits(digits) && digits.size() <= 10, "value policy '", spec, "': ", what, " '",
          field, "' must be '", prefix, "' followed by a number (", kGrammar, ")");
  int64_t value = 0;
  for (char c : digits) value = value * 10 + (c - '0');
  require(value >= min && value <= kMaxNumber, "value policy '", spec, "': ", what, " '", field,
          "' must be between ", min, " and ", kMaxNumber);
  return value;
}

int code_bits(std::string_view spec, std::string_view field, std::string_view which) {
  const std::string_view digits = after_prefix(field, "int");
  require(all_digits(digits) && digits.size() <= 2, "value policy '", spec, "': the ", which,
          " width '", field, "' must be int2, int3, int4 or int8 (", kGrammar, ")");
  const int bits = std::stoi(std::string(digits));
  require(bits == 2 || bits == 3 || bits == 4 || bits == 8, "value policy '", spec,
          "': unsupported ", which, " width '", field, "' (expected int2, int3, int4 or int8)");
  return bits;
}

// "avg3" -> 3000, "avg2.5" -> 2500.
int64_t average_milli(std::string_view spec, std::string_view field) {
  const std::string_view number = after_prefix(field, "avg");
  const size_t dot = number.find('.');
  const std::string_view whole = number.substr(0, dot);
  const std::string_view fraction =
      dot == std::string_view::npos ? std::string_view() : number.substr(dot + 1);
  require(field.starts_with("avg") && all_digits(whole) && whole.size() <= 2 &&
              (dot == std::string_view::npos || (all_digits(fraction) && fraction.size() <= 3)),
          "value policy '", spec, "': the average '", field,
          "' must be 'avg' followed by a decimal number of bits with at most three fraction "
          "digits, e.g. avg3 or avg2.5");
  int64_t milli = std::stoi(std::string(whole)) * 1000;
  int64_t unit = 100;
  for (char c : fraction) {
    milli += (c - '0') * unit;
    unit /= 10;
  }
  return milli;
}

}  // namespace

namespace {

// S_n = floor((A - L) n / s), exactly (L < H).
int64_t budget_steps(const ValuePolicySpec& p, int64_t tokens, int low_bits) {
  return tokens * (p.average_milli - 1000 * int64_t{low_bits}) /
         (1000 * int64_t{p.step_bits(low_bits)});
}

}  // namespace

int64_t ValuePolicySpec::window_at(int64_t tokens, int low_bits) const {
  if (!ramp || high_bits == low_bits) return window;
  // At most half the budget's steps, at least one token (a token is ranked after it was read).
  return std::min(window,
                  std::max<int64_t>(1, budget_steps(*this, tokens, low_bits) / (2 * steps())));
}

int64_t ValuePolicySpec::raised_steps(int64_t tokens, int low_bits) const {
  const int64_t w = window_at(tokens, low_bits);
  if (tokens <= w || high_bits == low_bits) return steps() * tokens;
  return std::max(steps() * w, budget_steps(*this, tokens, low_bits));
}

std::string ValuePolicySpec::rule_name() const {
  switch (rule) {
    case Rule::Recency:
      return "recency";
    case Rule::A1:
      return "a1";
    case Rule::A2:
      return "a2";
    case Rule::A2E:
      return "a2e";
  }
  return "?";
}

std::string ValuePolicySpec::average_text() const {
  std::string out = str_cat("avg", average_milli / 1000);
  int64_t fraction = average_milli % 1000;
  if (fraction == 0) return out;
  std::string digits = str_cat(fraction + 1000).substr(1);  // three digits, leading zeros kept
  while (digits.back() == '0') digits.pop_back();
  return out + "." + digits;
}

bool is_value_policy_spec(std::string_view text) {
  const std::string_view rule = text.substr(0, text.find(':'));
  return rule == "a2" || rule == "a2e" || rule == "a1" || rule == "recency" || rule == "uniform";
}

CodecSpec parse_value_policy_spec(std::string_view text) {
  std::vector<std::string_view> fields = split_fields(text);
  require(is_value_policy_spec(text), "value policy '", text, "': unknown rule '", fields[0], "' (",
          kGrammar, ")");
  const bool from_float = fields.back() == "fromfloat";
  if (from_float) fields.pop_back();
  const bool ramp = fields.back() == "ramp";
  if (ramp) fields.pop_back();
  require(fields.size() == 4 || fields.size() == 5, "value policy '", text, "': ", fields.size(),
          " fields (", kGrammar, ")");
  const std::string_view rule = fields[0];
  const std::string_view widths = fields[1];
  const auto slashes = std::count(widths.begin(), widths.end(), '/');
  const size_t slash = widths.find('/'), last_slash = widths.rfind('/');
  require(slashes == 1 || slashes == 2, "value policy '", text, "': the widths '", widths,
          "' must be int<L>/int<H> or int<L>/int<M>/int<H>, e.g. int2/int4 or int2/int3/int4");
  const int low = code_bits(text, widths.substr(0, slash), "low");
  const int high = code_bits(text, widths.substr(last_slash + 1), "high");
  require(low <= high, "value policy '", text, "': the low width int", low,
          " exceeds the high width int", high);
  int middle = 0;
  if (slash != last_slash) {
    middle = code_bits(text, widths.substr(slash + 1, last_slash - slash - 1), "middle");
    require(low < middle && middle < high, "value policy '", text, "': the middle width int",
            middle, " must lie strictly between the low width int", low, " and the high width int",
            high);
    // Each demotion must free the same bits, so that the total (and the reported budget) does
    // not depend on which tokens the policy demotes.
    require(middle - low == high - middle, "value policy '", text, "': the widths int", low, "/int",
            middle, "/int", high,
            " must be equally spaced (e.g. int2/int3/int4), so that every demotion frees the "
            "same bits");
  }
  const int64_t group = number_after(text, fields[2], "g", "group size", 1);
  int64_t window = 0;
  const bool has_window = fields.size() == 5;
  if (has_window) window = number_after(text, fields[3], "w", "window", 0);
  const int64_t average = average_milli(text, fields.back());
  require(average >= 1000 * low && average <= 1000 * high, "value policy '", text,
          "': the average ", fields.back().substr(3), " bits lies outside [", low, ", ", high,
          "], the low and high widths");
  require(low < high || average == 1000 * low, "value policy '", text,
          "': with equal widths the average must be ", low);

  CodecSpec spec;
  spec.kind = CodecSpec::Kind::Int;
  spec.axis = CodecSpec::Axis::Tokens;
  spec.group = group;
  if (rule == "uniform") {
    require(!has_window, "value policy '", text,
            "': uniform is the plain codec at the average bits and takes no window");
    require(!from_float && !ramp, "value policy '", text,
            "': uniform is the plain codec at the average bits and has no window to ramp and "
            "demotes nothing (no ramp, no fromfloat)");
    require(average % 1000 == 0 &&
                (average == 2000 || average == 3000 || average == 4000 || average == 8000),
            "value policy '", text,
            "': uniform needs an average that is a code width (2, 3, 4 or 8), got ",
            fields.back().substr(3));
    spec.bits = static_cast<int>(average / 1000);
    return spec;
  }
  ValuePolicySpec policy;
  policy.rule = rule == "a2"    ? ValuePolicySpec::Rule::A2
                : rule == "a2e" ? ValuePolicySpec::Rule::A2E
                : rule == "a1"  ? ValuePolicySpec::Rule::A1
                                : ValuePolicySpec::Rule::Recency;
  require(policy.rule == ValuePolicySpec::Rule::Recency || window >= 1, "value policy '", text,
          "': ", rule,
          " needs a window :w<W> of at least one token (a token must be read before it is "
          "ranked)");
  // Recency ranks by age, which says nothing about whether one token's second step is worth
  // more than another's first.
  require(policy.rule != ValuePolicySpec::Rule::Recency || middle == 0, "value policy '", text,
          "': recency takes two widths only (three need a weight to trade the steps of one token "
          "against another's: use a2, a2e or a1)");
  policy.middle_bits = middle;
  policy.high_bits = high;
  policy.window = window;
  policy.average_milli = average;
  policy.ramp = ramp;
  policy.from_float = from_float;
  spec.bits = low;
  spec.policy = policy;
  return spec;
}

}  // namespace visikv

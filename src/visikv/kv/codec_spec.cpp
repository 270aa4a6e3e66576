#include "visikv/kv/codec_spec.h"

#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/spec_fields.h"

namespace visikv {

namespace {

constexpr int64_t kMaxNumber = int64_t{1} << 30;
constexpr double kScaleZeroBits = 2 * 16;  // one fp16 scale and one fp16 zero per group

// The positive decimal number after `prefix` in `field` ("g64" -> 64).
int64_t positive_number(std::string_view spec, std::string_view field, std::string_view prefix,
                        std::string_view what) {
  const std::string_view digits = after_prefix(field, prefix);
  require(
      !digits.empty() && digits.size() <= 10 &&
          std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }),
      "cache spec '", spec, "': ", what, " '", field, "' must be '", prefix,
      "' followed by a positive number");
  int64_t value = 0;
  for (char c : digits) value = value * 10 + (c - '0');
  require(value > 0 && value <= kMaxNumber, "cache spec '", spec, "': ", what, " '", field,
          "' must be between 1 and ", kMaxNumber);
  return value;
}

std::string format_number(double x) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.4g", x);
  return buffer;
}

HeadqSpec parse_headq(std::string_view spec, std::string_view side) {
  static constexpr std::string_view kSideGrammar =
      "expected headq:r<r>:s<b>[:wrongsign][:random|:keypca], b one of 2, 3, 4, 8, 16, 32";
  const std::vector<std::string_view> fields = split_fields(side);
  require(fields[0] == "headq", "cache spec '", spec, "': unknown side code '", fields[0], "' (",
          kSideGrammar, ")");
  require(fields.size() >= 3 && fields[1].starts_with("r") && fields[2].starts_with("s"),
          "cache spec '", spec, "': the HeadQ side code needs a rank and bits (", kSideGrammar,
          ")");
  HeadqSpec headq;
  headq.rank = positive_number(spec, fields[1], "r", "HeadQ rank");
  const int64_t bits = positive_number(spec, fields[2], "s", "side-code bits");
  require(bits == 2 || bits == 3 || bits == 4 || bits == 8 || bits == 16 || bits == 32,
          "cache spec '", spec, "': unsupported side-code bits ", bits,
          " (expected 2, 3, 4, 8, or 16 / 32 for fp16 / float32 numbers)");
  headq.bits = static_cast<int>(bits);
  bool basis_given = false;
  for (size_t i = 3; i < fields.size(); ++i) {
    const std::string_view flag = fields[i];
    if (flag == "wrongsign") {
      require(!headq.wrong_sign, "cache spec '", spec, "': ':wrongsign' given twice");
      headq.wrong_sign = true;
    } else if (flag == "random" || flag == "keypca") {
      require(!basis_given, "cache spec '", spec, "': at most one of ':random' and ':keypca'");
      basis_given = true;
      headq.basis = flag == "random" ? HeadqSpec::Basis::Random : HeadqSpec::Basis::KeyPca;
    } else {
      fail("cache spec '", spec, "': unexpected '", flag, "' (", kSideGrammar, ")");
    }
  }
  return headq;
}

// "b2.5" -> 2500: bits per channel, a decimal with at most three fraction digits, 0 < B <= 16.
int64_t budget_milli(std::string_view spec, std::string_view field) {
  const std::string_view number = after_prefix(field, "b");
  const size_t dot = number.find('.');
  const std::string_view whole = number.substr(0, dot);
  const std::string_view fraction =
      dot == std::string_view::npos ? std::string_view() : number.substr(dot + 1);
  const auto digits = [](std::string_view x) {
    return std::all_of(x.begin(), x.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  require(!whole.empty() && whole.size() <= 2 && digits(whole) &&
              (dot == std::string_view::npos ||
               (!fraction.empty() && fraction.size() <= 3 && digits(fraction))),
          "cache spec '", spec, "': the budget '", field,
          "' must be 'b' followed by bits per channel with at most three fraction digits, e.g. b3 "
          "or b2.5");
  int64_t milli = std::stoi(std::string(whole)) * 1000, unit = 100;
  for (char c : fraction) {
    milli += (c - '0') * unit;
    unit /= 10;
  }
  require(milli > 0 && milli <= 16000, "cache spec '", spec, "': the budget '", field,
          "' must be above 0 and at most 16 bits per channel");
  return milli;
}

// qbasis:b<B>:g<G>:tok|chan[:r<R>][:random|:keypca|:weighted][:iid|:fisher]
CodecSpec parse_qbasis(std::string_view text) {
  static constexpr std::string_view kGrammar =
      "expected qbasis:b<B>:g<G>:tok|chan[:r<R>][:random|:keypca|:weighted][:iid|:fisher]";
  const std::vector<std::string_view> fields = split_fields(text);
  require(fields[0] == "qbasis", "unknown cache spec '", text, "' (", kGrammar, ")");
  require(fields.size() >= 4, "cache spec '", text,
          "': a query-basis codec needs a budget, a group and an axis (", kGrammar, ")");
  CodecSpec spec;
  spec.kind = CodecSpec::Kind::QBasis;
  QBasisSpec q;
  q.budget_milli = budget_milli(text, fields[1]);
  require(fields[2].starts_with("g"), "cache spec '", text,
          "': expected the group size g<G>, got '", fields[2], "' (", kGrammar, ")");
  spec.group = positive_number(text, fields[2], "g", "group size");
  if (fields[3] == "tok") {
    spec.axis = CodecSpec::Axis::Tokens;
  } else if (fields[3] == "chan") {
    spec.axis = CodecSpec::Axis::Channels;
  } else {
    fail("cache spec '", text, "': unknown group axis '", fields[3], "' (expected tok or chan)");
  }
  size_t next = 4;
  if (next < fields.size() && fields[next].starts_with("r") && fields[next] != "random") {
    spec.window = positive_number(text, fields[next], "r", "full-precision window");
    ++next;
  }
  if (next < fields.size()) {
    if (fields[next] == "random") q.basis = QBasisSpec::Basis::Random;
    if (fields[next] == "keypca") q.basis = QBasisSpec::Basis::KeyPca;
    if (fields[next] == "weighted") q.basis = QBasisSpec::Basis::Weighted;
    if (q.basis != QBasisSpec::Basis::Query) ++next;
  }
  if (next < fields.size() && fields[next] == "iid") {
    require(
        spec.axis == CodecSpec::Axis::Channels, "cache spec '", text,
        "': ':iid' is for per-channel groups (chan): per-token groups always allocate that way");
    q.iid_groups = true;
    ++next;
  } else if (next < fields.size() && fields[next] == "fisher") {
    require(spec.axis == CodecSpec::Axis::Channels, "cache spec '", text,
            "': ':fisher' is for per-channel groups (chan)");
    q.fisher = true;
    ++next;
  }
  require(next == fields.size(), "cache spec '", text, "': unexpected '",
          fields[std::min(next, fields.size() - 1)], "' (", kGrammar, ")");
  spec.qbasis = q;
  return spec;
}

}  // namespace

std::string QBasisSpec::budget_text() const {
  std::string out = str_cat("b", budget_milli / 1000);
  const int64_t fraction = budget_milli % 1000;
  if (fraction == 0) return out;
  std::string digits = str_cat(fraction + 1000).substr(1);  // three digits, leading zeros kept
  while (digits.back() == '0') digits.pop_back();
  return out + "." + digits;
}

std::string HeadqSpec::text() const {
  std::string out = str_cat("headq:r", rank, ":s", bits);
  if (wrong_sign) out += ":wrongsign";
  if (basis == Basis::Random) out += ":random";
  if (basis == Basis::KeyPca) out += ":keypca";
  return out;
}

std::string CodecSpec::text() const {
  if (policy)
    return str_cat(policy->rule_name(), ":int", bits,
                   policy->middle_bits ? str_cat("/int", policy->middle_bits) : "", "/int",
                   policy->high_bits, ":g", group, ":w", policy->window, ":",
                   policy->average_text(), policy->ramp ? ":ramp" : "",
                   policy->from_float ? ":fromfloat" : "");
  std::string out;
  if (kind == Kind::QBasis) {
    out = str_cat("qbasis:", qbasis->budget_text(), ":g", group,
                  axis == Axis::Tokens ? ":tok" : ":chan");
    if (window > 0) out += str_cat(":r", window);
    if (qbasis->basis == QBasisSpec::Basis::Random) out += ":random";
    if (qbasis->basis == QBasisSpec::Basis::KeyPca) out += ":keypca";
    if (qbasis->basis == QBasisSpec::Basis::Weighted) out += ":weighted";
    if (qbasis->iid_groups) out += ":iid";
    if (qbasis->fisher) out += ":fisher";
    return out;
  }
  if (kind == Kind::Dense) {
    out = dense == DenseFormat::F32 ? "f32" : dense == DenseFormat::F16 ? "f16" : "bf16";
  } else {
    out = str_cat("int", bits, ":g", group, axis == Axis::Tokens ? ":tok" : ":chan");
    if (window > 0) out += str_cat(":r", window);
  }
  if (hadamard) out += ":had";
  if (headq) out += str_cat("+", headq->text());
  return out;
}

CodecSpec parse_codec_spec(std::string_view text) {
  if (is_value_policy_spec(text)) return parse_value_policy_spec(text);
  if (text.starts_with("qbasis")) {
    require(text.find('+') == std::string_view::npos, "cache spec '", text,
            "': a query-basis codec takes no '+' side code");
    return parse_qbasis(text);
  }
  // "<base>+headq:...": the base codec, then the HeadQ side code.
  if (const size_t plus = text.find('+'); plus != std::string_view::npos) {
    CodecSpec spec = parse_codec_spec(text.substr(0, plus));
    require(!spec.is_dense(), "cache spec '", text,
            "': the HeadQ side code needs an integer base codec, got '", text.substr(0, plus), "'");
    require(text.find('+', plus + 1) == std::string_view::npos, "cache spec '", text,
            "': at most one '+' side code");
    spec.headq = parse_headq(text, text.substr(plus + 1));
    return spec;
  }
  static constexpr std::string_view kGrammar =
      "expected f32, f16, bf16 or int<b>:g<G>:tok|chan[:r<R>], each optionally followed by :had, "
      "or qbasis:b<B>:g<G>:tok|chan[:r<R>][:random|:keypca|:weighted][:iid|:fisher]";
  const std::vector<std::string_view> fields = split_fields(text);
  CodecSpec spec;
  size_t next = 1;
  const std::string_view head = fields[0];
  if (head == "f32" || head == "fp32" || head == "f16" || head == "fp16" || head == "bf16") {
    spec.kind = CodecSpec::Kind::Dense;
    spec.dense = dense_format_from_name(std::string(head));
  } else if (head.starts_with("int")) {
    spec.kind = CodecSpec::Kind::Int;
    const int64_t bits = positive_number(text, head, "int", "bit width");
    require(bits == 2 || bits == 3 || bits == 4 || bits == 8, "cache spec '", text,
            "': unsupported bit width ", bits, " (expected 2, 3, 4 or 8)");
    spec.bits = static_cast<int>(bits);
    require(fields.size() >= 3, "cache spec '", text,
            "': an integer codec needs a group and an axis, e.g. int4:g32:tok or int2:g32:chan");
    require(fields[1].starts_with("g"), "cache spec '", text,
            "': expected the group size g<G>, got '", fields[1], "'");
    spec.group = positive_number(text, fields[1], "g", "group size");
    if (fields[2] == "tok") {
      spec.axis = CodecSpec::Axis::Tokens;
    } else if (fields[2] == "chan") {
      spec.axis = CodecSpec::Axis::Channels;
    } else {
      fail("cache spec '", text, "': unknown group axis '", fields[2], "' (expected tok or chan)");
    }
    next = 3;
    if (next < fields.size() && fields[next].starts_with("r")) {
      spec.window = positive_number(text, fields[next], "r", "full-precision window");
      ++next;
    }
  } else {
    fail("unknown cache spec '", text, "' (", kGrammar, ")");
  }
  if (next < fields.size() && fields[next] == "had") {
    spec.hadamard = true;
    ++next;
  }
  require(next == fields.size(), "cache spec '", text, "': unexpected '",
          fields[std::min(next, fields.size() - 1)], "' (", kGrammar, ")");
  return spec;
}

KeyCodecSpec key_codec_spec(CodecSpec spec) {
  if (spec.policy)
    fail("key codec '", spec.text(), "': the value bit policy '", spec.policy->rule_name(),
         "' is for values only");
  return {std::move(spec)};
}

ValueCodecSpec value_codec_spec(CodecSpec spec) {
  if (spec.headq)
    fail("value codec '", spec.text(), "': the HeadQ side code '+", spec.headq->text(),
         "' is for keys only");
  if (spec.is_qbasis())
    fail("value codec '", spec.text(),
         "': query-basis quantization is for keys only (it spends bits where queries look)");
  return {std::move(spec)};
}

KeyCodecSpec parse_key_codec_spec(std::string_view text) {
  return key_codec_spec(parse_codec_spec(text));
}

ValueCodecSpec parse_value_codec_spec(std::string_view text) {
  return value_codec_spec(parse_codec_spec(text));
}

void check_codec_fits(const CodecSpec& spec, int64_t head_dim) {
  require(head_dim > 0, "cache spec '", spec.text(), "': head_dim must be positive");
  if (spec.hadamard)
    require((head_dim & (head_dim - 1)) == 0, "cache spec '", spec.text(),
            "': the Hadamard rotation needs a power-of-two head_dim, got ", head_dim);
  if (spec.is_dense()) return;
  if (spec.is_qbasis()) {
    const int64_t milli_bits = spec.qbasis->budget_milli * head_dim;
    require(milli_bits % 1000 == 0, "cache spec '", spec.text(), "': the budget ",
            spec.qbasis->budget_text(), " x head_dim ", head_dim,
            " is not a whole number of bits per key");
    return;
  }
  if (spec.headq)
    require(spec.headq->rank <= head_dim, "cache spec '", spec.text(), "': HeadQ rank ",
            spec.headq->rank, " exceeds head_dim ", head_dim);
  require(head_dim % 8 == 0, "cache spec '", spec.text(),
          "': integer codecs pack 8 codes at a time and need head_dim % 8 == 0, got ", head_dim);
  if (spec.policy)
    require(spec.group % 8 == 0, "cache spec '", spec.text(),
            "': a value policy needs a group size that is a multiple of 8, got ", spec.group);
  if (spec.axis == CodecSpec::Axis::Tokens)
    require(head_dim % spec.group == 0, "cache spec '", spec.text(), "': group size ", spec.group,
            " does not divide head_dim ", head_dim);
}

CodecBits codec_bits(const CodecSpec& spec, int64_t head_dim) {
  check_codec_fits(spec, head_dim);
  CodecBits bits;
  if (spec.is_dense()) {
    bits.bits_per_element = spec.dense == DenseFormat::F32 ? 32 : 16;
  } else if (spec.is_qbasis()) {
    // Exactly the budget: the store pads what the allocation leaves unused (kv/qbasis.h).
    bits.bits_per_element = spec.qbasis->budget();
    bits.window_min_tokens = spec.window;
    bits.window_max_tokens = spec.window + spec.token_group() - 1;
  } else if (spec.policy) {
    // The budget: A code bits on average (the H-bit window included), plus the scale and zero.
    bits.bits_per_element = static_cast<double>(spec.policy->average_milli) / 1000.0 +
                            kScaleZeroBits / static_cast<double>(spec.group);
  } else {
    bits.bits_per_element = spec.bits + kScaleZeroBits / static_cast<double>(spec.group);
    bits.window_min_tokens = spec.window;
    bits.window_max_tokens = spec.window + spec.token_group() - 1;
  }
  bits.bits_per_vector = bits.bits_per_element * static_cast<double>(head_dim);
  if (spec.headq) {
    bits.side_bits_per_vector = static_cast<double>(spec.headq->bits_per_vector());
    bits.bits_per_vector += bits.side_bits_per_vector;
    bits.bits_per_element = bits.bits_per_vector / static_cast<double>(head_dim);
  }
  return bits;
}

int64_t quantized_tokens(const CodecSpec& spec, int64_t tokens) {
  if (spec.is_dense()) return 0;
  const int64_t past_window = std::max<int64_t>(0, tokens - spec.window);
  return past_window / spec.token_group() * spec.token_group();
}

int64_t codec_stored_bits(const CodecSpec& spec, int64_t head_dim, int64_t tokens) {
  check_codec_fits(spec, head_dim);
  if (spec.is_dense()) return tokens * head_dim * (spec.dense == DenseFormat::F32 ? 32 : 16);
  if (spec.policy) {
    // Every token at L bits with its scales and zeros, plus the steps the budget holds above L.
    const int64_t scale_zero = head_dim / spec.group * static_cast<int64_t>(kScaleZeroBits);
    return tokens * (head_dim * spec.bits + scale_zero) +
           spec.policy->raised_steps(tokens, spec.bits) * head_dim *
               spec.policy->step_bits(spec.bits);
  }
  const int64_t quantized = quantized_tokens(spec, tokens);
  if (spec.is_qbasis())
    return quantized * spec.qbasis->budget_milli * head_dim / 1000 +
           (tokens - quantized) * head_dim * 16;
  const int64_t groups = quantized * head_dim / spec.group;  // both axes: G elements per group
  const int64_t side = spec.headq ? quantized * spec.headq->bits_per_vector() : 0;
  return quantized * head_dim * spec.bits + groups * static_cast<int64_t>(kScaleZeroBits) +
         (tokens - quantized) * head_dim * 16 + side;
}

std::string describe_codec(const CodecSpec& spec, int64_t head_dim) {
  const CodecBits bits = codec_bits(spec, head_dim);
  std::string out = str_cat(spec.text(), " (", format_number(bits.bits_per_element), " bits/elt");
  if (spec.policy)
    out += str_cat(" on average; ", spec.policy->rule_name(), " keeps int", spec.policy->high_bits,
                   " for the newest ", spec.policy->window, " tokens and a share of the rest",
                   spec.policy->middle_bits ? str_cat(" at int", spec.policy->middle_bits,
                                                      " or int", spec.policy->high_bits)
                                            : "",
                   spec.policy->from_float
                       ? "; control: demotions re-quantize the float values, held beside the "
                         "codes and not counted"
                       : "");
  if (spec.headq)
    out += str_cat(", ", format_number(bits.bits_per_vector), " bits/key incl. ",
                   format_number(bits.side_bits_per_vector), " side");
  if (bits.window_max_tokens > 0) {
    out += "; ";
    out += bits.window_min_tokens == bits.window_max_tokens
               ? str_cat(bits.window_min_tokens)
               : str_cat(bits.window_min_tokens, "-", bits.window_max_tokens);
    out += " newest tokens f16";
  }
  return out + ")";
}

}  // namespace visikv

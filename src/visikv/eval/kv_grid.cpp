#include "visikv/eval/kv_grid.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <tuple>

#include "visikv/attention/selector_spec.h"
#include "visikv/calibration/headq_basis.h"
#include "visikv/core/error.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/logit_store.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"

namespace visikv {

namespace {

constexpr int64_t kChanGroup = 32;    // KIVI's key group along tokens
constexpr int64_t kChanWindow = 128;  // KIVI's full-precision residual
constexpr int kKeyBits[] = {2, 3, 4};
// Value policies: int2/int4 (or int2/int3/int4) per-token codes, the newest 64 tokens at int4, on
// average 3 code bits (the same bits as int3) or 2.5 (the same bits as int2:g32 at d = 64).
constexpr int64_t kValueWindow = 64;
constexpr const char* kValueRules[] = {"recency", "a1", "a2"};
// The readout-error policies: {row name suffix, rule, widths}.
struct FinerValuePolicy {
  const char* name;
  const char* rule;
  const char* widths;
};
constexpr FinerValuePolicy kFinerValuePolicies[] = {{"a2-3lvl", "a2", "int2/int3/int4"},
                                                    {"a2e", "a2e", "int2/int4"},
                                                    {"a2e-3lvl", "a2e", "int2/int3/int4"}};

// "a2:int2/int4:g64:w64:avg3" (kv/value_policy_spec.h); uniform gives the plain codec
// ("int3:g64:tok").
ValueCodecSpec value_policy(const std::string& rule, int64_t group, const std::string& average,
                            const std::string& widths = "int2/int4") {
  const std::string window = rule == "uniform" ? "" : str_cat(":w", kValueWindow);
  return parse_value_codec_spec(str_cat(rule, ":", widths, ":g", group, window, ":avg", average));
}

CodecSpec plain_spec(int bits, CodecSpec::Axis axis, int64_t head_dim) {
  CodecSpec s;
  s.kind = CodecSpec::Kind::Int;
  s.bits = bits;
  s.axis = axis;
  s.group = axis == CodecSpec::Axis::Tokens ? token_group(head_dim) : kChanGroup;
  s.window = axis == CodecSpec::Axis::Tokens ? 0 : kChanWindow;
  return s;
}

KeyCodecSpec with_headq(CodecSpec base, int64_t rank, int side_bits, HeadqSpec::Basis basis,
                        bool wrong_sign) {
  HeadqSpec h;
  h.rank = rank;
  h.bits = side_bits;
  h.basis = basis;
  h.wrong_sign = wrong_sign;
  base.headq = h;
  return key_codec_spec(std::move(base));
}

const char* axis_name(CodecSpec::Axis axis) {
  return axis == CodecSpec::Axis::Tokens ? "tok" : "chan";
}

bool is_headq_kind(KvGridRowKind kind) {
  return kind == KvGridRowKind::Headq || kind == KvGridRowKind::Control ||
         kind == KvGridRowKind::FullKvHeadq || kind == KvGridRowKind::FullKvHeadqValues;
}

}  // namespace

int64_t token_group(int64_t head_dim, int64_t largest) {
  for (int64_t g = largest - largest % 8; g >= 8; g -= 8)
    if (head_dim % g == 0) return g;
  fail("a per-token group needs a head dimension divisible by 8, got ", head_dim);
}

int64_t kv_grid_control_rank(const KvGridSpec& spec) {
  require(!spec.ranks.empty(), "--ranks: no HeadQ rank given");
  if (std::find(spec.ranks.begin(), spec.ranks.end(), 8) != spec.ranks.end()) return 8;
  return *std::max_element(spec.ranks.begin(), spec.ranks.end());
}

std::optional<CodecSpec> same_budget_codec(const CodecSpec& base, double budget_bits,
                                           int64_t head_dim) {
  std::optional<CodecSpec> best;
  double best_bits = -1;
  for (int bits : {2, 3, 4, 8}) {
    for (int64_t group = 8; group <= 256; group *= 2) {
      if (base.axis == CodecSpec::Axis::Tokens && head_dim % group != 0) continue;
      CodecSpec s = base;
      s.headq.reset();
      s.bits = bits;
      s.group = group;
      const double b = codec_bits(s, head_dim).bits_per_vector;
      // Ties go to the wider code: bits ascend in the outer loop, so >= keeps the last.
      if (b <= budget_bits + 1e-9 && b >= best_bits) {
        best = s;
        best_bits = b;
      }
    }
  }
  return best;
}

std::vector<KvGridRow> kv_grid_rows(int64_t head_dim, const KvGridSpec& spec) {
  require(head_dim > 0 && head_dim % 8 == 0, "the grid needs a head dimension divisible by 8, got ",
          head_dim);
  require(!spec.ranks.empty(), "--ranks: no HeadQ rank given");
  for (int64_t r : spec.ranks)
    require(r >= 1 && r <= head_dim, "--ranks: rank ", r, " is outside 1..", head_dim,
            " (the head dimension)");
  require(spec.side_bits == 2 || spec.side_bits == 3 || spec.side_bits == 4 || spec.side_bits == 8,
          "--side-bits: HeadQ side bits must be 2, 3, 4 or 8, got ", spec.side_bits);
  std::vector<int64_t> ranks = spec.ranks;
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  const int64_t control = kv_grid_control_rank(spec);
  const KeyCodecSpec f32_keys;
  const ValueCodecSpec f32_values;
  const ValueCodecSpec int2_values =
      value_codec_spec(plain_spec(2, CodecSpec::Axis::Tokens, head_dim));

  std::vector<KvGridRow> rows;
  rows.push_back({"dense", KvGridRowKind::Dense, f32_keys, f32_values, "", ""});
  const CodecSpec::Axis axes[] = {CodecSpec::Axis::Tokens, CodecSpec::Axis::Channels};
  for (CodecSpec::Axis axis : axes)
    for (int b : kKeyBits)
      rows.push_back({str_cat("k", b, "-", axis_name(axis)), KvGridRowKind::Plain,
                      key_codec_spec(plain_spec(b, axis, head_dim)), f32_values, "", ""});
  for (CodecSpec::Axis axis : axes) {
    const CodecSpec base = plain_spec(2, axis, head_dim);
    const std::string base_name = str_cat("k2-", axis_name(axis));
    for (int64_t r : ranks)
      rows.push_back({str_cat(base_name, "+hq-r", r), KvGridRowKind::Headq,
                      with_headq(base, r, spec.side_bits, HeadqSpec::Basis::Query, false),
                      f32_values, base_name, ""});
    const std::string control_name = str_cat(base_name, "+hq-r", control);
    rows.push_back({control_name + "-wrongsign", KvGridRowKind::Control,
                    with_headq(base, control, spec.side_bits, HeadqSpec::Basis::Query, true),
                    f32_values, base_name, "control: correction subtracted"});
    rows.push_back({control_name + "-random", KvGridRowKind::Control,
                    with_headq(base, control, spec.side_bits, HeadqSpec::Basis::Random, false),
                    f32_values, base_name, "control: seeded random orthonormal basis"});
    rows.push_back({control_name + "-keypca", KvGridRowKind::Control,
                    with_headq(base, control, spec.side_bits, HeadqSpec::Basis::KeyPca, false),
                    f32_values, base_name, "control: key-PCA basis"});
  }
  for (CodecSpec::Axis axis : axes) {
    const CodecSpec base = plain_spec(2, axis, head_dim);
    for (int64_t r : ranks) {
      const CodecSpec headq =
          with_headq(base, r, spec.side_bits, HeadqSpec::Basis::Query, false).codec;
      const double budget = codec_bits(headq, head_dim).bits_per_vector;
      const std::optional<CodecSpec> plain = same_budget_codec(base, budget, head_dim);
      if (!plain) continue;  // cannot happen: the base itself fits
      const double bits = codec_bits(*plain, head_dim).bits_per_vector;
      rows.push_back({str_cat("budget-", axis_name(axis), "-r", r), KvGridRowKind::SameBudget,
                      key_codec_spec(*plain), f32_values, "",
                      str_cat("same budget as ", headq.text(), " (", budget, " bits/key; plain ",
                              bits, bits == budget ? ", exact)" : ")")});
    }
  }
  // Values only (keys f32): plain int2 and int4, and four ways to spend 3 bits per value.
  const int64_t value_group = token_group(head_dim);
  rows.push_back(
      {"v-int2", KvGridRowKind::Values, f32_keys, int2_values, "", "values only: plain int2"});
  rows.push_back({"v-int4", KvGridRowKind::Values, f32_keys,
                  value_codec_spec(plain_spec(4, CodecSpec::Axis::Tokens, head_dim)), "",
                  "values only: plain int4"});
  rows.push_back({"v3-uniform", KvGridRowKind::ValuePolicy, f32_keys,
                  value_policy("uniform", value_group, "3"), "",
                  "values only, 3 bits on average: uniform int3"});
  for (const char* rule : kValueRules)
    rows.push_back({str_cat("v3-", rule), KvGridRowKind::ValuePolicy, f32_keys,
                    value_policy(rule, value_group, "3"), "",
                    str_cat("values only, 3 bits on average: ", rule, " policy, int2/int4, newest ",
                            kValueWindow, " at int4")});
  const auto finer_rows = [&](const std::string& average) {
    for (const FinerValuePolicy& p : kFinerValuePolicies)
      rows.push_back({str_cat("v", average, "-", p.name), KvGridRowKind::ValuePolicy, f32_keys,
                      value_policy(p.rule, value_group, average, p.widths), "",
                      str_cat("values only, ", average, " bits on average: ", p.rule, " policy, ",
                              p.widths, ", newest ", kValueWindow, " at int4")});
  };
  finer_rows("3");
  // Variants of the A² policies: the window that grows with the budget (:ramp), and the
  // fromfloat controls, demotions re-quantizing the float values (held uncounted), which
  // separate the choice of widths from the cost of repeated rounding.
  const auto variant_rows = [&](const std::string& average, const std::string& variant) {
    const auto add = [&](const std::string& name, const std::string& rule,
                         const std::string& widths) {
      ValueCodecSpec values = value_policy(rule, value_group, average, widths);
      const bool ramp = variant == "ramp";
      (ramp ? values.codec.policy->ramp : values.codec.policy->from_float) = true;
      rows.push_back(
          {str_cat("v", average, "-", name, "-", variant), KvGridRowKind::ValuePolicy, f32_keys,
           values, "",
           str_cat(ramp ? "" : "control, ", "values only, ", average, " bits on average: ", rule,
                   " policy, ", widths,
                   ramp ? str_cat(", the newest min(", kValueWindow, ", half the budget) at int4")
                        : ", demotions from the float values (held, not counted)")});
    };
    add("a2", "a2", "int2/int4");
    for (const FinerValuePolicy& p : kFinerValuePolicies) add(p.name, p.rule, p.widths);
  };
  variant_rows("3", "fromfloat");
  variant_rows("3", "ramp");
  // The same at 2.5 code bits, beside the plain codec of the same bits per value and the
  // two-width A² policy.
  const ValueCodecSpec a2_values = value_policy("a2", value_group, "2.5");
  const double a2_bits = codec_bits(a2_values.codec, head_dim).bits_per_vector;
  const std::optional<CodecSpec> same_bits_values =
      same_budget_codec(int2_values.codec, a2_bits, head_dim);
  // (At small head dimensions that may be int2:g<Gt>:tok itself, v-int2's codec: no second row.)
  if (same_bits_values && same_bits_values->text() != int2_values.text())
    rows.push_back(
        {"v2.5-plain", KvGridRowKind::ValuePolicy, f32_keys, value_codec_spec(*same_bits_values),
         "",
         str_cat("values only: the plain per-token codec of the most bits per value "
                 "not above the 2.5-bit policies' (",
                 codec_bits(*same_bits_values, head_dim).bits_per_vector, " of ", a2_bits, ")")});
  rows.push_back({"v2.5-a2", KvGridRowKind::ValuePolicy, f32_keys, a2_values, "",
                  str_cat("values only, 2.5 bits on average: a2 policy, int2/int4, newest ",
                          kValueWindow, " at int4")});
  finer_rows("2.5");
  variant_rows("2.5", "ramp");
  // Full KV at 2 bits: plain int2 values, then HeadQ keys with plain int2 values, with the A²
  // policy at 2.5 code bits on average, and with the plain codec of the same bits per value.
  for (CodecSpec::Axis axis : axes) {
    const CodecSpec base = plain_spec(2, axis, head_dim);
    const std::string name = str_cat("kv2-", axis_name(axis));
    const KeyCodecSpec headq_keys =
        with_headq(base, control, spec.side_bits, HeadqSpec::Basis::Query, false);
    rows.push_back({name, KvGridRowKind::FullKv, key_codec_spec(base), int2_values, "",
                    "full KV, plain int2 values"});
    const std::string headq_name = str_cat(name, "+hq-r", control);
    rows.push_back({headq_name, KvGridRowKind::FullKvHeadq, headq_keys, int2_values, name,
                    "full KV, HeadQ keys, plain int2 values"});
    rows.push_back({headq_name + "+a2", KvGridRowKind::FullKvHeadqValues, headq_keys, a2_values,
                    name, str_cat("full KV, HeadQ keys, A2 values (", a2_bits, " bits/value)")});
    // (At small head dimensions the plain codec may be int2:g<Gt>:tok itself: no second row.)
    if (same_bits_values && same_bits_values->text() != int2_values.text())
      rows.push_back(
          {str_cat(headq_name, "+v", a2_bits), KvGridRowKind::FullKvHeadqValues, headq_keys,
           value_codec_spec(*same_bits_values), name,
           str_cat("full KV, HeadQ keys, plain values at the A2 row's bits (",
                   codec_bits(*same_bits_values, head_dim).bits_per_vector, " bits/value)")});
  }
  return rows;
}

std::vector<KvGridRow> select_kv_grid_rows(const std::vector<KvGridRow>& rows,
                                           const std::vector<std::string>& names) {
  if (names.empty()) return rows;
  std::set<std::string> wanted;
  for (const std::string& name : names) {
    const auto it =
        std::find_if(rows.begin(), rows.end(), [&](const KvGridRow& r) { return r.name == name; });
    if (it == rows.end()) {
      std::string known;
      for (const KvGridRow& r : rows) known += (known.empty() ? "" : ", ") + r.name;
      fail("--rows: unknown row '", name, "' (rows: ", known, ")");
    }
    wanted.insert(name);
    wanted.insert("dense");
    if (!it->base.empty()) wanted.insert(it->base);
  }
  std::vector<KvGridRow> out;
  for (const KvGridRow& r : rows)
    if (wanted.count(r.name)) out.push_back(r);
  return out;
}

int64_t kv_grid_basis_rank(const std::vector<KvGridRow>& rows, int64_t head_dim) {
  int64_t rank = 0;
  for (const KvGridRow& r : rows) {
    const CodecSpec& spec = r.key_codec.codec;
    if (spec.is_qbasis()) {
      require(head_dim > 0, "row ", r.name, ": a query-basis codec needs the head dimension");
      rank = std::max(rank, head_dim);
    }
    if (spec.headq && spec.headq->basis != HeadqSpec::Basis::Random)
      rank = std::max(rank, spec.headq->rank);
  }
  return rank;
}

std::vector<KvGridRow> with_key_codec_rows(std::vector<KvGridRow> rows,
                                           const std::vector<KeyCodecSpec>& key_codecs) {
  for (const KeyCodecSpec& codec : key_codecs) {
    KvGridRow row{codec.text(), KvGridRowKind::Plain, codec};
    row.note = "--keys";
    for (const KvGridRow& r : rows)
      require(r.name != row.name, "--keys: row '", row.name, "' given twice");
    rows.push_back(std::move(row));
  }
  return rows;
}

namespace {

// A run is keyed by the canonical texts of its key codec, value codec and selector.
using Run = std::tuple<std::string, std::string, std::string>;
Run run_of(const KvGridRow& r) {
  return Run{r.key_codec.text(), r.value_codec.text(), describe(r.selector.spec)};
}

}  // namespace

int64_t kv_grid_run_count(const std::vector<KvGridRow>& rows) {
  std::set<Run> runs;
  for (const KvGridRow& r : rows) runs.insert(run_of(r));
  return static_cast<int64_t>(runs.size());
}

std::vector<KvGridResult> run_kv_grid(Decoder& decoder, std::span<const int32_t> text_tokens,
                                      const std::vector<KvGridRow>& rows,
                                      const KvGridOptions& options, const HeadqBasis* basis,
                                      const KvGridProgress& progress,
                                      const KvGridJournal& journal) {
  require(options.max_tokens >= 0, "--tokens must not be negative, got ", options.max_tokens);
  require(options.window >= 2, "--window must be at least 2 tokens, got ", options.window);
  require(options.mode == PerplexityMode::Decode || options.mode == PerplexityMode::DecodeBatched,
          "the kv grid runs in decode order: mode decode or decode-batched, not ",
          perplexity_mode_name(options.mode));
  const CacheShape shape = decoder.cache_shape();
  check_context(decoder.model().config(), options.window, str_cat("--window ", options.window));
  auto find = [&](const std::string& name) -> const KvGridRow* {
    for (const KvGridRow& r : rows)
      if (r.name == name) return &r;
    return nullptr;
  };
  require(find("dense") != nullptr, "the grid needs its dense row");
  for (const KvGridRow& r : rows)
    require(r.base.empty() || find(r.base) != nullptr, "row ", r.name, " needs its base row ",
            r.base);

  // Check every codec (and the basis) before spending model time: a one-token cache each.
  std::vector<Run> runs;
  for (const KvGridRow& r : rows) {
    make_cache(shape, r.key_codec, r.value_codec, 1, 32, basis);
    if (std::find(runs.begin(), runs.end(), run_of(r)) == runs.end()) runs.push_back(run_of(r));
  }

  PerplexityOptions ppl;
  ppl.mode = options.mode;
  ppl.window = options.window;
  ppl.max_tokens = options.max_tokens;
  ppl.bos = options.bos;
  ppl.headq_basis = basis;
  const KvGridRow& dense = *find("dense");
  const Run reference = run_of(dense);
  std::map<Run, PerplexityResult> done;
  // The rows whose runs (and the runs their figures need: dense, the base) are done.
  const auto results_so_far = [&] {
    std::vector<KvGridResult> results;
    if (!done.count(reference)) return results;
    const double dense_ppl = done.at(reference).ppl;
    for (const KvGridRow& r : rows) {
      if (!done.count(run_of(r))) continue;
      KvGridResult x;
      x.row = r;
      x.key_bits = codec_bits(r.key_codec.codec, shape.head_dim);
      x.value_bits = codec_bits(r.value_codec.codec, shape.head_dim);
      x.ppl = done.at(run_of(r));
      x.delta_ppl = x.ppl.ppl - dense_ppl;
      for (const KvGridRow& earlier : rows) {
        if (&earlier == &r) break;
        if (run_of(earlier) == run_of(r)) {
          x.same_run_as = earlier.name;
          break;
        }
      }
      if (is_headq_kind(r.kind)) {
        const KvGridRow& base = *find(r.base);
        if (!done.count(run_of(base))) continue;
        const double base_ppl = done.at(run_of(base)).ppl;
        const double excess = base_ppl - dense_ppl;
        // Undefined when the base has no excess to remove (e.g. a quantizer that is lossless on
        // these tokens).
        if (excess != 0 && std::isfinite(excess))
          x.excess_removed = (base_ppl - x.ppl.ppl) / excess;
      }
      results.push_back(std::move(x));
    }
    return results;
  };
  // The dense run first: every other run is compared with it, and every row's dPPL needs it.
  std::stable_partition(runs.begin(), runs.end(), [&](const Run& r) { return r == reference; });
  // The dense run records its logits (eval/logit_store.h), and every other run reads them back
  // rather than running dense beside itself: one forward pass per row instead of two. When the
  // dense run was kept from an earlier invocation, the first run that needs the logits records
  // them in a dense pass of its own.
  std::optional<LogitStore> dense_logits;
  const auto record_dense = [&](const Progress& each) {
    dense_logits.emplace(decoder.model().config().vocab_size);
    PerplexityOptions record = ppl;
    record.key_codec = dense.key_codec;
    record.value_codec = dense.value_codec;
    record.selector = dense.selector.spec;
    record.reference_logits = nullptr;
    record.record_logits = &*dense_logits;
    return perplexity(decoder, text_tokens, record, each);
  };
  for (size_t i = 0; i < runs.size(); ++i) {
    const KvGridRow* row = nullptr;
    for (const KvGridRow& r : rows)
      if (run_of(r) == runs[i]) {
        row = &r;
        break;
      }
    std::optional<PerplexityResult> kept;
    if (journal.kept) kept = journal.kept(*row);
    if (kept) {
      done[runs[i]] = *kept;
    } else {
      Progress each;
      if (progress)
        each = [&, i, row](int64_t scored, int64_t total) {
          progress(static_cast<int64_t>(i), static_cast<int64_t>(runs.size()), *row, scored, total);
        };
      if (runs[i] == reference) {
        done[runs[i]] = record_dense(each);
      } else {
        if (!dense_logits) record_dense(each);
        ppl.key_codec = row->key_codec;
        ppl.value_codec = row->value_codec;
        ppl.selector = row->selector.spec;
        ppl.reference_logits = &*dense_logits;
        done[runs[i]] = perplexity(decoder, text_tokens, ppl, each);
      }
    }
    if (journal.finished) journal.finished(results_so_far());
  }
  return results_so_far();
}

std::vector<KvGridRow> kv_grid_sparse_rows(const std::vector<NamedSelectorSpec>& selectors,
                                           const std::vector<KeyCodecSpec>& key_codecs) {
  std::vector<KvGridRow> rows = {{"dense", KvGridRowKind::Dense}};
  const auto add = [&](const std::string& name, const KeyCodecSpec& key_codec,
                       const NamedSelectorSpec& selector) {
    KvGridRow row{name, KvGridRowKind::Plain, key_codec};
    row.selector = selector;
    for (const KvGridRow& r : rows)
      require(r.name != row.name, "sparse perplexity grid: row '", row.name, "' given twice");
    rows.push_back(std::move(row));
  };
  const NamedSelectorSpec dense;
  const auto is_dense = [](const NamedSelectorSpec& s) {
    return s.spec.kind == SelectorKind::Dense;
  };
  for (const NamedSelectorSpec& selector : selectors)
    if (!is_dense(selector)) add(selector.text, KeyCodecSpec{}, selector);
  for (const KeyCodecSpec& codec : key_codecs) {
    const std::string canonical = codec.text();
    if (canonical != "f32") add(canonical, codec, dense);
    for (const NamedSelectorSpec& selector : selectors)
      if (!is_dense(selector)) add(canonical + " + " + selector.text, codec, selector);
  }
  return rows;
}

}  // namespace visikv

// Value bit policies (kv/value_policy.h, METHODS.md "Values"): the online A¹/A² accounting against
// brute-force sums, the policy's choice of high tokens in closed form (two and three widths, the
// modelled and the measured error drops), exact bit accounting, read-back of demoted tokens
// against the plain codecs, spec errors, and decode perplexity through a policy cache on a
// fixture model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/attention/attention.h"
#include "visikv/core/error.h"
#include "visikv/eval/perplexity.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/kv/store_factory.h"
#include "visikv/kv/value_policy.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

const std::string kModels = std::string(VISIKV_FIXTURES) + "/models";

const ValuePolicyStore& policy_store(const KVCache& cache, int64_t layer, int64_t kv_head) {
  return dynamic_cast<const ValuePolicyStore&>(
      dynamic_cast<const CodecCache&>(cache).value_store(layer, kv_head));
}

std::vector<float> stored(const VectorStore& store, int64_t position) {
  std::vector<float> out(static_cast<size_t>(store.dim()));
  store.reconstruct(position, out);
  return out;
}

// The plain codec's reading of `x` (one vector through a fresh store).
std::vector<float> plain_quantized(const std::string& spec, const std::vector<float>& x) {
  auto store = make_value_store(parse_codec_spec(spec), static_cast<int64_t>(x.size()), 0);
  store->append(x);
  return stored(*store, 0);
}

TEST(ValuePolicy, AccountingEqualsBruteForceSums) {
  const CacheShape shape{2, 2, 16};
  const int64_t group = 3;  // query heads per KV head
  auto cache = make_cache(shape, "f32", "a2:int2/int4:g16:w4:avg3");
  ASSERT_TRUE(cache->records_attention());
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  // expected[layer][kv_head][position] = {A1, A2}
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::pair<double, double>> expected;
  const int64_t tokens = 40;
  const int64_t row = shape.kv_heads * shape.head_dim;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t l = 0; l < shape.layers; ++l) {
      const std::vector<float> k = random_vector(rng, row), v = random_vector(rng, row);
      cache->append(l, k, v, 1);
      for (int64_t h = 0; h < shape.kv_heads; ++h) {
        for (int64_t g = 0; g < group; ++g) {
          // Every position, or a sorted random subset (as a sparse support would be).
          std::vector<int32_t> list;
          for (int32_t j = 0; j <= t; ++j)
            if (uniform(rng) < 0.5f || j == t) list.push_back(j);
          const bool as_range = (t + g) % 2 == 0;
          const PositionSet positions =
              as_range ? PositionSet::range(0, t + 1) : PositionSet::list(list);
          std::vector<float> weights(static_cast<size_t>(positions.size()));
          for (float& w : weights) w = uniform(rng);
          cache->record_attention(l, h, weights, positions);
          for (int64_t i = 0; i < positions.size(); ++i) {
            auto& [a1, a2] = expected[{l, h, positions[i]}];
            a1 += weights[i];
            a2 += static_cast<double>(weights[i]) * weights[i];
          }
        }
      }
    }
  }
  for (int64_t l = 0; l < shape.layers; ++l)
    for (int64_t h = 0; h < shape.kv_heads; ++h) {
      const AttentionAccount& account = policy_store(*cache, l, h).account();
      ASSERT_EQ(account.size(), tokens);
      for (int64_t j = 0; j < tokens; ++j) {
        const auto [a1, a2] = expected[{l, h, j}];
        EXPECT_NEAR(account.mass(j), a1, 1e-12 * (1 + a1)) << l << " " << h << " " << j;
        EXPECT_NEAR(account.squared_mass(j), a2, 1e-12 * (1 + a2)) << l << " " << h << " " << j;
      }
    }
  // Positions beyond the cache, or weights that do not match them: clear errors.
  const std::vector<float> w(3, 0.1f);
  EXPECT_NE(error_of([&] {
              cache->record_attention(0, 0, w, PositionSet::range(tokens - 1, tokens + 2));
            }).find("outside"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { cache->record_attention(0, 0, w, PositionSet::range(0, 2)); }).find("weights"),
      std::string::npos);
  // A plain codec cache ignores the weights.
  auto plain = make_cache(shape, "f32", "int3:g16:tok");
  EXPECT_FALSE(plain->records_attention());
}

// The reading of `x` at each level of an int2/int3/int4 (or int2/int4) policy: H as the plain codec
// reads it, each lower level the plain codec applied to the level above (demotions re-quantize the
// stored code, kv/value_policy.h).
std::vector<std::vector<float>> readings(const std::vector<std::string>& widths, int64_t group,
                                         const std::vector<float>& x) {
  std::vector<std::vector<float>> out(widths.size());
  std::vector<float> above = x;
  for (size_t k = widths.size(); k-- > 0;) {
    out[k] = plain_quantized(str_cat(widths[k], ":g", group, ":tok"), above);
    above = out[k];
  }
  return out;
}

double squared_distance(const std::vector<float>& a, const std::vector<float>& b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = static_cast<double>(a[i]) - b[i];
    sum += e * e;
  }
  return sum;
}

// Scripted attention: query t puts weight only on its own token, c_t for the "heavy" tokens
// (t % 4 == 1, c_t = 0.5 + t/1000, increasing) and 0 for the rest. int2/int4 at 2.5 bits:
// ρ = 1/4, W = 4. After n appends high_tokens(n) = max(4, floor(n/4)) tokens are int4: the window
// and cap = floor(n/4) - 4 older ones. Closed form for n ≡ 2 (mod 4): the window and the newest cap
// heavy tokens outside it (heavy tokens outrank light ones and newer heavy tokens outrank older
// ones; heavy tokens leaving while cap is 0, n < 20, are demoted at once; from n = 20 on, cap grows
// by one each time a light token leaves, which holds the slot until the next heavy token takes it).
// Recency keeps the newest high_tokens(n) at every n.
TEST(ValuePolicy, KeepsTheTopTokensHighInClosedForm) {
  const int64_t d = 16, tokens = 64;
  std::mt19937 rng(11);
  std::vector<std::vector<float>> values;
  for (int64_t t = 0; t < tokens; ++t) values.push_back(random_vector(rng, d));
  const auto heavy = [](int64_t t) { return t % 4 == 1; };
  for (const std::string rule : {"a2", "a1", "recency"}) {
    SCOPED_TRACE(rule);
    const CodecSpec spec = parse_codec_spec(rule + ":int2/int4:g16:w4:avg2.5");
    ValuePolicyStore store(spec, d, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      store.append(values[t]);
      std::vector<float> weights(static_cast<size_t>(t + 1), 0.0f);
      weights[t] = heavy(t) ? 0.5f + static_cast<float>(t) / 1000.0f : 0.0f;
      store.record_attention(weights, PositionSet::range(0, t + 1));

      const int64_t n = t + 1;
      const int64_t high = n <= 4 ? n : std::max<int64_t>(4, n / 4);
      EXPECT_EQ(spec.policy->raised_steps(n, 2), high);
      EXPECT_EQ(store.high_count(), high) << n;
      std::set<int64_t> expected;
      for (int64_t j = std::max<int64_t>(0, n - 4); j < n; ++j) expected.insert(j);  // window
      if (rule == "recency") {
        for (int64_t j = n - high; j < n; ++j) expected.insert(j);
      } else if (n % 4 == 2 && n >= 6) {
        const int64_t cap = std::max<int64_t>(0, n / 4 - 4);
        int64_t added = 0;
        for (int64_t j = n - 5; j >= 0 && added < cap; --j)
          if (heavy(j)) {
            expected.insert(j);
            ++added;
          }
      } else {
        continue;
      }
      std::set<int64_t> actual;
      for (int64_t j = 0; j < n; ++j)
        if (store.is_high(j)) actual.insert(j);
      EXPECT_EQ(actual, expected) << "after " << n << " tokens";
    }
    EXPECT_EQ(store.demotions(), tokens - store.high_count());
    // Read-back: high tokens as the plain int4 codec; demoted ones as the plain int2 codec applied
    // to their int4 reading (re-quantized from the stored code, kv/value_policy.h).
    for (int64_t j = 0; j < tokens; ++j) {
      const std::vector<float> high4 = plain_quantized("int4:g16:tok", values[j]);
      const std::vector<float> want =
          store.is_high(j) ? high4 : plain_quantized("int2:g16:tok", high4);
      EXPECT_EQ(stored(store, j), want) << j;
    }
  }
}

TEST(ValuePolicy, AverageBitsMeetTheBudgetExactly) {
  const int64_t d = 16;
  // int2:g16 = 64 bits, int4:g16 = 96 bits per value; avg2.5: ρ = 1/4, 72 bits on average.
  const CodecSpec spec = parse_codec_spec("a2:int2/int4:g16:w4:avg2.5");
  EXPECT_EQ(codec_bits(spec, d).bits_per_vector, 72.0);
  EXPECT_EQ(codec_bits(spec, d).bits_per_element, 4.5);
  ValuePolicyStore store(spec, d, 0);
  std::mt19937 rng(3);
  for (int64_t n = 1; n <= 100; ++n) {
    store.append(random_vector(rng, d));
    std::vector<float> weights(static_cast<size_t>(n));
    for (float& w : weights) w = static_cast<float>(rng() % 1000) / 1000.0f;
    store.record_attention(weights, PositionSet::range(0, n));
    const int64_t high = n <= 4 ? n : std::max<int64_t>(4, n / 4);
    EXPECT_EQ(codec_stored_bits(spec, d, n), high * 96 + (n - high) * 64) << n;
    EXPECT_EQ(store.stored_bytes() * 8, codec_stored_bits(spec, d, n)) << n;
    // Once the budget covers the window (n >= W / ρ = 16), the average is the target exactly
    // whenever ρ n is an integer, and never above it.
    if (n >= 16) {
      EXPECT_LE(codec_stored_bits(spec, d, n), 72 * n) << n;
      if (n % 4 == 0) {
        EXPECT_EQ(codec_stored_bits(spec, d, n), 72 * n) << n;
      }
    }
  }
  // Three widths and the measured drops: every demotion frees one step of 1 bit per element, so
  // the total is the budget's, whichever tokens hold the steps. int2:g16 = 64 bits, a step 16.
  for (const std::string text :
       {"a2:int2/int3/int4:g16:w4:avg2.5", "a2e:int2/int3/int4:g16:w4:avg3",
        "a2e:int2/int4:g16:w4:avg2.5", "a1:int2/int3/int4:g8:w3:avg3.25",
        "a2:int2/int3/int4:g16:w8:avg3:ramp", "a2e:int2/int4:g16:w8:avg2.5:ramp"}) {
    SCOPED_TRACE(text);
    const CodecSpec three = parse_codec_spec(text);
    const int64_t a_milli = three.policy->average_milli, k = three.policy->steps();
    const int64_t step = three.policy->step_bits(2);
    const int64_t base = d * 2 + d / three.group * 32;  // every token at int2 with its scales
    const double budget = d * (a_milli / 1000.0) + d / three.group * 32.0;
    EXPECT_EQ(codec_bits(three, d).bits_per_vector, budget);
    ValuePolicyStore policy_store(three, d, 0);
    for (int64_t n = 1; n <= 120; ++n) {
      policy_store.append(random_vector(rng, d));
      std::vector<float> weights(static_cast<size_t>(n));
      for (float& x : weights) x = static_cast<float>(rng() % 1000) / 1000.0f;
      policy_store.record_attention(weights, PositionSet::range(0, n));
      // S_n, and the window: W, or under ramp min(W, max(1, S_n / 2K)).
      const int64_t share = n * (a_milli - 2000) / (1000 * step);
      const int64_t window = three.policy->window;
      const int64_t w =
          three.policy->ramp ? std::min(window, std::max<int64_t>(1, share / (2 * k))) : window;
      EXPECT_EQ(three.policy->window_at(n, 2), w) << n;
      const int64_t steps = n <= w ? k * n : std::max(k * w, share);
      EXPECT_EQ(policy_store.raised_steps(), steps) << n;
      EXPECT_EQ(codec_stored_bits(three, d, n), n * base + steps * d * step) << n;
      EXPECT_EQ(policy_store.stored_bytes() * 8, codec_stored_bits(three, d, n)) << n;
      // Once the budget covers the window, at most the budget, exactly when (A - L) n / s is an
      // integer.
      if (steps > k * w) {
        EXPECT_LE(codec_stored_bits(three, d, n), budget * n) << n;
        if (n * (a_milli - 2000) % (1000 * step) == 0) {
          EXPECT_EQ(codec_stored_bits(three, d, n), budget * n) << n;
        }
      }
    }
    EXPECT_GT(policy_store.level_count(0), 0);
    if (k == 2) {
      EXPECT_GT(policy_store.level_count(1), 0);
    }
  }
  // The cache reports the same bits as the store holds.
  auto cache = make_cache({1, 2, d}, "f32", "a2:int2/int4:g16:w4:avg2.5");
  for (int64_t t = 0; t < 32; ++t)
    cache->append(0, random_vector(rng, 2 * d), random_vector(rng, 2 * d), 1);
  const auto& codec = dynamic_cast<const CodecCache&>(*cache);
  EXPECT_EQ(codec.stored_bytes() * 8, 2 * codec_stored_bits(parse_codec_spec("f32"), d, 32) +
                                          2 * codec_stored_bits(spec, d, 32));
  EXPECT_NE(cache->describe().find("a2:int2/int4:g16:w4:avg2.5 (4.5 bits/elt"), std::string::npos)
      << cache->describe();
}

TEST(ValuePolicy, PoliciesAtTheSameAverageBits) {
  const int64_t d = 64, n = 1024;
  const std::vector<std::string> specs = {
      "uniform:int2/int4:g64:avg3",      "recency:int2/int4:g64:w64:avg3",
      "a1:int2/int4:g64:w64:avg3",       "a2:int2/int4:g64:w64:avg3",
      "a2:int2/int3/int4:g64:w64:avg3",  "a2e:int2/int4:g64:w64:avg3",
      "a2e:int2/int3/int4:g64:w64:avg3", "a1:int2/int3/int4:g64:w64:avg3"};
  EXPECT_EQ(parse_codec_spec(specs[0]).text(), "int3:g64:tok");  // uniform: the plain codec
  for (const std::string& text : specs) {
    const CodecSpec spec = parse_codec_spec(text);
    EXPECT_EQ(codec_bits(spec, d).bits_per_vector, 64 * 3.5) << text;
    EXPECT_EQ(codec_stored_bits(spec, d, n), n * 224) << text;  // ρ n = 512, an integer
    if (spec.policy) EXPECT_EQ(parse_codec_spec(spec.text()).text(), spec.text()) << text;
  }
  EXPECT_EQ(parse_codec_spec("a2:int2/int4:g64:w64:avg2.50").text(), "a2:int2/int4:g64:w64:avg2.5");
  EXPECT_EQ(parse_codec_spec("recency:int2/int4:g64:avg3").text(), "recency:int2/int4:g64:w0:avg3");
  EXPECT_EQ(parse_codec_spec("a1:int3/int8:g32:w16:avg3.125").text(),
            "a1:int3/int8:g32:w16:avg3.125");
  EXPECT_EQ(parse_codec_spec("a2e:int2/int3/int4:g64:w64:avg2.50").text(),
            "a2e:int2/int3/int4:g64:w64:avg2.5");
  EXPECT_EQ(parse_codec_spec("uniform:int2/int3/int4:g64:avg3").text(), "int3:g64:tok");
  EXPECT_EQ(parse_codec_spec("a2:int2/int4:g64:w64:avg3:ramp:fromfloat").text(),
            "a2:int2/int4:g64:w64:avg3:ramp:fromfloat");
  EXPECT_EQ(codec_bits(parse_codec_spec("a2:int2/int4:g64:w64:avg3:ramp"), 64).bits_per_vector,
            64 * 3.5);
  // The fromfloat control: the same bits reported (the float values are not counted).
  const CodecSpec control = parse_codec_spec("a2e:int2/int3/int4:g64:w64:avg3:fromfloat");
  EXPECT_EQ(control.text(), "a2e:int2/int3/int4:g64:w64:avg3:fromfloat");
  EXPECT_EQ(parse_codec_spec(control.text()).text(), control.text());
  EXPECT_EQ(codec_bits(control, d).bits_per_vector, 64 * 3.5);
  EXPECT_NE(describe_codec(control, 64).find("control"), std::string::npos);
  EXPECT_NE(describe_codec(parse_codec_spec("a2:int2/int3/int4:g64:w64:avg3"), 64)
                .find("at int3 or int4"),
            std::string::npos);
}

TEST(ValuePolicy, BadSpecsAreClearErrors) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"a2:int2/int4:g64:avg3", "needs a window"},
      {"a2:int2:g64:w64:avg3", "must be int<L>/int<H>"},
      {"a2:int4/int2:g64:w64:avg3", "exceeds the high width"},
      {"a2:int2/int5:g64:w64:avg3", "unsupported high width"},
      {"a2:int2/int4:g64:w64:avg5", "outside [2, 4]"},
      {"a2:int2/int4:g64:w64:avg3.1234", "at most three fraction digits"},
      {"a2:int2/int4:g64:w64:avg", "decimal number"},
      {"a2:int4/int4:g64:w64:avg3", "outside [4, 4]"},
      {"uniform:int2/int4:g64:avg2.5", "uniform needs an average that is a code width"},
      {"uniform:int2/int4:g64:w8:avg3", "takes no window"},
      {"a2:int2/int4:x64:w64:avg3", "group size"},
      {"a2:int2/int4:g64:w64:avg3:had", "fields"},
      // Three widths.
      {"a2:int2/int3/int8:g64:w64:avg3", "equally spaced"},
      {"a2:int2/int2/int4:g64:w64:avg3", "strictly between"},
      {"a2:int2/int4/int3:g64:w64:avg3", "strictly between"},
      {"a2:int2/int5/int4:g64:w64:avg3", "unsupported middle width"},
      {"a2:int2/int3/int4/int8:g64:w64:avg3", "must be int<L>/int<H> or int<L>/int<M>/int<H>"},
      {"a2:int2//int4:g64:w64:avg3", "middle width ''"},
      {"recency:int2/int3/int4:g64:w64:avg3", "recency takes two widths only"},
      {"a2e:int2/int3/int4:g64:avg3", "needs a window"},
      {"a2e:int2/int3/int4:g64:w64:avg4.5", "outside [2, 4]"},
      {"uniform:int2/int4:g64:avg3:fromfloat", "no fromfloat"},
      {"uniform:int2/int4:g64:avg3:ramp", "no ramp"},
      {"a2:int2/int4:g64:w64:avg3:fromfloat:ramp", "6 fields"},
      {"a2:int2/int4:g64:w64:fromfloat:avg3", "6 fields"},
      {"a2", "fields"},
      // Fields shorter than their prefix (found by fuzz_specs: these once threw out_of_range).
      {"a2:int2/int2::", "group size"},
      {"a2:in/int4:g64:w64:avg3", "low width 'in'"},
      {"a2:int2/int4:g64:w64:av", "the average 'av'"},
      {"a2:int2/int4::w64:avg3", "group size"},
  };
  for (const auto& test_case : cases) {
    const auto& spec = test_case.first;
    const auto& message = test_case.second;
    const std::string error = error_of([&] { parse_codec_spec(spec); });
    EXPECT_NE(error.find(message), std::string::npos) << spec << ": " << error;
    EXPECT_NE(error.find(spec), std::string::npos) << "names the spec: " << error;
  }
  const CacheShape shape{1, 1, 16};
  EXPECT_NE(error_of([&] {
              make_cache(shape, "a2:int2/int4:g16:w4:avg3", "f32");
            }).find("for values only"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { make_cache(shape, "f32", "a2:int2/int4:g12:w4:avg3"); }).find("multiple of 8"),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              make_cache(shape, "f32", "a2:int2/int4:g64:w4:avg3");
            }).find("does not divide"),
            std::string::npos);
  auto cache = make_cache(shape, "f32", "a2:int2/int4:g16:w4:avg3");
  std::vector<float> two(32, 0.5f);
  EXPECT_NE(error_of([&] { cache->append(0, two, two, 2); }).find("one token per append"),
            std::string::npos);
}

// Three widths, modelled drops. Query t puts weight c_t only on its own token, so w_j = c_j² is
// final once j is read: heavy tokens (t >= 8, t % 4 == 3) c = 1, light ones c = 0.1 (1 + t/1000),
// slowly rising. int2/int3/int4 at 3 bits, W = 4: the budget holds n steps above int2, the window
// 2 W of them, so cap = max(0, n - 2 W) for the tokens outside it and one step goes back per
// append from n = 2 W on. The model's step gains are w (int3 -> int4) and 5.68 w (int2 -> int3):
// a light token leaving the window gives its int4 step back at once (0.01 < 5.68 · 0.01), and a
// heavy one, worth 1 a step, makes the oldest light token at int3 (the smallest 5.68 w) drop to
// int2. Closed form after n appends: the window at int4; the tokens that left while cap was 0
// (positions < W) at int2; heavy tokens outside the window at int4; of the light ones the newest
// m = cap - 2·(heavy outside) at int3, the older at int2.
// The fromfloat control chooses the same levels (the modelled gains do not depend on the readings)
// and reads every token as the plain codec of its level reads its float value.
void three_widths_follow_the_modelled_gains(bool from_float);
TEST(ValuePolicy, ThreeWidthsFollowTheModelledGains) {
  for (const bool from_float : {false, true}) {
    SCOPED_TRACE(from_float);
    three_widths_follow_the_modelled_gains(from_float);
  }
}

void three_widths_follow_the_modelled_gains(bool from_float) {
  const int64_t d = 16, window = 4, tokens = 80;
  const CodecSpec spec = parse_codec_spec(std::string("a2:int2/int3/int4:g16:w4:avg3") +
                                          (from_float ? ":fromfloat" : ""));
  ASSERT_EQ(spec.policy->steps(), 2);
  ASSERT_EQ(spec.policy->from_float, from_float);
  ValuePolicyStore store(spec, d, 0);
  std::mt19937 rng(5);
  const auto heavy = [](int64_t t) { return t >= 8 && t % 4 == 3; };
  std::vector<std::vector<float>> values;
  for (int64_t t = 0; t < tokens; ++t) {
    values.push_back(random_vector(rng, d));
    store.append(values.back());
    std::vector<float> weights(static_cast<size_t>(t + 1), 0.0f);
    weights[t] = heavy(t) ? 1.0f : 0.1f * (1.0f + static_cast<float>(t) / 1000.0f);
    store.record_attention(weights, PositionSet::range(0, t + 1));

    const int64_t n = t + 1;
    ASSERT_EQ(store.raised_steps(), spec.policy->raised_steps(n, 2)) << n;
    ASSERT_EQ(spec.policy->raised_steps(n, 2), n <= window ? 2 * n : std::max(2 * window, n));
    if (n <= 2 * window) continue;
    const int64_t outside = n - window;
    int64_t heavy_outside = 0;
    for (int64_t j = 0; j < outside; ++j) heavy_outside += heavy(j);
    int64_t middle = n - 2 * window - 2 * heavy_outside;
    ASSERT_GE(middle, 0);
    std::vector<int> want(static_cast<size_t>(n), 0);
    for (int64_t j = outside; j < n; ++j) want[j] = 2;
    for (int64_t j = outside - 1; j >= window; --j) {
      if (heavy(j)) {
        want[j] = 2;
      } else if (middle > 0) {
        want[j] = 1;
        --middle;
      }
    }
    std::vector<int> got;
    for (int64_t j = 0; j < n; ++j) got.push_back(store.level(j));
    ASSERT_EQ(got, want) << "after " << n << " tokens";
  }
  // The modelled gains: a light token at int3 is worth (1/9 - 1/49) / (1/49 - 1/225) = 5.68 w.
  const double ratio = (1.0 / 9 - 1.0 / 49) / (1.0 / 49 - 1.0 / 225);
  for (int64_t j = 0; j < tokens; ++j) {
    const double w = store.account().squared_mass(j);
    const double want = store.level(j) == 2 ? w : store.level(j) == 1 ? ratio * w : 0.0;
    EXPECT_NEAR(store.gain(j), want, 1e-12 * want) << j;
  }
  // Read-back: each token as the plain codecs read it down its chain of demotions (fromfloat:
  // as the plain codec of its level reads the float value).
  const std::vector<std::string> names = {"int2", "int3", "int4"};
  for (int64_t j = 0; j < tokens; ++j) {
    const std::vector<float> want =
        from_float ? plain_quantized(str_cat(names[store.level(j)], ":g16:tok"), values[j])
                   : readings(names, 16, values[j])[store.level(j)];
    EXPECT_EQ(stored(store, j), want) << j;
  }
  EXPECT_EQ(store.level_count(0) + store.level_count(1) + store.level_count(2), tokens);
  EXPECT_EQ(store.demotions(), 2 * tokens - tokens);  // every append's two steps, less the budget
}

// The window that grows with the budget (:ramp). Query t puts weight 1 on token 4 (from t = 4 on)
// and 0.1 (1 + t/1000) on its own token. With the fixed window (W = 8, int2/int4 at 3 bits) token
// 4 leaves it at n = 13, when the window alone holds the budget (cap = max(8, 6) - 8 = 0), and is
// demoted with every token before it. Under ramp the window is min(8, max(1, floor(n/2) / 2))
// tokens: token 4 leaves it at n = 6 with cap = 3 - 1 = 2 steps for the tokens outside, and its
// weight, the largest, keeps it at int4 to the end; the budget holds exactly from n = 2 on.
TEST(ValuePolicy, RampedWindowRanksTheFirstTokens) {
  const int64_t d = 16, tokens = 64;
  std::mt19937 rng(13);
  for (const bool ramp : {false, true}) {
    SCOPED_TRACE(ramp);
    const CodecSpec spec =
        parse_codec_spec(std::string("a2:int2/int4:g16:w8:avg3") + (ramp ? ":ramp" : ""));
    ValuePolicyStore store(spec, d, 0);
    for (int64_t t = 0; t < tokens; ++t) {
      store.append(random_vector(rng, d));
      std::vector<float> weights(static_cast<size_t>(t + 1), 0.0f);
      weights[t] = 0.1f * (1.0f + static_cast<float>(t) / 1000.0f);
      if (t >= 4) weights[4] = 1.0f;
      store.record_attention(weights, PositionSet::range(0, t + 1));
      const int64_t n = t + 1;
      EXPECT_EQ(store.raised_steps(), spec.policy->raised_steps(n, 2)) << n;
      EXPECT_EQ(store.stored_bytes() * 8, codec_stored_bits(spec, d, n)) << n;
      if (ramp && n >= 2) EXPECT_EQ(spec.policy->raised_steps(n, 2), n / 2) << n;
    }
    EXPECT_EQ(store.is_high(4), ramp);
    EXPECT_EQ(store.high_count(), tokens / 2);
  }
}

// The measured drops (a2e): "rough" tokens (even positions, values of scale 1) lose much more to
// int2 than "smooth" ones (odd, scale 0.001), while the smooth ones get slightly more attention
// (c = 0.5 against 0.45). A² alone keeps smooth tokens at int4 (two widths; with three, the
// weights differ by less than the 5.7 its model asks before one token goes to int4 and another
// to int2, so every token leaving the window settles at int3); a2e, weighing each token's own
// error drop, keeps rough ones at int4 and gives the smooth ones' steps back. Two widths at 3
// bits (ρ = 1/2, W = 2): after n appends floor(n/2) - 2 tokens outside the window are int4, never
// more than the rough ones there. (61 tokens: the last append gives a step back, so no token that
// just left the window is still waiting for the next one.)
TEST(ValuePolicy, ReadoutErrorPolicyWeighsEachTokensOwnError) {
  const int64_t d = 16, tokens = 61;
  std::mt19937 rng(9);
  std::vector<std::vector<float>> values;
  for (int64_t t = 0; t < tokens; ++t)
    values.push_back(random_vector(rng, d, t % 2 == 0 ? 1.0f : 0.001f));
  for (const std::string rule : {"a2", "a2e"}) {
    SCOPED_TRACE(rule);
    for (const auto& [widths, from_float] :
         std::vector<std::pair<std::string, bool>>{{"int2/int4", false},
                                                   {"int2/int3/int4", false},
                                                   {"int2/int4", true},
                                                   {"int2/int3/int4", true}}) {
      SCOPED_TRACE(widths + (from_float ? " fromfloat" : ""));
      const CodecSpec spec =
          parse_codec_spec(rule + ":" + widths + ":g16:w2:avg3" + (from_float ? ":fromfloat" : ""));
      ValuePolicyStore store(spec, d, 0);
      for (int64_t t = 0; t < tokens; ++t) {
        store.append(values[t]);
        std::vector<float> weights(static_cast<size_t>(t + 1), 0.0f);
        weights[t] = t % 2 == 0 ? 0.45f : 0.5f;
        store.record_attention(weights, PositionSet::range(0, t + 1));
        EXPECT_EQ(store.raised_steps(), spec.policy->raised_steps(t + 1, 2));
        EXPECT_EQ(store.stored_bytes() * 8, codec_stored_bits(spec, d, t + 1));
      }
      const int top = spec.policy->steps();
      int64_t rough_high = 0, smooth_high = 0;
      for (int64_t j = 0; j < tokens - 2; ++j)
        if (store.level(j) == top) ++(j % 2 == 0 ? rough_high : smooth_high);
      if (top == 1) EXPECT_EQ(rough_high + smooth_high, tokens / 2 - 2);
      if (rule == "a2e") {
        EXPECT_EQ(smooth_high, 0);
        EXPECT_GT(rough_high, 0);
      } else {
        EXPECT_EQ(rough_high, 0);
        if (top == 1) EXPECT_GT(smooth_high, 0);
        if (top == 2) {
          EXPECT_EQ(smooth_high, 0);
          for (int64_t j = 2; j < tokens - 2; ++j) EXPECT_EQ(store.level(j), 1) << j;
        }
      }
      // a2e's gain is the token's own drop at its top step, measured down its chain of readings.
      if (rule != "a2e") continue;
      const std::vector<std::string> names = top == 1
                                                 ? std::vector<std::string>{"int2", "int4"}
                                                 : std::vector<std::string>{"int2", "int3", "int4"};
      for (int64_t j = 0; j < tokens; ++j) {
        const int level = store.level(j);
        if (level == 0) continue;
        std::vector<std::vector<float>> r = readings(names, 16, values[j]);
        if (from_float)  // each level read from the float value
          for (size_t k = 0; k < names.size(); ++k)
            r[k] = plain_quantized(str_cat(names[k], ":g16:tok"), values[j]);
        const double drop =
            squared_distance(values[j], r[level - 1]) - squared_distance(values[j], r[level]);
        const double want = store.account().squared_mass(j) * drop;
        EXPECT_NEAR(store.gain(j), want, 1e-9 * std::abs(want) + 1e-18) << j;
        EXPECT_EQ(stored(store, j), r[level]) << j;
      }
    }
  }
}

// Sums a² per (layer, KV head, position) from the events attention reports.
class SquaredMass final : public AttentionObserver {
 public:
  void observe(const AttentionEvent& e) override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t i = 0; i < e.positions.size(); ++i)
      sums[{e.layer, e.kv_head, e.positions[i]}] +=
          static_cast<double>(e.weights[i]) * e.weights[i];
  }
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> sums;

 private:
  std::mutex mutex_;
};

TEST(ValuePolicy, DecodePerplexityOnAFixtureModel) {
  const Model llama = Model::load(kModels + "/llama");
  Decoder decoder(llama);
  const CacheShape shape = decoder.cache_shape();
  ASSERT_EQ(shape.head_dim, 16);
  const std::string text =
      "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
      "All that glitters is not gold, and every cloud has a silver lining somewhere.";
  std::vector<int32_t> ids = llama.tokenizer().encode(text + " " + text + " " + text, false);
  ASSERT_GE(ids.size(), 64u);

  // The decoder hands the cache the weights attention used: the account equals the sums of a²
  // that attention reported to an observer.
  {
    auto cache = make_cache(shape, "f32", "a2:int2/int4:g16:w4:avg3", 64);
    SquaredMass observer;
    for (int64_t t = 0; t < 48; ++t)
      decoder.forward(std::span(ids).subspan(t, 1), *cache, LogitRows::Last,
                      [](int64_t, int64_t, std::span<const float>) {}, {.observer = &observer});
    for (int64_t l = 0; l < shape.layers; ++l)
      for (int64_t h = 0; h < shape.kv_heads; ++h) {
        const ValuePolicyStore& store = policy_store(*cache, l, h);
        ASSERT_EQ(store.account().size(), 48);
        for (int64_t j = 0; j < 48; ++j) {
          const double want = observer.sums[{l, h, j}];
          EXPECT_NEAR(store.account().squared_mass(j), want, 1e-12 * (1 + want));
        }
        EXPECT_EQ(store.high_count(), std::max<int64_t>(4, 48 / 2));
      }
    // A forward over several tokens attends them one at a time inside each layer: with weight
    // products rounded per token it accounts exactly what single-token forwards accounted.
    auto chunked = make_cache(shape, "f32", "a2:int2/int4:g16:w4:avg3", 64);
    decoder.set_product_rounding(ProductRounding::PerToken);
    decoder.forward(std::span(ids).first(48), *chunked, LogitRows::Last,
                    [](int64_t, int64_t, std::span<const float>) {});
    decoder.set_product_rounding(ProductRounding::Fastest);
    for (int64_t l = 0; l < shape.layers; ++l)
      for (int64_t h = 0; h < shape.kv_heads; ++h)
        for (int64_t j = 0; j < 48; ++j)
          EXPECT_EQ(policy_store(*chunked, l, h).account().squared_mass(j),
                    policy_store(*cache, l, h).account().squared_mass(j));
  }

  PerplexityOptions o;
  o.mode = PerplexityMode::Decode;
  o.window = 64;
  o.max_tokens = 120;
  if (llama.tokenizer().adds_bos()) o.bos = llama.tokenizer().bos_id();
  const auto ppl = [&](const std::string& values) {
    o.value_codec = parse_value_codec_spec(values);
    return perplexity(decoder, ids, o).ppl;
  };
  const double dense = ppl("f32");
  const double low = ppl("int2:g16:tok");
  for (const std::string policy : {"a2:int2/int4:g16:w4:avg3", "a1:int2/int4:g16:w4:avg3",
                                   "recency:int2/int4:g16:w4:avg3", "a2:int2/int3/int4:g16:w4:avg3",
                                   "a2e:int2/int4:g16:w4:avg3", "a2e:int2/int3/int4:g16:w4:avg3"}) {
    const double p = ppl(policy);
    EXPECT_TRUE(std::isfinite(p)) << policy;
    // Sanity: half the tokens at int4 sits between dense values and all-int2 values.
    EXPECT_GT(std::abs(p - dense), 0.0) << policy;
    EXPECT_LT(std::abs(p - dense), std::abs(low - dense))
        << policy << " " << p << " dense " << dense << " int2 " << low;
  }
  // Equal widths: the policy is the plain codec, to the bit.
  EXPECT_EQ(ppl("a2:int4/int4:g16:w4:avg4"), ppl("int4:g16:tok"));
  EXPECT_EQ(ppl("recency:int3/int3:g8:avg3"), ppl("int3:g8:tok"));
  EXPECT_EQ(ppl("a2e:int3/int3:g16:w4:avg3"), ppl("int3:g16:tok"));
  // Decode order in chunks (the whole window in one forward) is token-by-token decode exactly.
  const std::vector<std::string> chunked = {
      "a2:int2/int4:g16:w4:avg3", "a2:int2/int3/int4:g16:w4:avg2.5",
      "a2e:int2/int3/int4:g16:w4:avg3", "a2:int2/int3/int4:g16:w4:avg3:ramp"};
  std::vector<double> decode;
  for (const std::string& policy : chunked) decode.push_back(ppl(policy));
  o.mode = PerplexityMode::DecodeBatched;
  for (size_t i = 0; i < chunked.size(); ++i) EXPECT_EQ(ppl(chunked[i]), decode[i]) << chunked[i];
}

}  // namespace
}  // namespace visikv

// Decode order in chunks (KVCache::decode_equivalent_chunk, PerplexityMode::DecodeBatched).
//
// The chunk rule is checked against a brute-force oracle built from token-by-token appends: the
// stored form of every position a query reads, as it stands after that query's own append,
// must be the same at the end of the chunk, and the claimed chunk must be the longest with that
// property. Then decode-batched perplexity and logits are compared with token-by-token decode on
// the tiny Llama fixture, and perplexity on the default model: with the weight products of a
// chunk rounded per token (ProductRounding::PerToken, which decode-batched sets) they must be
// identical bit for bit, for dense keys and for 2-bit keys alike.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/perplexity.h"
#include "visikv/eval/text_input.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;

// Every stored key and value of positions [0, length) of layer 0, head 0, model coordinates.
std::vector<float> stored_state(const CodecCache& cache, int64_t length) {
  const int64_t d = cache.shape().head_dim;
  std::vector<float> state(static_cast<size_t>(2 * length * d));
  for (int64_t p = 0; p < length; ++p) {
    cache.stored_key(0, 0, p, std::span(state).subspan(2 * p * d, d));
    cache.stored_value(0, 0, p, std::span(state).subspan((2 * p + 1) * d, d));
  }
  return state;
}

bool same_prefix(const std::vector<float>& a, const std::vector<float>& b, int64_t positions,
                 int64_t d) {
  return std::equal(a.begin(), a.begin() + 2 * positions * d, b.begin());
}

// The oracle: after m appends the stored state is states[m - 1]. A chunk of c tokens starting
// at a is decode-equivalent when for each query t in [a, a + c) the positions 0..t read the
// same in states[a + c - 1] as in states[t].
int64_t longest_equivalent_chunk(const std::vector<std::vector<float>>& states, int64_t a,
                                 int64_t d) {
  const int64_t n = static_cast<int64_t>(states.size());
  int64_t best = 1;
  for (int64_t c = 1; a + c <= n; ++c) {
    bool ok = true;
    for (int64_t t = a; t < a + c && ok; ++t)
      ok = same_prefix(states[a + c - 1], states[t], t + 1, d);
    if (ok) best = c;
  }
  return best;
}

void check_chunk_rule(const std::string& key_spec, const std::string& value_spec) {
  SCOPED_TRACE(key_spec + " / " + value_spec);
  constexpr int64_t d = 16, n = 90;
  const CacheShape shape{2, 1, d};
  std::mt19937 rng(7);
  const std::vector<float> keys = random_vector(rng, n * d), values = random_vector(rng, n * d);
  const auto slice = [&](const std::vector<float>& x, int64_t first, int64_t count) {
    return std::span(x).subspan(first * d, count * d);
  };

  // Token by token, recording the stored state after every append.
  auto reference = make_cache(shape, key_spec, value_spec, n);
  const auto& ref = dynamic_cast<const CodecCache&>(*reference);
  std::vector<std::vector<float>> states;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t layer = 0; layer < 2; ++layer)
      reference->append(layer, slice(keys, t, 1), slice(values, t, 1), 1);
    states.push_back(stored_state(ref, t + 1));
  }

  // In the chunks the cache allows: each claim is the oracle's longest chunk (capped by what is
  // left), and the final state is the token-by-token one.
  auto chunked = make_cache(shape, key_spec, value_spec, n);
  int64_t longest_claim = 0;
  for (int64_t a = 0; a < n;) {
    const int64_t claim = chunked->decode_equivalent_chunk(0);
    EXPECT_EQ(claim, chunked->decode_equivalent_chunk(1));
    const int64_t chunk = std::min(claim, n - a);
    EXPECT_EQ(chunk, longest_equivalent_chunk(states, a, d)) << "at position " << a;
    longest_claim = std::max(longest_claim, chunk);
    for (int64_t layer = 0; layer < 2; ++layer)
      chunked->append(layer, slice(keys, a, chunk), slice(values, a, chunk), chunk);
    a += chunk;
  }
  EXPECT_GT(longest_claim, 1);  // every spec here allows some batching
  EXPECT_EQ(stored_state(dynamic_cast<const CodecCache&>(*chunked), n), states.back());
}

TEST(DecodeEquivalentChunk, MatchesTheTokenByTokenOracle) {
  check_chunk_rule("f16", "f32");
  check_chunk_rule("int2:g16:tok", "f32");
  check_chunk_rule("int3:g8:tok:had", "int4:g8:tok");
  check_chunk_rule("int2:g8:chan:r16", "f32");
  check_chunk_rule("int2:g8:chan", "f32");
  check_chunk_rule("int4:g16:tok", "int2:g4:chan:r8");
  check_chunk_rule("int2:g16:tok+headq:r4:s4:random", "f32");
  check_chunk_rule("int2:g8:chan:r16+headq:r4:s4:random", "int2:g16:tok");
}

TEST(DecodeEquivalentChunk, PerTokenWindowsAllowOnlySingleTokensOnceFull) {
  // A per-token codec with an fp16 window quantizes the token that leaves it at every append:
  // the query before it still read that token in fp16.
  auto cache = make_cache({1, 1, 16}, "int2:g16:tok:r4", "f32", 16);
  const std::vector<float> row(16, 0.5f);
  EXPECT_EQ(cache->decode_equivalent_chunk(0), 4);  // the first 4 stay in the window
  for (int i = 0; i < 4; ++i) cache->append(0, row, row, 1);
  EXPECT_EQ(cache->decode_equivalent_chunk(0), 1);
  auto dense = make_cache({1, 1, 16}, "f32", "f32");
  EXPECT_GE(dense->decode_equivalent_chunk(0), int64_t{1} << 40);
}

TEST(DecodeEquivalentChunk, ModeNames) {
  EXPECT_EQ(perplexity_mode_from_name("decode-batched"), PerplexityMode::DecodeBatched);
  EXPECT_EQ(perplexity_mode_name(PerplexityMode::DecodeBatched), "decode-batched");
  EXPECT_NE(error_of([] { perplexity_mode_from_name("batched"); }).find("decode-batched"),
            std::string::npos);
}

// Logits of `tokens` run in decode order: one token per forward call, or in the chunks the
// cache allows. `calls` receives the number of forward calls.
std::vector<float> decode_logits(Decoder& decoder, std::span<const int32_t> tokens,
                                 const std::string& keys, const std::string& values, bool batched,
                                 int64_t& calls) {
  const int64_t vocab = decoder.model().config().vocab_size;
  auto cache = make_cache(decoder.cache_shape(), keys, values, tokens.size());
  std::vector<float> logits(tokens.size() * vocab, NAN);
  // Chunks round their weight products as single tokens do (what the decode-batched mode sets).
  decoder.set_product_rounding(batched ? ProductRounding::PerToken : ProductRounding::Fastest);
  calls = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(tokens.size());) {
    int64_t chunk = 1;
    if (batched) {
      chunk = std::min(static_cast<int64_t>(tokens.size()) - t, decode_order_chunk(*cache));
    }
    decoder.forward(tokens.subspan(t, chunk), *cache, LogitRows::All,
                    [&](int64_t row, int64_t, std::span<const float> l) {
                      std::copy(l.begin(), l.end(), logits.begin() + (t + row) * vocab);
                    });
    t += chunk;
    ++calls;
  }
  return logits;
}

struct Agreement {
  double max_logit_error = 0, logit_scale = 0;
  int64_t batched_calls = 0;
  double decode_nll = 0, batched_nll = 0;
};

// Logits of one window and perplexity over one window, token by token and batched.
Agreement compare_modes(Decoder& decoder, std::span<const int32_t> text, int64_t window,
                        const std::string& keys, const std::string& values,
                        std::optional<int32_t> bos) {
  Agreement a;
  std::vector<int32_t> tokens;
  if (bos) tokens.push_back(*bos);
  tokens.insert(tokens.end(), text.begin(), text.begin() + (window - tokens.size()));
  int64_t decode_calls = 0;
  const std::vector<float> reference =
      decode_logits(decoder, tokens, keys, values, false, decode_calls);
  const std::vector<float> batched =
      decode_logits(decoder, tokens, keys, values, true, a.batched_calls);
  for (size_t i = 0; i < reference.size(); ++i) {
    a.max_logit_error = std::max(a.max_logit_error, double(std::abs(reference[i] - batched[i])));
    a.logit_scale = std::max(a.logit_scale, double(std::abs(reference[i])));
  }
  PerplexityOptions o;
  o.max_tokens = window - 1;
  o.window = window;
  o.key_codec = parse_key_codec_spec(keys);
  o.value_codec = parse_value_codec_spec(values);
  o.bos = bos;
  o.mode = PerplexityMode::Decode;
  a.decode_nll = perplexity(decoder, text, o).nll;
  o.mode = PerplexityMode::DecodeBatched;
  a.batched_nll = perplexity(decoder, text, o).nll;
  return a;
}

// With per-token rounding of the weight products, a chunk computes what its tokens compute one
// at a time: the same stored codes, the same logits, bit for bit.
void expect_identical(const Agreement& a, int64_t max_calls) {
  EXPECT_GT(a.batched_calls, 0);
  EXPECT_LE(a.batched_calls, max_calls);
  EXPECT_GT(a.logit_scale, 1e-3);
  EXPECT_EQ(a.max_logit_error, 0.0);
  EXPECT_EQ(a.batched_nll, a.decode_nll);
}

const std::string& kText = test_support::kEnglishText;

// The default model's file, or a failure saying where it should be.
void expect_default_model() {
  const auto path = Model::default_model_path();
  ASSERT_TRUE(std::filesystem::exists(path))
      << "the default model is missing at " << path << ": run scripts/setup.sh";
}

// Options for one window of `window` tokens of `model` (BOS first where its tokenizer adds one),
// every text token in it scored.
PerplexityOptions one_window(const Model& model, int64_t window) {
  PerplexityOptions o;
  o.window = window;
  o.max_tokens = window - 1;
  if (model.tokenizer().adds_bos()) o.bos = model.tokenizer().bos_id();
  return o;
}

TEST(DecodeBatched, AgreesWithTokenByTokenOnTheFixture) {
  const Model llama = Model::load(std::string(VISIKV_FIXTURES) + "/models/llama");
  Decoder decoder(llama);
  ASSERT_EQ(decoder.cache_shape().head_dim, 16);
  const std::vector<int32_t> text = llama.tokenizer().encode(kText + kText + kText, false);
  constexpr int64_t kWindow = 100;
  ASSERT_GE(static_cast<int64_t>(text.size()), kWindow);
  const std::optional<int32_t> bos = llama.tokenizer().bos_id();
  // Per-token codecs: one chunk. Per-channel g8 with a 16-token window: the first chunk ends
  // before the first flush at 24 tokens, then one chunk per 8-token group (10 calls in all).
  const struct {
    const char *keys, *values;
    int64_t calls;
  } cases[] = {{"f32", "f32", 1},
               {"int2:g16:tok", "f32", 1},
               {"int2:g8:chan:r16", "f32", 11},
               {"int2:g16:tok+headq:r4:s4:random", "int2:g16:tok", 1},
               {"int2:g8:chan:r16+headq:r4:s4:random", "f32", 11},
               // Value policies: the decoder attends token by token inside one chunk.
               {"int2:g16:tok", "a2:int2/int4:g16:w8:avg3", 1},
               {"int2:g8:chan:r16", "a1:int2/int4:g8:w16:avg2.5", 1},
               {"f32", "recency:int2/int4:g16:w8:avg3", 1}};
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.keys) + " / " + c.values);
    expect_identical(compare_modes(decoder, text, kWindow, c.keys, c.values, bos), c.calls);
  }
}

TEST(DecodeBatched, AgreesWithTokenByTokenOnTheDefaultModel) {
  ASSERT_NO_FATAL_FAILURE(expect_default_model());
  const Model model = Model::load("default");
  Decoder decoder(model);
  ASSERT_EQ(decoder.cache_shape().head_dim, 64);
  // 200 positions: past the first flush of int2:g32:chan:r128 (at 160) and the next (192).
  constexpr int64_t kWindow = 200;
  const std::vector<int32_t> text =
      leading_tokens(model.tokenizer(), read_text_file(default_test_text()), kWindow);
  PerplexityOptions o = one_window(model, kWindow);
  // Bit for bit, for dense keys and for 2-bit keys (where any rounding difference could move a
  // key across a code boundary).
  const struct {
    const char *keys, *values;
  } cases[] = {{"f32", "f32"},
               {"int2:g64:tok", "f32"},
               {"int2:g32:chan:r128", "f32"},
               {"int2:g64:tok+headq:r8:s4:random", "f32"},
               {"int2:g64:tok+headq:r8:s4:random", "a2:int2/int4:g64:w64:avg2.5"}};
  for (const auto& [keys, values] : cases) {
    SCOPED_TRACE(std::string(keys) + " / " + values);
    o.key_codec = parse_key_codec_spec(keys);
    o.value_codec = parse_value_codec_spec(values);
    o.mode = PerplexityMode::Decode;
    const double decode = perplexity(decoder, text, o).nll;
    o.mode = PerplexityMode::DecodeBatched;
    const double batched = perplexity(decoder, text, o).nll;
    EXPECT_EQ(batched, decode);
    // Per-token codes never change after their append, and the default model's weights are GGUF
    // blocks, whose products round per token in prefill too: one prefill pass is decode as well.
    if (std::string(keys).find(":chan") == std::string::npos) {
      o.mode = PerplexityMode::Prefill;
      EXPECT_EQ(perplexity(decoder, text, o).nll, decode);
    }
  }
}

// int16 products in decode order: kept where every matrix is a GGUF block type (their products
// round per token at any chunk length), so decode-batched gives token-by-token's bits with them
// too, and differs from exact; refused with a clear error on float weights.
TEST(DecodeBatched, KeepsInt16ProductsOfBlockWeightsAndRefusesFloatOnes) {
  ASSERT_NO_FATAL_FAILURE(expect_default_model());
  const Model model = Model::load("default");
  Decoder decoder(model);
  constexpr int64_t kWindow = 64;
  const std::vector<int32_t> text =
      leading_tokens(model.tokenizer(), read_text_file(default_test_text()), kWindow);
  PerplexityOptions o = one_window(model, kWindow);
  o.key_codec = parse_key_codec_spec("int2:g64:tok");
  o.mode = PerplexityMode::Decode;
  const double exact = perplexity(decoder, text, o).nll;
  decoder.set_product_rounding(ProductRounding::QuantizedActivations16);
  const double decode = perplexity(decoder, text, o).nll;
  o.mode = PerplexityMode::DecodeBatched;
  const double batched = perplexity(decoder, text, o).nll;
  EXPECT_EQ(decoder.product_rounding(), ProductRounding::QuantizedActivations16);
  EXPECT_EQ(batched, decode);
  EXPECT_NE(batched, exact) << "the int16 products did not run";

  const Model llama = Model::load(std::string(VISIKV_FIXTURES) + "/models/llama");
  Decoder float_decoder(llama);
  float_decoder.set_product_rounding(ProductRounding::QuantizedActivations16);
  const std::vector<int32_t> fixture_text = llama.tokenizer().encode(kText, false);
  PerplexityOptions f;
  f.window = 32;
  f.max_tokens = 31;
  f.mode = PerplexityMode::DecodeBatched;
  EXPECT_NE(test_support::error_of([&] {
              perplexity(float_decoder, fixture_text, f);
            }).find("needs GGUF block weights in every matrix"),
            std::string::npos);
}

// Inputs longer than Decoder::kForwardChunk run in passes of that many tokens where that gives
// one pass's bits (block weights, or per-token rounding; dense attention; a cache whose appends
// are decode-equivalent): the logits of every row equal those of one forward_batch pass, bit for
// bit, the sink sees every row once and in order, LogitRows::Last gives the last row only and
// LogitRows::None none. Where the passes would not be exact (float weights with sgemm), the input
// runs in one pass: the same bits again.
void expect_passes_equal_one_pass(Decoder& decoder, const std::vector<int32_t>& tokens,
                                  const char* keys, bool all_row_kinds) {
  const int64_t n = static_cast<int64_t>(tokens.size()),
                vocab = decoder.model().config().vocab_size;
  ASSERT_GT(n, Decoder::kForwardChunk);
  // One pass (forward_batch never splits); LogitRows::Last computes the last row's product
  // alone, which for float weights may round otherwise than the All pass's.
  const auto one_pass = [&](LogitRows rows) {
    auto cache = make_cache(decoder.cache_shape(), keys, "f32");
    std::vector<float> logits(static_cast<size_t>(n * vocab));
    const DecoderSegment segment{
        .tokens = tokens,
        .cache = cache.get(),
        .rows = rows,
        .sink = [&](int64_t first, int64_t, std::span<const float> values) {
          std::copy(values.begin(), values.end(),
                    logits.begin() + (rows == LogitRows::All ? first : 0) * vocab);
        }};
    decoder.forward_batch({&segment, 1});
    return logits;
  };
  const std::vector<float> all_rows = one_pass(LogitRows::All),
                           last_row = one_pass(LogitRows::Last);
  auto cache = make_cache(decoder.cache_shape(), keys, "f32");
  std::vector<float> chunked(static_cast<size_t>(n * vocab),
                             std::numeric_limits<float>::quiet_NaN());
  int64_t next_row = 0;
  decoder.forward(tokens, *cache, LogitRows::All,
                  [&](int64_t first, int64_t rows, std::span<const float> values) {
                    EXPECT_EQ(first, next_row);
                    next_row = first + rows;
                    std::copy(values.begin(), values.end(), chunked.begin() + first * vocab);
                  });
  EXPECT_EQ(next_row, n);
  EXPECT_EQ(cache->length(0), n);
  for (int64_t i = 0; i < n * vocab; ++i) ASSERT_EQ(chunked[i], all_rows[i]) << "row " << i / vocab;
  if (!all_row_kinds) return;
  std::vector<int64_t> last_rows;
  auto last_cache = make_cache(decoder.cache_shape(), keys, "f32");
  decoder.forward(tokens, *last_cache, LogitRows::Last,
                  [&](int64_t first, int64_t rows, std::span<const float> values) {
                    last_rows.push_back(first);
                    EXPECT_EQ(rows, 1);
                    EXPECT_TRUE(std::equal(values.begin(), values.end(), last_row.begin()));
                  });
  EXPECT_EQ(last_rows, std::vector<int64_t>{n - 1});
  auto none_cache = make_cache(decoder.cache_shape(), keys, "f32");
  decoder.forward(tokens, *none_cache, LogitRows::None,
                  [&](int64_t, int64_t, std::span<const float>) { ADD_FAILURE() << "logits"; });
  EXPECT_EQ(none_cache->length(0), n);
}

// The default model (block weights): exact products and f32 keys, every row (the other row kinds,
// roundings and caches on the fixture and in the weight-kernel tests, which are cheaper).
TEST(ForwardPasses, LongInputsEqualOnePassOnTheDefaultModel) {
  ASSERT_NO_FATAL_FAILURE(expect_default_model());
  const Model model = Model::load("default");
  Decoder decoder(model);
  const std::vector<int32_t> text = leading_tokens(
      model.tokenizer(), read_text_file(default_test_text()), Decoder::kForwardChunk + 100);
  expect_passes_equal_one_pass(decoder, text, "f32", /*all_row_kinds=*/false);
}

TEST(ForwardPasses, LongInputsEqualOnePassOnTheFloatFixture) {
  const Model llama = Model::load(std::string(VISIKV_FIXTURES) + "/models/llama");
  Decoder decoder(llama);
  std::vector<int32_t> text;
  while (static_cast<int64_t>(text.size()) <= Decoder::kForwardChunk + 100) {
    const std::vector<int32_t> more = llama.tokenizer().encode(kText, false);
    text.insert(text.end(), more.begin(), more.end());
  }
  for (const ProductRounding rounding : {ProductRounding::Fastest, ProductRounding::PerToken}) {
    decoder.set_product_rounding(rounding);
    for (const char* keys : {"f32", "int4:g16:tok"}) {
      SCOPED_TRACE(keys);
      expect_passes_equal_one_pass(decoder, text, keys, /*all_row_kinds=*/true);
    }
  }
}

}  // namespace
}  // namespace visikv

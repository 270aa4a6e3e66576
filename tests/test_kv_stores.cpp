// The stores behind a cache (kv/vector_store.h, kv/store_factory.h): keys and values as two
// roles, and the one dense store that both the dense cache and the dense sides of codec caches
// are made of, checked against float64 sums of the stored numbers.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/half.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/dense_cache.h"
#include "visikv/kv/fp16_window.h"
#include "visikv/kv/headq.h"
#include "visikv/kv/store_factory.h"
#include "visikv/kv/value_policy.h"

namespace visikv {
namespace {

using test_support::error_of;
using test_support::random_vector;

TEST(StoreRoles, KeyOnlyAndValueOnlyStoresHaveOnlyTheirRole) {
  const int64_t d = 64;
  // A HeadQ store scores keys; it cannot be asked for value sums.
  const CodecSpec headq = parse_codec_spec("int2:g64:tok+headq:r8:s4:random");
  std::vector<float> rows = headq_basis_rows(headq, nullptr, 1, 1, d, 0, 0);
  const std::unique_ptr<KeyStore> keys = make_key_store(headq, d, 0, rows);
  EXPECT_EQ(dynamic_cast<const ValueStore*>(keys.get()), nullptr);
  // A value bit policy sums values; it cannot score.
  const CodecSpec policy = parse_codec_spec("a2:int2/int4:g64:w4:avg3");
  const std::unique_ptr<ValueStore> values = make_value_store(policy, d, 0);
  EXPECT_EQ(dynamic_cast<const KeyStore*>(values.get()), nullptr);
  EXPECT_NE(dynamic_cast<const ValuePolicyStore*>(values.get()), nullptr);
  EXPECT_TRUE(values->records_attention());
  // Each factory refuses the other role's codecs.
  EXPECT_NE(error_of([&] { make_value_store(headq, d, 0); }).find("keys only"), std::string::npos);
  EXPECT_NE(error_of([&] { make_key_store(policy, d, 0); }).find("values only"), std::string::npos);
  // Plain rows serve both roles, and read the same numbers in either.
  for (const std::string spec : {"f16", "int4:g32:tok", "int2:g16:chan:r8"}) {
    const std::unique_ptr<KeyStore> as_keys = make_key_store(parse_codec_spec(spec), d, 0);
    const std::unique_ptr<ValueStore> as_values = make_value_store(parse_codec_spec(spec), d, 0);
    EXPECT_NE(dynamic_cast<const ValueStore*>(as_keys.get()), nullptr) << spec;
    EXPECT_FALSE(as_values->records_attention());
    std::mt19937 rng(1);
    for (int t = 0; t < 40; ++t) {
      const std::vector<float> x = random_vector(rng, d);
      as_keys->append(x);
      as_values->append(x);
    }
    std::vector<float> a(d), b(d);
    for (int64_t t = 0; t < 40; ++t) {
      as_keys->reconstruct(t, a);
      as_values->reconstruct(t, b);
      ASSERT_EQ(a, b) << spec << " token " << t;
    }
  }
}

// The dense store scores and sums exactly the stored (rounded) numbers, in either role.
TEST(DenseStore, ScoresAndSumsTheStoredNumbers) {
  const int64_t d = 24, n = 19, queries = 3;
  std::mt19937 rng(2);
  for (DenseFormat format : {DenseFormat::F32, DenseFormat::F16, DenseFormat::BF16}) {
    const std::unique_ptr<RowStore> store = make_dense_store(format, d, 4);
    std::vector<double> stored;
    for (int64_t t = 0; t < n; ++t) {
      const std::vector<float> x = random_vector(rng, d);
      store->append(x);
      for (float v : x)
        stored.push_back(format == DenseFormat::F32   ? v
                         : format == DenseFormat::F16 ? fp16_to_float(float_to_fp16(v))
                                                      : bf16_to_float(float_to_bf16(v)));
    }
    EXPECT_EQ(store->size(), n);
    EXPECT_EQ(store->quantized_size(), 0);
    EXPECT_EQ(store->decode_equivalent_appends(), VectorStore::kUnlimitedChunk);
    EXPECT_EQ(store->stored_bytes(), n * d * (format == DenseFormat::F32 ? 4 : 2));
    std::vector<float> row(d);
    for (int64_t t = 0; t < n; ++t) {
      store->reconstruct(t, row);
      for (int64_t c = 0; c < d; ++c) ASSERT_EQ(row[c], stored[t * d + c]);
    }
    const std::vector<int32_t> picked = {0, 3, 4, 11, 18};
    const PositionSet positions = PositionSet::list(picked);
    const int64_t m = positions.size();
    const std::vector<float> q = random_vector(rng, queries * d);
    std::vector<float> scores(queries * m), weights(queries * m), out(queries * d, 0.5f);
    for (float& w : weights) w = std::uniform_real_distribution<float>(0, 1)(rng);
    store->dot(q, positions, scores);
    store->accumulate(weights, positions, out);
    for (int64_t j = 0; j < queries; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        double exact = 0, magnitude = 0;
        for (int64_t c = 0; c < d; ++c) {
          exact += double{q[j * d + c]} * stored[picked[i] * d + c];
          magnitude += std::abs(double{q[j * d + c]} * stored[picked[i] * d + c]);
        }
        EXPECT_NEAR(scores[j * m + i], exact, 1e-6 * magnitude);
      }
      for (int64_t c = 0; c < d; ++c) {
        double exact = 0.5, magnitude = 0.5;
        for (int64_t i = 0; i < m; ++i) {
          exact += double{weights[j * m + i]} * stored[picked[i] * d + c];
          magnitude += std::abs(double{weights[j * m + i]} * stored[picked[i] * d + c]);
        }
        EXPECT_NEAR(out[j * d + c], exact, 1e-6 * magnitude);
      }
    }
    store->clear();
    EXPECT_EQ(store->size(), 0);
    EXPECT_EQ(store->stored_bytes(), 0);
  }
}

// The dense cache is the codec cache of dense rows: same numbers, same summaries, any chunk.
TEST(DenseStore, TheDenseCacheIsTheCodecCacheOfDenseRows) {
  const CacheShape shape{2, 2, 16};
  const int64_t n = 21;
  std::mt19937 rng(3);
  const std::vector<float> k = random_vector(rng, n * 2 * 16), v = random_vector(rng, n * 2 * 16);
  for (const std::string name : {"f32", "f16", "bf16"}) {
    const std::unique_ptr<KVCache> dense =
        make_dense_cache(shape, dense_format_from_name(name), n, 8);
    CodecCache codec(shape, parse_codec_spec(name), parse_codec_spec(name), 0, 8);
    EXPECT_EQ(dense->describe(), "dense " + name);
    EXPECT_EQ(dense->decode_equivalent_chunk(1), INT64_MAX);
    dense->append(1, k, v, n);
    codec.append(1, k, v, n);
    const auto& as_codec = dynamic_cast<const CodecCache&>(*dense);
    EXPECT_EQ(as_codec.stored_bytes(), codec.stored_bytes());
    EXPECT_EQ(as_codec.stored_bytes(), 2 * 2 * n * 16 * (name == "f32" ? 4 : 2));
    std::vector<float> a(16), b(16);
    for (int64_t t = 0; t < n; ++t) {
      as_codec.stored_key(1, 1, t, a);
      codec.stored_key(1, 1, t, b);
      ASSERT_EQ(a, b);
    }
    const BlockSummaryTable x = dense->summaries(1, 0), y = codec.summaries(1, 0);
    ASSERT_EQ(x.blocks, 3);
    EXPECT_TRUE(std::equal(x.centroids.begin(), x.centroids.end(), y.centroids.begin()));
    EXPECT_TRUE(std::equal(x.maxs.begin(), x.maxs.end(), y.maxs.begin()));
    EXPECT_EQ(x.counts[2], 5);
  }
}

// The fp16 window of the integer and query-basis stores: what leaves it, when, in which form, and
// the chunk rule, against a brute-force replay of the appends.
TEST(Fp16Window, HandsOverWholeTokenGroupsOldestFirstInTheirFp16Form) {
  const int64_t dim = 6, appends = 40;
  std::mt19937 rng(11);
  const std::vector<float> vectors = random_vector(rng, appends * dim);
  struct Case {
    int64_t token_group, window;
  };
  for (const Case c : {Case{1, 0}, Case{1, 5}, Case{4, 0}, Case{4, 3}, Case{8, 16}}) {
    SCOPED_TRACE(testing::Message() << "G=" << c.token_group << " R=" << c.window);
    Fp16Window window(dim, c.token_group, c.window);
    std::vector<float> handed;  // every row handed over, in order
    std::vector<int64_t> flushes;
    for (int64_t t = 0; t < appends; ++t) {
      const int64_t before = window.quantized();
      window.append({vectors.data() + t * dim, static_cast<size_t>(dim)},
                    [&](const float* rows, int64_t tokens) {
                      EXPECT_EQ(window.quantized(), before);  // counted once it returns
                      EXPECT_EQ(tokens, c.token_group);
                      handed.insert(handed.end(), rows, rows + tokens * dim);
                    });
      if (window.quantized() != before) flushes.push_back(t);
      ASSERT_EQ(window.size(), t + 1);
      // The newest `window` tokens are always held, and never more than window + G - 1.
      const int64_t held = window.size() - window.quantized();
      ASSERT_GE(held, std::min(t + 1, c.window));
      ASSERT_LT(held, c.window + c.token_group);
      EXPECT_EQ(window.stored_bytes(), 2 * held * dim);
    }
    // Rows leave oldest first: from float32 with neither window nor group, else in fp16.
    const bool passes_through = c.token_group == 1 && c.window == 0;
    ASSERT_EQ(static_cast<int64_t>(handed.size()), window.quantized() * dim);
    for (size_t i = 0; i < handed.size(); ++i)
      ASSERT_EQ(handed[i], passes_through ? vectors[i] : fp16_to_float(float_to_fp16(vectors[i])));
    // The held rows are the newest ones, rounded to fp16.
    std::vector<float> out(dim);
    for (int64_t p = window.quantized(); p < appends; ++p) {
      window.widen(p, out);
      for (int64_t i = 0; i < dim; ++i)
        ASSERT_EQ(out[i], fp16_to_float(float_to_fp16(vectors[p * dim + i])));
    }
    // The chunk rule: from every state, the next decode_equivalent_appends() appends flush at
    // most at their first (replayed on a fresh window up to that state).
    for (int64_t state = 0; state < appends - 20; ++state) {
      Fp16Window replay(dim, c.token_group, c.window);
      const auto drop = [](const float*, int64_t) {};
      for (int64_t t = 0; t < state; ++t) replay.append({vectors.data(), size_t(dim)}, drop);
      const int64_t chunk = replay.decode_equivalent_appends();
      ASSERT_GE(chunk, 1);
      if (passes_through) {
        EXPECT_EQ(chunk, VectorStore::kUnlimitedChunk);
        continue;
      }
      for (int64_t k = 0; k < std::min<int64_t>(chunk, 20); ++k) {
        const int64_t before = replay.quantized();
        replay.append({vectors.data(), size_t(dim)}, drop);
        if (k > 0) ASSERT_EQ(replay.quantized(), before) << "flush inside a chunk at " << state;
      }
    }
    window.clear();
    EXPECT_EQ(window.size(), 0);
    EXPECT_EQ(window.stored_bytes(), 0);
  }
}

}  // namespace
}  // namespace visikv

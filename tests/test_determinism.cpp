// The same tokens give bit-identical logits at any thread count (each output element is computed
// by one thread in a fixed order), in prefill and in decode.
#include <gtest/gtest.h>
#include <omp.h>

#include <filesystem>
#include <vector>

#include "visikv/kv/dense_cache.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

std::vector<float> run(const Model& model, const std::vector<int32_t>& tokens, int threads,
                       bool decode) {
  omp_set_num_threads(threads);
  Decoder decoder(model);
  auto cache = make_dense_cache(decoder.cache_shape(), DenseFormat::F16);
  std::vector<float> all;
  auto keep = [&](int64_t, int64_t, std::span<const float> l) {
    all.insert(all.end(), l.begin(), l.end());
  };
  if (decode) {
    for (int32_t t : tokens) decoder.forward({&t, 1}, *cache, LogitRows::All, keep);
  } else {
    decoder.forward(tokens, *cache, LogitRows::All, keep);
  }
  return all;
}

TEST(Determinism, LogitsDoNotDependOnThreadCount) {
  const std::string path = std::string(VISIKV_FIXTURES) + "/models/qwen2";
  const Model model = Model::load(path);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 40; ++i)
    tokens.push_back((i * 37 + 11) % static_cast<int>(model.config().vocab_size));
  for (bool decode : {false, true}) {
    const std::vector<float> one = run(model, tokens, 1, decode);
    const std::vector<float> three = run(model, tokens, 3, decode);
    ASSERT_EQ(one.size(), three.size());
    EXPECT_EQ(one, three) << (decode ? "decode" : "prefill");
  }
}

}  // namespace
}  // namespace visikv

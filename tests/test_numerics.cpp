// The int8 and int16 products (8- and 16-bit activations, integer dot products) against the exact
// ones on the default model: eval/numerics.h measures what docs/RESULTS.md reports (`visikv eval
// numerics`), and the exact side against itself must agree perfectly.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/eval/data_paths.h"
#include "visikv/eval/numerics.h"
#include "visikv/eval/text_input.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

constexpr int64_t kPositions = 256;

struct Loaded {
  Model model = Model::load("default");
  std::vector<int32_t> text =
      model.tokenizer().encode(read_text_file(default_test_text()).substr(0, 8000), false);
};

const Loaded& loaded() {
  static const Loaded instance;
  return instance;
}

TEST(Numerics, ExactAgainstItselfAgreesPerfectly) {
  const Loaded& l = loaded();
  const NumericsAgreement r =
      compare_numerics(l.model, l.text, 128, kPositions, ProductRounding::Fastest,
                       ProductRounding::PerToken, l.model.tokenizer().bos_id());
  EXPECT_EQ(r.divergence.positions, kPositions);
  EXPECT_EQ(r.divergence.top1_agreement, 1.0);
  // Fastest and PerToken round the same way for GGUF block weights (one kernel for both).
  EXPECT_EQ(r.divergence.kl_mean, 0.0);
  EXPECT_EQ(r.divergence.kl_max, 0.0);
  EXPECT_EQ(r.reference_nll, r.candidate_nll);
}

// The int8 products are not exact (their loss is measured, not assumed): on this model they move
// predictions measurably, yet within the bounds docs/RESULTS.md states for 4096 positions.
TEST(Numerics, Int8ProductsStayWithinTheMeasuredBounds) {
  const Loaded& l = loaded();
  const NumericsAgreement r =
      compare_numerics(l.model, l.text, 128, kPositions, ProductRounding::Fastest,
                       ProductRounding::QuantizedActivations, l.model.tokenizer().bos_id());
  EXPECT_EQ(r.divergence.positions, kPositions);
  EXPECT_GT(r.divergence.kl_mean, 0.0);
  EXPECT_LT(r.divergence.kl_mean, 0.05);
  EXPECT_LE(r.divergence.kl_mean, r.divergence.kl_max);
  EXPECT_LE(r.divergence.kl_p99, r.divergence.kl_max);
  EXPECT_GT(r.divergence.top1_agreement, 0.85);
  EXPECT_LT(std::abs(r.candidate_nll - r.reference_nll), 0.1);
}

// The int16 products against the gate for a default numerics mode (top-1 agreement >= 99%,
// mean KL <= 1e-3), measured as docs/RESULTS.md does (WikiText-103 test in windows of 1024) over
// two windows, 2046 positions: the 4096 positions of docs/RESULTS.md (`visikv eval numerics`) took
// over two minutes here, the longest test of the suite by far.
TEST(Numerics, Int16ProductsMeetTheGateOnTheDefaultModel) {
  const Loaded& l = loaded();
  constexpr int64_t kGatePositions = 2046, kWindow = 1024;
  const std::vector<int32_t> text =
      l.model.tokenizer().encode(read_text_file(default_test_text()).substr(0, 20000), false);
  ASSERT_GE(static_cast<int64_t>(text.size()), numerics_text_tokens(kGatePositions, kWindow, true));
  const NumericsAgreement r =
      compare_numerics(l.model, text, kWindow, kGatePositions, ProductRounding::Fastest,
                       ProductRounding::QuantizedActivations16, l.model.tokenizer().bos_id());
  EXPECT_EQ(r.divergence.positions, kGatePositions);
  EXPECT_GE(r.divergence.top1_agreement, 0.99);
  EXPECT_LE(r.divergence.kl_mean, 1e-3);
  // Not exact: the rounding is there (SeveralCandidatesEqualOneAtATime compares it with int8).
  EXPECT_GT(r.divergence.kl_max, 0.0);
  std::printf("int16 vs exact over %lld positions: top-1 %.4f, mean KL %.3e, max KL %.3e\n",
              static_cast<long long>(r.divergence.positions), r.divergence.top1_agreement,
              r.divergence.kl_mean, r.divergence.kl_max);
}

TEST(Numerics, SeveralCandidatesEqualOneAtATime) {
  const Loaded& l = loaded();
  const ProductRounding candidates[] = {ProductRounding::QuantizedActivations,
                                        ProductRounding::QuantizedActivations16};
  const std::vector<NumericsAgreement> both =
      compare_numerics(l.model, l.text, 128, 128, ProductRounding::Fastest, candidates,
                       l.model.tokenizer().bos_id());
  ASSERT_EQ(both.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    const NumericsAgreement one =
        compare_numerics(l.model, l.text, 128, 128, ProductRounding::Fastest, candidates[i],
                         l.model.tokenizer().bos_id());
    EXPECT_EQ(both[i].divergence.kl_mean, one.divergence.kl_mean) << i;
    EXPECT_EQ(both[i].divergence.kl_max, one.divergence.kl_max) << i;
    EXPECT_EQ(both[i].divergence.top1_agreement, one.divergence.top1_agreement) << i;
    EXPECT_EQ(both[i].candidate_nll, one.candidate_nll) << i;
    EXPECT_EQ(both[i].reference_nll, one.reference_nll) << i;
  }
  // int16 rounds 256 times finer than int8.
  EXPECT_LT(both[1].divergence.kl_mean, both[0].divergence.kl_mean / 100);
}

TEST(Numerics, RejectsBadWindows) {
  const Loaded& l = loaded();
  EXPECT_THROW(compare_numerics(l.model, l.text, 1, 10, ProductRounding::Fastest,
                                ProductRounding::QuantizedActivations, std::nullopt),
               Error);
}

}  // namespace
}  // namespace visikv

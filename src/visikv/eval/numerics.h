// How far one way of rounding the weight products moves a model's predictions from another
// (model/matmul.h ProductRounding): the int8 and int16 (8- and 16-bit-activation) products
// against the exact ones.
//
// Protocol: the tokens are cut into windows as perplexity() cuts them (BOS first when the
// tokenizer adds one); the reference decoder and each candidate's run each window in chunks of
// 64 tokens through their own f32 caches, and every scored position compares each candidate's
// next-token distribution with the reference's: KL(reference || candidate) and whether the argmax
// agrees (eval/divergence.h), and each side's NLL of the actual next token.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "visikv/eval/divergence.h"
#include "visikv/eval/perplexity.h"
#include "visikv/model/decoder.h"

namespace visikv {

struct NumericsAgreement {
  DivergenceSummary divergence;                 // KL(reference || candidate), top-1 agreement
  double reference_nll = 0, candidate_nll = 0;  // mean NLL of the next text token
};

// Text tokens (without BOS) compare_numerics reads to compare `positions` positions: whole
// windows, because each window runs in chunks whose length shapes how the products round, so a
// shorter last window would change the figures in their last bits. Saturates at the largest
// integer.
int64_t numerics_text_tokens(int64_t positions, int64_t window, bool bos);

NumericsAgreement compare_numerics(const Model& model, std::span<const int32_t> text,
                                   int64_t window, int64_t max_positions, ProductRounding reference,
                                   ProductRounding candidate, std::optional<int32_t> bos,
                                   const Progress& progress = {});

// Several candidates against one run of the reference (each result as the one-candidate call
// gives it, in the order of `candidates`).
std::vector<NumericsAgreement> compare_numerics(const Model& model, std::span<const int32_t> text,
                                                int64_t window, int64_t max_positions,
                                                ProductRounding reference,
                                                std::span<const ProductRounding> candidates,
                                                std::optional<int32_t> bos,
                                                const Progress& progress = {});

}  // namespace visikv

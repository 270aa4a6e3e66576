// The one forward pass every supported family runs, driven by Config: embeddings, then per layer
// norm -> QKV -> (q/k norms) -> RoPE -> cache append -> attention through the cache (within the
// layer's window) -> output projection -> (post-norm) -> MLP (sequential or parallel residual),
// then the final norm, the LM head and the optional logit soft-cap.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "visikv/attention/attention.h"
#include "visikv/attention/support.h"
#include "visikv/core/aligned.h"
#include "visikv/kv/cache.h"
#include "visikv/model/matmul.h"
#include "visikv/model/model.h"

namespace visikv {

// Receives logits for rows [first_row, first_row + rows) of the tokens just run, {rows, vocab}.
using LogitsSink =
    std::function<void(int64_t first_row, int64_t rows, std::span<const float> logits)>;

enum class LogitRows { All, Last, None };

// Receives, per layer, the statistics of each (token, query head) of a sparse support:
// stats[t * heads + h].
using SupportStatsSink = std::function<void(int64_t layer, std::span<const SparseQueryStats>)>;

// How one forward call attends.
struct AttentionOptions {
  // The support every layer reads (support.h); nullptr: dense attention. A support keeps the
  // refresh rule's state across calls, so one serves one sequence.
  Support* support = nullptr;
  SupportStatsSink support_stats;  // with a support: its statistics, per layer
  AttentionObserver* observer = nullptr;
};

// How many tokens Decoder::forward may next run as one chunk and still compute, for every token,
// what running them one at a time through `cache` computes (decode order), given
// ProductRounding::PerToken: KVCache::decode_equivalent_chunk over the layers, or any number for
// a cache that records attention (forward then attends token by token within each layer).
int64_t decode_order_chunk(const KVCache& cache);

// One sequence's part of a batched forward call (Decoder::forward_batch).
struct DecoderSegment {
  std::span<const int32_t> tokens;  // run at positions cache->length(0) onwards
  KVCache* cache = nullptr;
  LogitRows rows = LogitRows::All;
  LogitsSink sink;  // rows are numbered within the segment
  AttentionOptions attention;
};

class Decoder {
 public:
  explicit Decoder(const Model& model);

  CacheShape cache_shape() const;

  // Runs `tokens` at positions cache.length(0) onwards, appends their keys and values to the
  // cache, and passes the requested logits to `sink`. Several tokens at once is prefill; one at
  // a time is decode; both compute the same function. An input longer than kForwardChunk tokens
  // runs in passes of that many where the passes compute the bits of one pass (dense attention
  // without an observer, a cache whose appends of the whole input are decode-equivalent, and weight
  // products whose sums do not depend on the token count): the activations held at once are then
  // those of one pass, not of the whole input.
  static constexpr int64_t kForwardChunk = 512;
  void forward(std::span<const int32_t> tokens, KVCache& cache, LogitRows rows,
               const LogitsSink& sink, const AttentionOptions& attention = {});

  // Several sequences in one call, e.g. a decode step of every sequence a server runs: their tokens
  // share each weight product (the weights are read once for all of them), and each segment's
  // tokens attend through its own cache and support. One segment is forward().
  void forward_batch(std::span<const DecoderSegment> segments);

  // Convenience: logits of every token, {tokens, vocab}.
  std::vector<float> all_logits(std::span<const int32_t> tokens, KVCache& cache,
                                const AttentionOptions& attention = {});

  // Convenience: logits of the last token.
  std::vector<float> next_logits(std::span<const int32_t> tokens, KVCache& cache,
                                 const AttentionOptions& attention = {});

  const Model& model() const { return model_; }

  // How weight products over several tokens round (model/matmul.h). PerToken makes a forward
  // over a chunk compute bit for bit what forwards of its tokens one at a time compute, which a
  // batched decode-order evaluation needs when the cache quantizes keys (a rounding difference
  // can move a key across a code boundary). Makes the weight forms those products read
  // (prepare_weights) the first time a rounding asks for them.
  void set_product_rounding(ProductRounding rounding);
  ProductRounding product_rounding() const { return rounding_; }
  // Whether every weight product with the current rounding gives each token the bits it gives that
  // token alone (matmul.h sums_independent_of_token_count): always with PerToken, and with any
  // rounding where every matrix is of a block type (GGUF quantized weights).
  bool products_independent_of_token_count() const;

 private:
  // Writes the embeddings of `tokens` (positions first_position ..) into rows row_offset .. of x_.
  void embed(std::span<const int32_t> tokens, int64_t first_position, int64_t row_offset);
  void mlp(const LayerWeights& layer, int64_t tokens);
  // Whether forward() may run `tokens` tokens in passes of kForwardChunk (see forward).
  bool passes_equal_one_pass(const KVCache& cache, const AttentionOptions& attention,
                             int64_t tokens) const;

  const Model& model_;
  const Config& config_;
  // Per layer kind (LayerKind: global, local): the RoPE inverse frequencies it rotates with.
  std::vector<float> inverse_frequencies_[2];
  ProductRounding rounding_ = ProductRounding::Fastest;
  std::vector<SparseQueryStats> stats_;
  // Scratch, {tokens, width}; reused between calls. Aligned to cache lines, so that the weight
  // products read the rows of their input in place (weight_kernels.cpp BlockedRows).
  AlignedFloats x_, normed_, q_, k_, v_, attention_, projected_, gate_, up_, logits_, gathered_;
};

}  // namespace visikv

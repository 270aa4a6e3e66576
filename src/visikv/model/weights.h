// The tensors of one decoder, bound to the roles the forward pass needs. Large matrices stay in
// their stored form (mapped from the checkpoint, possibly block-quantized); small vectors (norms,
// biases) are converted to float32 once at load.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "visikv/formats/tensor.h"

namespace visikv {

namespace amx {
struct PackedRows;
}

// Forms of a matrix that some products read instead of the stored one, made on first use.
struct DerivedWeights {
  std::once_flag packed_once;
  std::shared_ptr<const amx::PackedRows> packed;  // amx_products.h, for the int16 tile products
};

struct Linear {
  TensorRef weight;         // {out_features, in_features}
  std::vector<float> bias;  // empty when the layer has none
  // Shared by copies of the Linear (they hold the same weights).
  std::shared_ptr<DerivedWeights> derived = std::make_shared<DerivedWeights>();
  int64_t out_features() const { return weight.shape.at(0); }
  int64_t in_features() const { return weight.shape.at(1); }
};

struct Norm {
  std::vector<float> weight;
  std::vector<float> bias;  // LayerNorm only
};

struct LayerWeights {
  Norm attention_norm;
  Linear q, k, v, o;
  std::optional<Norm> q_norm, k_norm;       // per head, head_dim wide (Config::qk_norm)
  std::optional<Norm> post_attention_norm;  // on the attention output (Config::post_norms)
  Norm mlp_norm;
  std::optional<Linear> gate;  // gated MLPs only
  Linear up, down;
  std::optional<Norm> post_mlp_norm;  // on the MLP output (Config::post_norms)
};

struct Weights {
  TensorRef token_embedding;                    // {vocab, hidden}
  std::optional<TensorRef> position_embedding;  // learned positions only
  std::vector<LayerWeights> layers;
  Norm final_norm;
  Linear lm_head;  // shares token_embedding's data when tied
  // Storage for tensors that had to be rearranged at load (fused QKV split by head, Conv1D
  // transposed); the TensorRefs above point into it. Inner buffers never move.
  std::vector<std::vector<std::byte>> owned;
};

}  // namespace visikv

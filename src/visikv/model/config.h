// One description of a decoder-only transformer. Every supported family (GPT-2, GPT-NeoX/Pythia,
// Llama/TinyLlama/SmolLM2, Mistral, Qwen2, Gemma 3) is a value of this struct; the decoder reads
// only this, never the family name.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

namespace visikv {

enum class NormKind { LayerNorm, RMSNorm };
enum class Activation { GeluTanh, GeluErf, SiLU };
enum class PositionKind { Learned, Rotary };
// Which coordinates RoPE rotates together: (i, i + rotary_dim/2) as in HF Llama/NeoX ("half"),
// or (2i, 2i+1) as GGUF's llama converters leave the Q/K rows ("interleaved").
enum class RopeLayout { Half, Interleaved };

struct RopeScaling {
  enum class Type { None, Linear, Llama3 } type = Type::None;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_positions = 8192;
};

// A local layer attends to its last `sliding_window` positions, a global layer to every earlier
// position (transformers' "sliding_attention" and "full_attention" layer types).
enum class LayerKind { Global, Local };

// The RoPE of the local layers where it is not the global one: Gemma 3 rotates its local layers
// with base rope_local_base_freq and applies rope scaling to its global layers only.
struct LocalRope {
  double theta = 10000.0;
  RopeScaling scaling;
};

struct Config {
  std::string
      architecture;  // as the checkpoint names it, for display ("LlamaForCausalLM", "llama")
  int64_t vocab_size = 0;
  int64_t hidden = 0;
  int64_t layers = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate = 0;
  int64_t max_positions = 0;

  NormKind norm = NormKind::RMSNorm;
  double norm_eps = 1e-5;
  Activation activation = Activation::SiLU;
  bool gated_mlp = true;           // act(gate(x)) * up(x), else act(up(x))
  bool parallel_residual = false;  // x + attn(ln1 x) + mlp(ln2 x)  (GPT-NeoX)
  bool qkv_bias = false;
  bool out_bias = false;
  bool mlp_bias = false;
  bool tied_embeddings = false;

  PositionKind positions = PositionKind::Rotary;
  double rope_theta = 10000.0;
  int64_t rotary_dim = 0;  // leading dims of each head that RoPE rotates
  RopeLayout rope_layout = RopeLayout::Half;
  RopeScaling rope_scaling;
  // Per-frequency divisors from a GGUF `rope_freqs` tensor (llama3-style scaling baked in by the
  // converter); empty when the scaling is computed from rope_scaling.
  std::vector<float> rope_freq_factors;

  // W > 0: local layers attend to their last W positions (the query's own included).
  int64_t sliding_window = 0;
  // One entry per layer when the model interleaves local and global layers (Gemma 3: five local
  // layers, then a global one); empty when every layer is of one kind: local when
  // sliding_window > 0 (Mistral), else global.
  std::vector<LayerKind> layer_kinds;
  // Local layers' RoPE when it differs from rope_theta / rope_scaling; nullopt: every layer
  // rotates alike.
  std::optional<LocalRope> local_rope;
  double attention_scale = 0;  // multiplies q·k; 1/sqrt(head_dim) by default

  // Gemma: token embeddings times this factor (sqrt(hidden) rounded to float32, the value
  // transformers multiplies by in a float32 forward).
  float embedding_scale = 1.0f;
  // RMSNorm of every query and key head (weights of head_dim values) before RoPE.
  bool qk_norm = false;
  // Norms on the attention and MLP outputs too, before each residual add ("sandwich" norms):
  // x + post_norm(attn(norm(x))), then the same around the MLP.
  bool post_norms = false;
  // c > 0: logits become c * tanh(logits / c) (Gemma's final_logit_softcapping); 0: none.
  double final_logit_softcap = 0;

  std::optional<int32_t> bos_id;
  std::vector<int32_t> eos_ids;

  int64_t q_dim() const { return heads * head_dim; }
  int64_t kv_dim() const { return kv_heads * head_dim; }
  int64_t group_size() const { return heads / kv_heads; }
  LayerKind layer_kind(int64_t layer) const;
  // The positions layer `layer` attends to: 0 for every earlier one, W for the last W.
  int64_t layer_window(int64_t layer) const;
  // What q·k is multiplied by before the softmax: attention_scale, or 1/sqrt(head_dim). Every
  // path that computes or reproduces attention logits takes it from here.
  double score_scale() const;

  // Throws visikv::Error when the numbers do not describe a model the decoder can run.
  void validate() const;
  std::string describe() const;
};

// The supported Hugging Face `model_type` values, for error messages and `visikv info`.
const std::vector<std::string>& supported_hf_model_types();
// Every number is checked as it is read (integers must be JSON integers, sizes and token ids in
// range, reals finite and positive) and an error names the file and the key. `dir`, when given,
// is the model directory the two files came from, for the messages.
Config config_from_hf(const nlohmann::json& config_json, const nlohmann::json& generation_config,
                      const std::filesystem::path& dir = {});
// GGUF metadata (general.architecture = llama, gpt2, gptneox, qwen2, ...); integer keys must
// have an integer type. `source` names the file in error messages.
Config config_from_gguf(const nlohmann::json& metadata,
                        const std::string& source = "GGUF metadata");

}  // namespace visikv

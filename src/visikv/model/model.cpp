#include "visikv/model/model.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>
#include <variant>

#include "visikv/core/error.h"
#include "visikv/core/file_kind.h"
#include "visikv/formats/dequantize.h"
#include "visikv/formats/gguf.h"
#include "visikv/formats/hf_dir.h"
#include "visikv/model/weight_kernels.h"

namespace visikv {

namespace {

constexpr const char* kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf";

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// Whether a bias tensor goes with a weight: never (one in the file is then left unbound and
// rejected), when the file has one (llama.cpp's optional biases), or always.
enum class Bias { None, Optional, Required };

// Finds tensors by name in the open checkpoint and checks their shapes. It remembers every tensor
// it hands out, so that after binding `require_all_bound` can reject a file with tensors no role
// took: a misspelt name, layers beyond the configured count or a bias the config does not expect
// would otherwise be ignored silently and the model would compute something else.
class Binder {
 public:
  // `unread`: tensors of dtypes visikv does not compute with (a boolean mask buffer, say); they
  // may only be accepted as unused, and a role asking for one names its dtype.
  Binder(const std::vector<TensorRef>& tensors, std::string file, Weights& weights,
         std::span<const UnreadTensor> unread = {})
      : file_(std::move(file)), weights_(weights) {
    for (const TensorRef& t : tensors) index_.emplace(t.name, &t);
    for (const UnreadTensor& t : unread) unread_.emplace(t.name, &t);
  }

  // A tensor found here counts as bound: every caller uses what it finds.
  const TensorRef* find(const std::string& name) {
    const auto it = index_.find(name);
    if (it == index_.end()) return nullptr;
    bound_.insert(it->first);
    return it->second;
  }

  const TensorRef& get(const std::string& name) {
    if (const TensorRef* tensor = find(name)) return *tensor;
    if (const auto unread = unread_.find(name); unread != unread_.end())
      fail(file_, ": tensor '", name, "' is stored as ", unread->second->dtype,
           ", which visikv does not read (weights must be F32, F16 or BF16)");
    fail(file_, ": required tensor '", name, "' is missing");
  }

  TensorRef matrix(const std::string& name, int64_t rows, int64_t cols) {
    const TensorRef& t = get(name);
    require(t.shape == std::vector<int64_t>{rows, cols}, file_, ": tensor '", name, "' has shape ",
            shape_text(t.shape), ", expected ", shape_text({rows, cols}));
    return t;
  }

  std::vector<float> vector(const std::string& name, int64_t size) {
    const TensorRef& t = get(name);
    require(t.elements() == size && t.shape.size() == 1, file_, ": tensor '", name, "' has shape ",
            shape_text(t.shape), ", expected [", size, "]");
    return to_float(t);
  }

  std::vector<float> bias(const std::string& name, int64_t size, Bias bias) {
    if (bias == Bias::None || (bias == Bias::Optional && index_.find(name) == index_.end()))
      return {};
    return vector(name, size);
  }

  // `weight_offset` is added to every weight: Gemma's RMSNorm scales by (1 + weight).
  Norm norm(const std::string& prefix, int64_t size, bool with_bias, float weight_offset = 0.0f) {
    Norm n{vector(prefix + ".weight", size), {}};
    for (float& w : n.weight) w += weight_offset;
    if (with_bias) n.bias = vector(prefix + ".bias", size);
    return n;
  }

  Linear linear(const std::string& prefix, int64_t out, int64_t in, Bias bias_kind) {
    return {matrix(prefix + ".weight", out, in), bias(prefix + ".bias", out, bias_kind)};
  }
  Linear linear(const std::string& prefix, int64_t out, int64_t in, bool with_bias) {
    return linear(prefix, out, in, with_bias ? Bias::Required : Bias::None);
  }

  // Fails listing the tensors no role took (the first few and the count), except those
  // `accepted_unused` names: buffers some checkpoints store that the model recomputes.
  void require_all_bound(const std::function<bool(std::string_view)>& accepted_unused) const {
    constexpr size_t kListed = 8;
    std::vector<std::string> described;  // name, shape (and dtype when unread)
    for (const auto& [name, tensor] : index_)
      if (!bound_.contains(name) && !accepted_unused(name))
        described.push_back(str_cat("'", name, "' ", shape_text(tensor->shape)));
    for (const auto& [name, tensor] : unread_)
      if (!accepted_unused(name))
        described.push_back(
            str_cat("'", name, "' ", shape_text(tensor->shape), " ", tensor->dtype));
    if (described.empty()) return;
    std::string list;
    for (size_t i = 0; i < described.size() && i < kListed; ++i)
      list += str_cat(i ? ", " : "", described[i]);
    if (described.size() > kListed)
      list += str_cat(", ... (", described.size() - kListed, " more)");
    fail(file_, ": ", described.size(), " of the file's ", index_.size() + unread_.size(),
         " tensors match no role of the model its config describes (a misspelt name, a layer "
         "beyond the configured layer count, or a weight the config does not use): ",
         list);
  }

  // Rows [begin, begin + count) of a matrix, without copying.
  static TensorRef rows(const TensorRef& t, int64_t begin, int64_t count, const std::string& name) {
    const int64_t row_bytes = storage_bytes(t.dtype, t.row_size());
    return TensorRef{name,
                     t.dtype,
                     {count, t.row_size()},
                     t.data.subspan(static_cast<size_t>(begin * row_bytes),
                                    static_cast<size_t>(count * row_bytes))};
  }

  // A new matrix made of the given rows of `t` (same dtype), stored in weights.owned.
  TensorRef gather_rows(const TensorRef& t, const std::vector<int64_t>& row_ids,
                        const std::string& name) {
    const int64_t row_bytes = storage_bytes(t.dtype, t.row_size());
    std::vector<std::byte>& buffer = weights_.owned.emplace_back(row_ids.size() * row_bytes);
    for (size_t i = 0; i < row_ids.size(); ++i)
      std::memcpy(buffer.data() + i * row_bytes, t.row(row_ids[i]).data(), row_bytes);
    return TensorRef{name,
                     t.dtype,
                     {static_cast<int64_t>(row_ids.size()), t.row_size()},
                     std::span<const std::byte>(buffer)};
  }

  // The transpose of a {rows, cols} matrix as float32 (GPT-2's Conv1D stores {in, out}).
  TensorRef transposed(const TensorRef& t, const std::string& name) {
    const std::vector<float> values = to_float(t);
    const int64_t rows = t.shape.at(0), cols = t.shape.at(1);
    std::vector<std::byte>& buffer = weights_.owned.emplace_back(values.size() * sizeof(float));
    auto* out = reinterpret_cast<float*>(buffer.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = values[r * cols + c];
    return TensorRef{name, DType::F32, {cols, rows}, std::span<const std::byte>(buffer)};
  }

 private:
  std::string file_;
  Weights& weights_;
  std::map<std::string_view, const TensorRef*> index_;  // views of the checkpoint's names
  std::map<std::string_view, const UnreadTensor*> unread_;
  std::set<std::string_view> bound_;
};

// Splits a fused QKV projection whose rows are [q heads | k heads | v heads].
void split_contiguous_qkv(Binder& b, const TensorRef& fused, std::vector<float> bias,
                          const Config& c, LayerWeights& layer) {
  const int64_t q = c.q_dim(), kv = c.kv_dim();
  require(fused.shape == std::vector<int64_t>{q + 2 * kv, c.hidden}, "fused QKV tensor '",
          fused.name, "' has shape ", shape_text(fused.shape), ", expected ",
          shape_text({q + 2 * kv, c.hidden}));
  layer.q.weight = Binder::rows(fused, 0, q, fused.name + "[q]");
  layer.k.weight = Binder::rows(fused, q, kv, fused.name + "[k]");
  layer.v.weight = Binder::rows(fused, q + kv, kv, fused.name + "[v]");
  if (!bias.empty()) {
    layer.q.bias.assign(bias.begin(), bias.begin() + q);
    layer.k.bias.assign(bias.begin() + q, bias.begin() + q + kv);
    layer.v.bias.assign(bias.begin() + q + kv, bias.end());
  }
}

// GPT-NeoX fuses QKV per head: rows are [head][q|k|v][head_dim].
void split_per_head_qkv(Binder& b, const TensorRef& fused, const std::vector<float>& bias,
                        const Config& c, LayerWeights& layer) {
  const int64_t d = c.head_dim;
  require(fused.shape == std::vector<int64_t>{3 * c.hidden, c.hidden}, "fused QKV tensor '",
          fused.name, "' has shape ", shape_text(fused.shape), ", expected ",
          shape_text({3 * c.hidden, c.hidden}));
  Linear* parts[3] = {&layer.q, &layer.k, &layer.v};
  for (int part = 0; part < 3; ++part) {
    std::vector<int64_t> ids;
    for (int64_t h = 0; h < c.heads; ++h)
      for (int64_t i = 0; i < d; ++i) ids.push_back((h * 3 + part) * d + i);
    parts[part]->weight = b.gather_rows(fused, ids, fused.name + "[" + "qkv"[part] + "]");
    if (!bias.empty())
      for (int64_t id : ids) parts[part]->bias.push_back(bias[id]);
  }
}

void bind_hf(Binder& b, const std::string& model_type, Config& c, Weights& w) {
  const bool layer_norm = c.norm == NormKind::LayerNorm;
  if (model_type == "gpt2") {
    const std::string p = b.find("transformer.wte.weight") ? "transformer." : "";
    w.token_embedding = b.matrix(p + "wte.weight", c.vocab_size, c.hidden);
    w.position_embedding = b.matrix(p + "wpe.weight", c.max_positions, c.hidden);
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string l = p + "h." + std::to_string(i) + ".";
      LayerWeights& layer = w.layers.emplace_back();
      layer.attention_norm = b.norm(l + "ln_1", c.hidden, true);
      const TensorRef fused = b.transposed(
          b.matrix(l + "attn.c_attn.weight", c.hidden, 3 * c.hidden), l + "attn.c_attn.weight");
      split_contiguous_qkv(b, fused, b.vector(l + "attn.c_attn.bias", 3 * c.hidden), c, layer);
      layer.o = {b.transposed(b.matrix(l + "attn.c_proj.weight", c.hidden, c.hidden),
                              l + "attn.c_proj.weight"),
                 b.vector(l + "attn.c_proj.bias", c.hidden)};
      layer.mlp_norm = b.norm(l + "ln_2", c.hidden, true);
      layer.up = {b.transposed(b.matrix(l + "mlp.c_fc.weight", c.hidden, c.intermediate),
                               l + "mlp.c_fc.weight"),
                  b.vector(l + "mlp.c_fc.bias", c.intermediate)};
      layer.down = {b.transposed(b.matrix(l + "mlp.c_proj.weight", c.intermediate, c.hidden),
                                 l + "mlp.c_proj.weight"),
                    b.vector(l + "mlp.c_proj.bias", c.hidden)};
    }
    w.final_norm = b.norm(p + "ln_f", c.hidden, true);
    w.lm_head = {b.find("lm_head.weight") ? b.matrix("lm_head.weight", c.vocab_size, c.hidden)
                                          : w.token_embedding,
                 {}};
    return;
  }
  if (model_type == "gpt_neox") {
    w.token_embedding = b.matrix("gpt_neox.embed_in.weight", c.vocab_size, c.hidden);
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string l = "gpt_neox.layers." + std::to_string(i) + ".";
      LayerWeights& layer = w.layers.emplace_back();
      layer.attention_norm = b.norm(l + "input_layernorm", c.hidden, true);
      split_per_head_qkv(b, b.get(l + "attention.query_key_value.weight"),
                         c.qkv_bias ? b.vector(l + "attention.query_key_value.bias", 3 * c.hidden)
                                    : std::vector<float>{},
                         c, layer);
      layer.o = b.linear(l + "attention.dense", c.hidden, c.hidden, c.out_bias);
      layer.mlp_norm = b.norm(l + "post_attention_layernorm", c.hidden, true);
      layer.up = b.linear(l + "mlp.dense_h_to_4h", c.intermediate, c.hidden, true);
      layer.down = b.linear(l + "mlp.dense_4h_to_h", c.hidden, c.intermediate, true);
    }
    w.final_norm = b.norm("gpt_neox.final_layer_norm", c.hidden, true);
    w.lm_head = {c.tied_embeddings && !b.find("embed_out.weight")
                     ? w.token_embedding
                     : b.matrix("embed_out.weight", c.vocab_size, c.hidden),
                 {}};
    return;
  }
  // Llama, Mistral, Qwen2, Gemma 3.
  // Gemma3RMSNorm multiplies by (1 + weight) computed in float32: the same float32 factor as
  // adding 1 here once. (GGUF files store the sum; llama.cpp's converter adds the 1.)
  const float norm_offset = model_type == "gemma3_text" ? 1.0f : 0.0f;
  const auto norm = [&](const std::string& prefix, int64_t size) {
    return b.norm(prefix, size, layer_norm, norm_offset);
  };
  w.token_embedding = b.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden);
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string l = "model.layers." + std::to_string(i) + ".";
    LayerWeights& layer = w.layers.emplace_back();
    layer.attention_norm = norm(l + "input_layernorm", c.hidden);
    layer.q = b.linear(l + "self_attn.q_proj", c.q_dim(), c.hidden, c.qkv_bias);
    layer.k = b.linear(l + "self_attn.k_proj", c.kv_dim(), c.hidden, c.qkv_bias);
    layer.v = b.linear(l + "self_attn.v_proj", c.kv_dim(), c.hidden, c.qkv_bias);
    layer.o = b.linear(l + "self_attn.o_proj", c.hidden, c.q_dim(), c.out_bias);
    if (c.qk_norm) {
      layer.q_norm = norm(l + "self_attn.q_norm", c.head_dim);
      layer.k_norm = norm(l + "self_attn.k_norm", c.head_dim);
    }
    if (c.post_norms) {
      // Gemma's post_attention_layernorm normalises the attention output; the MLP's input norm
      // is pre_feedforward_layernorm.
      layer.post_attention_norm = norm(l + "post_attention_layernorm", c.hidden);
      layer.mlp_norm = norm(l + "pre_feedforward_layernorm", c.hidden);
      layer.post_mlp_norm = norm(l + "post_feedforward_layernorm", c.hidden);
    } else {
      layer.mlp_norm = norm(l + "post_attention_layernorm", c.hidden);
    }
    layer.gate = b.linear(l + "mlp.gate_proj", c.intermediate, c.hidden, c.mlp_bias);
    layer.up = b.linear(l + "mlp.up_proj", c.intermediate, c.hidden, c.mlp_bias);
    layer.down = b.linear(l + "mlp.down_proj", c.hidden, c.intermediate, c.mlp_bias);
  }
  w.final_norm = norm("model.norm", c.hidden);
  // An untied head must be in the file (transformers would initialise a missing one at random);
  // a tied checkpoint that stores the head anyway is read as stored.
  w.lm_head = {c.tied_embeddings && !b.find("lm_head.weight")
                   ? w.token_embedding
                   : b.matrix("lm_head.weight", c.vocab_size, c.hidden),
               {}};
}

// Buffers that Hugging Face checkpoints of these families may store but the model recomputes
// from the config: GPT-2's and GPT-NeoX's causal-mask buffers (`attn.bias`, `attn.masked_bias`,
// `attention.bias`, `attention.masked_bias`) and the rotary inverse frequencies
// (`rotary_emb.inv_freq`). Weights of these families never end in these names (GPT-2's bias
// weights are `attn.c_attn.bias` and `attn.c_proj.bias`).
bool hf_recomputed_buffer(std::string_view name) {
  for (const std::string_view suffix : {".attn.bias", ".attn.masked_bias", ".attention.bias",
                                        ".attention.masked_bias", ".rotary_emb.inv_freq"}) {
    if (name.ends_with(suffix)) return true;
  }
  return false;
}

// llama.cpp reads the biases of llama-style models when a file has them and requires those its
// architecture always has (qwen2's q/k/v, all of gpt2's and gptneox's).
Bias gguf_bias(bool required) { return required ? Bias::Required : Bias::Optional; }

void bind_gguf(Binder& b, Config& c, Weights& w) {
  const bool layer_norm = c.norm == NormKind::LayerNorm;
  w.token_embedding = b.matrix("token_embd.weight", c.vocab_size, c.hidden);
  if (c.positions == PositionKind::Learned) {
    const TensorRef& pos = b.get("position_embd.weight");
    require(pos.shape.size() == 2 && pos.shape[1] == c.hidden, "position_embd.weight has shape ",
            shape_text(pos.shape));
    c.max_positions = pos.shape[0];
    w.position_embedding = pos;
  }
  if (const TensorRef* freqs = b.find("rope_freqs.weight")) {
    require(freqs->shape.size() == 1 && freqs->elements() == c.rotary_dim / 2,
            "rope_freqs.weight has shape ", shape_text(freqs->shape), ", expected [",
            c.rotary_dim / 2, "]");
    c.rope_freq_factors = to_float(*freqs);
    // Each inverse frequency is divided by its factor.
    for (size_t i = 0; i < c.rope_freq_factors.size(); ++i) {
      const float factor = c.rope_freq_factors[i];
      require(std::isfinite(factor) && factor > 0, "rope_freqs.weight[", i, "] = ", factor,
              " is not a positive finite factor");
    }
  }
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string l = "blk." + std::to_string(i) + ".";
    LayerWeights& layer = w.layers.emplace_back();
    layer.attention_norm = b.norm(l + "attn_norm", c.hidden, layer_norm);
    if (const TensorRef* fused = b.find(l + "attn_qkv.weight")) {
      split_contiguous_qkv(
          b, *fused, b.bias(l + "attn_qkv.bias", c.q_dim() + 2 * c.kv_dim(), gguf_bias(c.qkv_bias)),
          c, layer);
    } else {
      layer.q = b.linear(l + "attn_q", c.q_dim(), c.hidden, gguf_bias(c.qkv_bias));
      layer.k = b.linear(l + "attn_k", c.kv_dim(), c.hidden, gguf_bias(c.qkv_bias));
      layer.v = b.linear(l + "attn_v", c.kv_dim(), c.hidden, gguf_bias(c.qkv_bias));
    }
    layer.o = b.linear(l + "attn_output", c.hidden, c.q_dim(), gguf_bias(c.out_bias));
    if (c.qk_norm) {
      layer.q_norm = b.norm(l + "attn_q_norm", c.head_dim, false);
      layer.k_norm = b.norm(l + "attn_k_norm", c.head_dim, false);
    }
    if (c.post_norms) {
      layer.post_attention_norm = b.norm(l + "post_attention_norm", c.hidden, layer_norm);
      layer.post_mlp_norm = b.norm(l + "post_ffw_norm", c.hidden, layer_norm);
    }
    layer.mlp_norm = b.norm(l + "ffn_norm", c.hidden, layer_norm);
    if (c.gated_mlp)
      layer.gate = b.linear(l + "ffn_gate", c.intermediate, c.hidden, gguf_bias(c.mlp_bias));
    layer.up = b.linear(l + "ffn_up", c.intermediate, c.hidden, gguf_bias(c.mlp_bias));
    layer.down = b.linear(l + "ffn_down", c.hidden, c.intermediate, gguf_bias(c.mlp_bias));
  }
  w.final_norm = b.norm("output_norm", c.hidden, layer_norm);
  c.tied_embeddings = b.find("output.weight") == nullptr;
  w.lm_head = {
      c.tied_embeddings ? w.token_embedding : b.matrix("output.weight", c.vocab_size, c.hidden),
      b.bias("output.bias", c.vocab_size, Bias::Optional)};
}

}  // namespace

struct Model::Files {
  std::variant<std::monostate, GgufFile, HfModelDir> checkpoint;
};

Model::Model() : files_(std::make_unique<Files>()) {}
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
Model::~Model() = default;

std::filesystem::path Model::default_model_path() {
  if (const char* env = std::getenv("VISIKV_DEFAULT_MODEL"); env != nullptr && *env != '\0')
    return env;
  return std::filesystem::path(VISIKV_SOURCE_DIR) / "models" / kDefaultModelFile;
}

Model Model::load(const std::string& spec) {
  namespace fs = std::filesystem;
  Model model;
  const fs::path path = spec == "default" ? default_model_path() : fs::path(spec);
  const FileKind kind = file_kind(path);
  require(kind != FileKind::Missing || spec != "default", "the default model is not at ", path,
          "; run scripts/setup.sh (or set VISIKV_DEFAULT_MODEL to the GGUF file)");
  require(kind != FileKind::Missing, "model not found: ", path,
          " (expected a Hugging Face directory, a .gguf file, or 'default')");
  model.source_ = path.string();
  if (kind == FileKind::Directory) {
    HfModelDir& dir = model.files_->checkpoint.emplace<HfModelDir>(path);
    model.format_ = "safetensors";
    model.config_ = config_from_hf(dir.config(), dir.generation_config(), path);
    Binder binder(dir.tensors(), path.string(), model.weights_, dir.unread_tensors());
    bind_hf(binder, model.config_.architecture, model.config_, model.weights_);
    binder.require_all_bound(hf_recomputed_buffer);
    require(!dir.tokenizer_json().empty(), path, ": no tokenizer.json in the model directory");
    model.tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_hf_json(dir.tokenizer_json()));
  } else {
    GgufFile& gguf = model.files_->checkpoint.emplace<GgufFile>(path);
    model.format_ = "gguf";
    model.config_ = config_from_gguf(gguf.metadata(), str_cat("GGUF file ", path));
    Binder binder(gguf.tensors(), path.string(), model.weights_);
    bind_gguf(binder, model.config_, model.weights_);
    // Every tensor llama.cpp's writers put in files of these architectures has a role.
    binder.require_all_bound([](std::string_view) { return false; });
    try {
      model.tokenizer_ =
          std::make_unique<Tokenizer>(Tokenizer::from_gguf_metadata(gguf.metadata()));
    } catch (const Error& e) {
      fail("GGUF file ", path, ": ", e.what());  // the tokenizer sees only the metadata
    }
  }
  model.config_.validate();
  return model;
}

std::string Model::describe() const {
  const Config& c = config_;
  int64_t parameters = weights_.token_embedding.elements();
  std::string dtypes;
  auto note = [&](const TensorRef& t) {
    const std::string name(dtype_name(t.dtype));
    if (dtypes.find(name) == std::string::npos) dtypes += (dtypes.empty() ? "" : ", ") + name;
  };
  note(weights_.token_embedding);
  for (const LayerWeights& l : weights_.layers) {
    for (const Linear* lin : {&l.q, &l.k, &l.v, &l.o, &l.up, &l.down}) {
      parameters += lin->weight.elements();
      note(lin->weight);
    }
    if (l.gate) parameters += l.gate->weight.elements();
  }
  if (weights_.lm_head.weight.data.data() != weights_.token_embedding.data.data())
    parameters += weights_.lm_head.weight.elements();
  return str_cat("model:        ", source_, " (", format_, ")\n", "architecture: ", c.describe(),
                 "\n", "parameters:   ", parameters, " (matrices stored as ", dtypes, ")\n",
                 "context:      ", c.max_positions, " positions\n",
                 "tied head:    ", c.tied_embeddings ? "yes" : "no", "\n",
                 "kernels:      ", weight_kernel_target(), " (VISIKV_SIMD limits them)\n",
                 "tokenizer:    ", tokenizer_->kind(), ", ", tokenizer_->vocab_size(), " tokens",
                 tokenizer_->bos_id() ? str_cat(", BOS ", *tokenizer_->bos_id()) : "",
                 tokenizer_->adds_bos() ? " (added)" : "",
                 tokenizer_->eos_id() ? str_cat(", EOS ", *tokenizer_->eos_id()) : "", "\n");
}

}  // namespace visikv

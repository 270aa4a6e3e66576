#include "visikv/model/config.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "visikv/core/error.h"

namespace visikv {

using nlohmann::json;

namespace {

// Reads a required field, naming it when it is missing or of the wrong type.
template <typename T>
T field(const json& object, const std::string& key, const std::string& where) {
  const auto it = object.find(key);
  require(it != object.end() && !it->is_null(), where, ": missing required field '", key, "'");
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    fail(where, ": field '", key, "' has the wrong type (", it->type_name(), ")");
  }
}

template <typename T>
T field_or(const json& object, const std::string& key, T fallback) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    fail("config field '", key, "' has the wrong type (", it->type_name(), ")");
  }
}

std::vector<int32_t> token_ids(const json& value) {
  std::vector<int32_t> ids;
  if (value.is_number_integer()) ids.push_back(value.get<int32_t>());
  if (value.is_array())
    for (const json& id : value)
      if (id.is_number_integer()) ids.push_back(id.get<int32_t>());
  return ids;
}

Activation activation_from_name(const std::string& name, const std::string& where) {
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") {
    return Activation::GeluTanh;
  }
  if (name == "gelu") return Activation::GeluErf;
  if (name == "silu" || name == "swish") return Activation::SiLU;
  fail(where, ": unsupported activation function '", name, "'");
}

void read_rope_scaling(const json& hf, Config& config) {
  // transformers writes either "rope_scaling" or, in newer releases, "rope_parameters".
  const json* scaling = nullptr;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    const auto it = hf.find(key);
    if (it != hf.end() && it->is_object()) scaling = &*it;
  }
  if (scaling == nullptr) return;
  if (scaling->contains("rope_theta"))
    config.rope_theta = field<double>(*scaling, "rope_theta", "rope");
  const std::string type = field_or<std::string>(
      *scaling, "rope_type", field_or<std::string>(*scaling, "type", "default"));
  if (type == "default") return;
  if (type == "linear") {
    config.rope_scaling.type = RopeScaling::Type::Linear;
    config.rope_scaling.factor = field<double>(*scaling, "factor", "rope_scaling");
  } else if (type == "llama3") {
    RopeScaling& s = config.rope_scaling;
    s.type = RopeScaling::Type::Llama3;
    s.factor = field<double>(*scaling, "factor", "rope_scaling");
    s.low_freq_factor = field<double>(*scaling, "low_freq_factor", "rope_scaling");
    s.high_freq_factor = field<double>(*scaling, "high_freq_factor", "rope_scaling");
    s.original_max_positions =
        field<int64_t>(*scaling, "original_max_position_embeddings", "rope_scaling");
  } else {
    fail("config.json: unsupported rope scaling type '", type, "' (supported: linear, llama3)");
  }
}

Config llama_like_from_hf(const json& hf, const std::string& where) {
  Config c;
  c.hidden = field<int64_t>(hf, "hidden_size", where);
  c.layers = field<int64_t>(hf, "num_hidden_layers", where);
  c.heads = field<int64_t>(hf, "num_attention_heads", where);
  c.kv_heads = field_or<int64_t>(hf, "num_key_value_heads", c.heads);
  c.head_dim = field_or<int64_t>(hf, "head_dim", c.heads > 0 ? c.hidden / c.heads : 0);
  c.intermediate = field<int64_t>(hf, "intermediate_size", where);
  c.max_positions = field_or<int64_t>(hf, "max_position_embeddings", 2048);
  c.norm = NormKind::RMSNorm;
  c.norm_eps = field_or<double>(hf, "rms_norm_eps", 1e-6);
  c.activation = activation_from_name(field_or<std::string>(hf, "hidden_act", "silu"), where);
  c.gated_mlp = true;
  c.qkv_bias = field_or<bool>(hf, "attention_bias", false);
  c.out_bias = c.qkv_bias;
  c.mlp_bias = field_or<bool>(hf, "mlp_bias", false);
  c.tied_embeddings = field_or<bool>(hf, "tie_word_embeddings", false);
  c.positions = PositionKind::Rotary;
  c.rope_theta = field_or<double>(hf, "rope_theta", 10000.0);
  c.rotary_dim = c.head_dim;
  c.rope_layout = RopeLayout::Half;
  read_rope_scaling(hf, c);
  return c;
}

}  // namespace

const std::vector<std::string>& supported_hf_model_types() {
  static const std::vector<std::string> types = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2"};
  return types;
}

Config config_from_hf(const json& hf, const json& generation_config) {
  require(hf.is_object(), "config.json: expected a JSON object");
  const std::string where = "config.json";
  const std::string model_type = field<std::string>(hf, "model_type", where);
  Config c;
  if (model_type == "gpt2") {
    c.hidden = field<int64_t>(hf, "n_embd", where);
    c.layers = field<int64_t>(hf, "n_layer", where);
    c.heads = field<int64_t>(hf, "n_head", where);
    c.kv_heads = c.heads;
    c.head_dim = c.heads > 0 ? c.hidden / c.heads : 0;
    c.intermediate = field_or<int64_t>(hf, "n_inner", 4 * c.hidden);
    c.max_positions = field<int64_t>(hf, "n_positions", where);
    c.norm = NormKind::LayerNorm;
    c.norm_eps = field_or<double>(hf, "layer_norm_epsilon", 1e-5);
    c.activation =
        activation_from_name(field_or<std::string>(hf, "activation_function", "gelu_new"), where);
    c.gated_mlp = false;
    c.qkv_bias = c.out_bias = c.mlp_bias = true;
    c.tied_embeddings = field_or<bool>(hf, "tie_word_embeddings", true);
    c.positions = PositionKind::Learned;
  } else if (model_type == "gpt_neox") {
    c.hidden = field<int64_t>(hf, "hidden_size", where);
    c.layers = field<int64_t>(hf, "num_hidden_layers", where);
    c.heads = field<int64_t>(hf, "num_attention_heads", where);
    c.kv_heads = c.heads;
    c.head_dim = c.heads > 0 ? c.hidden / c.heads : 0;
    c.intermediate = field<int64_t>(hf, "intermediate_size", where);
    c.max_positions = field_or<int64_t>(hf, "max_position_embeddings", 2048);
    c.norm = NormKind::LayerNorm;
    c.norm_eps = field_or<double>(hf, "layer_norm_eps", 1e-5);
    c.activation = activation_from_name(field_or<std::string>(hf, "hidden_act", "gelu"), where);
    c.gated_mlp = false;
    c.parallel_residual = field_or<bool>(hf, "use_parallel_residual", true);
    c.qkv_bias = c.out_bias = field_or<bool>(hf, "attention_bias", true);
    c.mlp_bias = true;
    c.tied_embeddings = field_or<bool>(hf, "tie_word_embeddings", false);
    c.positions = PositionKind::Rotary;
    c.rope_theta =
        field_or<double>(hf, "rotary_emb_base", field_or<double>(hf, "rope_theta", 10000.0));
    const double fraction =
        field_or<double>(hf, "rotary_pct", field_or<double>(hf, "partial_rotary_factor", 1.0));
    read_rope_scaling(hf, c);
    c.rotary_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * fraction);
    c.rope_layout = RopeLayout::Half;
  } else if (model_type == "llama" || model_type == "mistral" || model_type == "qwen2") {
    c = llama_like_from_hf(hf, where);
    if (model_type == "qwen2") {
      c.qkv_bias = true;
      c.out_bias = false;
      if (field_or<bool>(hf, "use_sliding_window", false))
        c.sliding_window = field_or<int64_t>(hf, "sliding_window", 0);
    }
    if (model_type == "mistral") c.sliding_window = field_or<int64_t>(hf, "sliding_window", 0);
  } else {
    std::string supported;
    for (const std::string& t : supported_hf_model_types())
      supported += (supported.empty() ? "" : ", ") + t;
    fail("config.json: unsupported model_type '", model_type, "' (supported: ", supported, ")");
  }
  c.architecture = model_type;
  c.vocab_size = field<int64_t>(hf, "vocab_size", where);
  const json& gen = generation_config.is_object() ? generation_config : hf;
  if (gen.contains("bos_token_id") && gen["bos_token_id"].is_number_integer())
    c.bos_id = gen["bos_token_id"].get<int32_t>();
  else if (hf.contains("bos_token_id") && hf["bos_token_id"].is_number_integer())
    c.bos_id = hf["bos_token_id"].get<int32_t>();
  c.eos_ids = token_ids(gen.value("eos_token_id", json()));
  if (c.eos_ids.empty()) c.eos_ids = token_ids(hf.value("eos_token_id", json()));
  c.validate();
  return c;
}

Config config_from_gguf(const json& meta) {
  const std::string arch = field<std::string>(meta, "general.architecture", "GGUF metadata");
  const std::string where = "GGUF metadata (" + arch + ")";
  auto key = [&](const std::string& name) { return arch + "." + name; };
  Config c;
  c.architecture = arch;
  c.hidden = field<int64_t>(meta, key("embedding_length"), where);
  c.layers = field<int64_t>(meta, key("block_count"), where);
  c.heads = field<int64_t>(meta, key("attention.head_count"), where);
  c.kv_heads = field_or<int64_t>(meta, key("attention.head_count_kv"), c.heads);
  c.head_dim =
      field_or<int64_t>(meta, key("attention.key_length"), c.heads > 0 ? c.hidden / c.heads : 0);
  c.intermediate = field<int64_t>(meta, key("feed_forward_length"), where);
  c.max_positions = field_or<int64_t>(meta, key("context_length"), 2048);
  if (arch == "llama" || arch == "mistral" || arch == "qwen2") {
    c.norm = NormKind::RMSNorm;
    c.norm_eps = field<double>(meta, key("attention.layer_norm_rms_epsilon"), where);
    c.activation = Activation::SiLU;
    c.gated_mlp = true;
    c.positions = PositionKind::Rotary;
    c.rope_theta = field_or<double>(meta, key("rope.freq_base"), 10000.0);
    c.rotary_dim = field_or<int64_t>(meta, key("rope.dimension_count"), c.head_dim);
    // llama.cpp's converters permute llama Q/K rows so that RoPE pairs adjacent coordinates;
    // qwen2 keeps the Hugging Face layout.
    c.rope_layout = arch == "qwen2" ? RopeLayout::Half : RopeLayout::Interleaved;
    c.qkv_bias = arch == "qwen2";
    c.sliding_window = field_or<int64_t>(meta, key("attention.sliding_window"), 0);
    const std::string scaling = field_or<std::string>(meta, key("rope.scaling.type"), "none");
    if (scaling == "linear") {
      c.rope_scaling.type = RopeScaling::Type::Linear;
      c.rope_scaling.factor = field<double>(meta, key("rope.scaling.factor"), where);
    } else if (scaling != "none") {
      fail(where, ": unsupported rope scaling type '", scaling, "'");
    }
  } else if (arch == "gpt2") {
    c.norm = NormKind::LayerNorm;
    c.norm_eps = field<double>(meta, key("attention.layer_norm_epsilon"), where);
    c.activation = Activation::GeluTanh;
    c.gated_mlp = false;
    c.qkv_bias = c.out_bias = c.mlp_bias = true;
    c.positions = PositionKind::Learned;
  } else if (arch == "gptneox") {
    c.norm = NormKind::LayerNorm;
    c.norm_eps = field<double>(meta, key("attention.layer_norm_epsilon"), where);
    c.activation = Activation::GeluErf;
    c.gated_mlp = false;
    c.parallel_residual = field_or<bool>(meta, key("use_parallel_residual"), true);
    c.qkv_bias = c.out_bias = c.mlp_bias = true;
    c.positions = PositionKind::Rotary;
    c.rope_theta = field_or<double>(meta, key("rope.freq_base"), 10000.0);
    c.rotary_dim = field<int64_t>(meta, key("rope.dimension_count"), where);
    c.rope_layout = RopeLayout::Half;
  } else {
    fail("GGUF: unsupported general.architecture '", arch,
         "' (supported: llama, mistral, qwen2, gpt2, gptneox)");
  }
  const auto tokens = meta.find("tokenizer.ggml.tokens");
  c.vocab_size = field_or<int64_t>(
      meta, key("vocab_size"),
      tokens != meta.end() && tokens->is_array() ? static_cast<int64_t>(tokens->size()) : 0);
  if (meta.contains("tokenizer.ggml.bos_token_id"))
    c.bos_id = field<int32_t>(meta, "tokenizer.ggml.bos_token_id", where);
  if (meta.contains("tokenizer.ggml.eos_token_id"))
    c.eos_ids.push_back(field<int32_t>(meta, "tokenizer.ggml.eos_token_id", where));
  c.validate();
  return c;
}

double Config::score_scale() const {
  return attention_scale > 0 ? attention_scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

void Config::validate() const {
  const std::string where = "model config (" + architecture + ")";
  require(vocab_size > 0, where, ": vocab_size must be positive");
  require(
      hidden > 0 && layers > 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && intermediate > 0,
      where,
      ": hidden size, layers, heads, kv heads, head dim and intermediate size must be positive");
  require(heads % kv_heads == 0, where, ": ", heads, " query heads are not a multiple of ",
          kv_heads, " key/value heads");
  require(hidden <= (1 << 20) && layers <= 4096 && heads <= 4096 && head_dim <= 4096 &&
              intermediate <= (1 << 22) && vocab_size <= (1 << 24),
          where, ": implausible sizes");
  if (positions == PositionKind::Rotary) {
    require(rotary_dim > 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0, where,
            ": rotary dimension ", rotary_dim, " must be even and at most the head dim ", head_dim);
    require(rope_theta > 0, where, ": rope theta must be positive");
  }
  require(sliding_window >= 0, where, ": negative sliding window");
  require(norm_eps > 0 && std::isfinite(norm_eps), where, ": norm epsilon must be positive");
}

std::string Config::describe() const {
  return str_cat(architecture, ": ", layers, " layers, hidden ", hidden, ", ", heads, " heads (",
                 kv_heads, " kv heads) x ", head_dim, ", mlp ", intermediate,
                 gated_mlp ? " gated" : "", ", vocab ", vocab_size, ", ",
                 positions == PositionKind::Rotary
                     ? str_cat("rope theta ", rope_theta, " over ", rotary_dim, " dims",
                               rope_layout == RopeLayout::Interleaved ? " (interleaved pairs)" : "")
                     : std::string("learned positions"),
                 norm == NormKind::RMSNorm ? ", RMSNorm" : ", LayerNorm",
                 parallel_residual ? ", parallel residual" : "",
                 sliding_window > 0 ? str_cat(", sliding window ", sliding_window) : "");
}

}  // namespace visikv

#include "visikv/model/config.h"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "visikv/core/error.h"
#include "visikv/tokenizer/tokenizer.h"

namespace visikv {

using nlohmann::json;

namespace {

// Plausibility bounds of the sizes: far above any released model, low enough that products of
// them cannot overflow and that a corrupt number fails here instead of in an allocation.
constexpr int64_t kMaxHidden = int64_t{1} << 20;
constexpr int64_t kMaxCount = 4096;  // layers, heads, head dim, rotary dims
constexpr int64_t kMaxIntermediate = int64_t{1} << 22;
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxPositions = int64_t{1} << 24;
constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();

// The value of `key`, or nullptr when it is absent or null.
const json* find_value(const json& object, const std::string& key) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

// A string or boolean field; numbers go through integer() and number().
template <typename T>
T field(const json& object, const std::string& key, const std::string& where) {
  static_assert(std::is_same_v<T, std::string> || std::is_same_v<T, bool>);
  const json* value = find_value(object, key);
  require(value != nullptr, where, ": missing required field '", key, "'");
  require(std::is_same_v<T, bool> ? value->is_boolean() : value->is_string(), where, ": field '",
          key, "' has the wrong type (", value->type_name(), ")");
  return value->get<T>();
}

template <typename T>
T field_or(const json& object, const std::string& key, const std::string& where, T fallback) {
  return find_value(object, key) ? field<T>(object, key, where) : fallback;
}

// An integer field in [lo, hi]. It must be a JSON integer (GGUF: an integer type): 64.5 or "64"
// is an error, never truncated or converted.
int64_t integer_value(const json& value, const std::string& key, const std::string& where,
                      int64_t lo, int64_t hi) {
  require(value.is_number_integer(), where, ": field '", key,
          "' has the wrong type: expected an integer, got ", value.dump());
  const bool fits =
      !value.is_number_unsigned() || value.get<uint64_t>() <= static_cast<uint64_t>(kNoLimit);
  const int64_t v = fits ? value.get<int64_t>() : kNoLimit;
  if (!fits || v < lo || v > hi) {
    const std::string kind = lo == 1   ? "a positive integer"
                             : lo == 0 ? "a non-negative integer"
                                       : str_cat("an integer of at least ", lo);
    fail(where, ": field '", key, "' = ", value.dump(), " is out of range (expected ", kind,
         hi < kNoLimit ? str_cat(" of at most ", hi) : std::string(), ")");
  }
  return v;
}

int64_t integer(const json& object, const std::string& key, const std::string& where, int64_t lo,
                int64_t hi) {
  const json* value = find_value(object, key);
  require(value != nullptr, where, ": missing required field '", key, "'");
  return integer_value(*value, key, where, lo, hi);
}

int64_t integer_or(const json& object, const std::string& key, const std::string& where,
                   int64_t fallback, int64_t lo, int64_t hi) {
  const json* value = find_value(object, key);
  return value ? integer_value(*value, key, where, lo, hi) : fallback;
}

// What a real-valued field must be. Every one the config reads is a positive finite number
// except the rotary fraction, in (0, 1].
enum class Real { Positive, Fraction };

double number_value(const json& value, const std::string& key, const std::string& where,
                    Real kind) {
  require(value.is_number(), where, ": field '", key,
          "' has the wrong type: expected a number, got ", value.dump());
  const double v = value.get<double>();
  const bool valid = std::isfinite(v) && v > 0 && (kind == Real::Positive || v <= 1);
  require(valid, where, ": field '", key, "' = ", v, " is out of range (expected ",
          kind == Real::Positive ? "a positive finite number" : "a fraction in (0, 1]", ")");
  return v;
}

double number(const json& object, const std::string& key, const std::string& where,
              Real kind = Real::Positive) {
  const json* value = find_value(object, key);
  require(value != nullptr, where, ": missing required field '", key, "'");
  return number_value(*value, key, where, kind);
}

double number_or(const json& object, const std::string& key, const std::string& where,
                 double fallback, Real kind = Real::Positive) {
  const json* value = find_value(object, key);
  return value ? number_value(*value, key, where, kind) : fallback;
}

// A token id field of config.json or generation_config.json: absent or null, one id, or (for
// eos_token_id) a list of ids, each in [0, vocab_size).
std::vector<int32_t> token_ids(const json& object, const std::string& key, const std::string& where,
                               int64_t vocab_size, bool list_allowed) {
  const json* value = find_value(object, key);
  if (value == nullptr) return {};
  const json single = json::array({*value});
  std::vector<int32_t> ids;
  for (const json& id : list_allowed && value->is_array() ? *value : single) {
    const int64_t v = integer_value(id, key, where, 0, kNoLimit);
    require(v < vocab_size, where, ": field '", key, "' names token ", v,
            ", outside the vocabulary of ", vocab_size, " tokens");
    ids.push_back(static_cast<int32_t>(v));
  }
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

// One object of rope parameters: its rope_theta, when it has one, and its scaling.
void read_rope_object(const json& scaling, const std::string& where, double& theta,
                      RopeScaling& s) {
  theta = number_or(scaling, "rope_theta", where, theta);
  const std::string type = field_or<std::string>(
      scaling, "rope_type", where, field_or<std::string>(scaling, "type", where, "default"));
  if (type == "default") return;
  if (type == "linear") {
    s.type = RopeScaling::Type::Linear;
    s.factor = number(scaling, "factor", where);
  } else if (type == "llama3") {
    s.type = RopeScaling::Type::Llama3;
    s.factor = number(scaling, "factor", where);
    s.low_freq_factor = number(scaling, "low_freq_factor", where);
    s.high_freq_factor = number(scaling, "high_freq_factor", where);
    // The interpolation between the two divides by their difference.
    require(s.high_freq_factor > s.low_freq_factor, where, ": high_freq_factor ",
            s.high_freq_factor, " must exceed low_freq_factor ", s.low_freq_factor);
    s.original_max_positions =
        integer(scaling, "original_max_position_embeddings", where, 1, kMaxPositions);
  } else {
    fail(where, ": unsupported rope scaling type '", type, "' (supported: linear, llama3)");
  }
}

void read_rope_scaling(const json& hf, const std::string& file, Config& config) {
  // transformers writes either "rope_scaling" or, in newer releases, "rope_parameters".
  const json* scaling = nullptr;
  std::string where;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    const auto it = hf.find(key);
    if (it != hf.end() && it->is_object()) {
      scaling = &*it;
      where = file + " " + key;
    }
  }
  if (scaling == nullptr) return;
  read_rope_object(*scaling, where, config.rope_theta, config.rope_scaling);
}

Config llama_like_from_hf(const json& hf, const std::string& where) {
  Config c;
  c.hidden = integer(hf, "hidden_size", where, 1, kMaxHidden);
  c.layers = integer(hf, "num_hidden_layers", where, 1, kMaxCount);
  c.heads = integer(hf, "num_attention_heads", where, 1, kMaxCount);
  c.kv_heads = integer_or(hf, "num_key_value_heads", where, c.heads, 1, kMaxCount);
  c.head_dim = integer_or(hf, "head_dim", where, c.hidden / c.heads, 1, kMaxCount);
  c.intermediate = integer(hf, "intermediate_size", where, 1, kMaxIntermediate);
  c.max_positions = integer_or(hf, "max_position_embeddings", where, 2048, 1, kMaxPositions);
  c.norm = NormKind::RMSNorm;
  c.norm_eps = number_or(hf, "rms_norm_eps", where, 1e-6);
  c.activation =
      activation_from_name(field_or<std::string>(hf, "hidden_act", where, "silu"), where);
  c.gated_mlp = true;
  c.qkv_bias = field_or<bool>(hf, "attention_bias", where, false);
  c.out_bias = c.qkv_bias;
  c.mlp_bias = field_or<bool>(hf, "mlp_bias", where, false);
  c.tied_embeddings = field_or<bool>(hf, "tie_word_embeddings", where, false);
  c.positions = PositionKind::Rotary;
  c.rope_theta = number_or(hf, "rope_theta", where, 10000.0);
  c.rotary_dim = c.head_dim;
  c.rope_layout = RopeLayout::Half;
  read_rope_scaling(hf, where, c);
  return c;
}

// Gemma 3's text model (transformers' Gemma3TextConfig; absent keys take its defaults).
Config gemma3_from_hf(const json& hf, const std::string& where) {
  Config c;
  c.hidden = integer(hf, "hidden_size", where, 1, kMaxHidden);
  c.layers = integer(hf, "num_hidden_layers", where, 1, kMaxCount);
  c.heads = integer(hf, "num_attention_heads", where, 1, kMaxCount);
  c.kv_heads = integer_or(hf, "num_key_value_heads", where, c.heads, 1, kMaxCount);
  c.head_dim = integer_or(hf, "head_dim", where, 256, 1, kMaxCount);
  c.intermediate = integer(hf, "intermediate_size", where, 1, kMaxIntermediate);
  c.max_positions = integer_or(hf, "max_position_embeddings", where, 131072, 1, kMaxPositions);
  c.norm = NormKind::RMSNorm;
  c.norm_eps = number_or(hf, "rms_norm_eps", where, 1e-6);
  c.activation = activation_from_name(
      field_or<std::string>(hf, "hidden_activation", where, "gelu_pytorch_tanh"), where);
  c.gated_mlp = true;
  c.qkv_bias = c.out_bias = field_or<bool>(hf, "attention_bias", where, false);
  c.tied_embeddings = field_or<bool>(hf, "tie_word_embeddings", where, true);
  c.positions = PositionKind::Rotary;
  c.rotary_dim = c.head_dim;
  c.rope_layout = RopeLayout::Half;
  c.qk_norm = true;
  c.post_norms = true;
  // transformers multiplies the embeddings by a float32 tensor holding sqrt(hidden_size).
  c.embedding_scale = static_cast<float>(std::sqrt(static_cast<double>(c.hidden)));
  c.attention_scale = 1.0 / std::sqrt(number_or(hf, "query_pre_attn_scalar", where, 256.0));
  c.final_logit_softcap = number_or(hf, "final_logit_softcapping", where, 0.0);
  // attn_logit_softcapping is read by transformers' Gemma3Attention but never passed to the
  // attention function, so it changes nothing there; neither does it here.
  require(!field_or<bool>(hf, "use_bidirectional_attention", where, false), where,
          ": use_bidirectional_attention = true (an embedding model, not a causal language "
          "model) is not supported");

  c.sliding_window = integer_or(hf, "sliding_window", where, 4096, 1, kNoLimit);
  if (const json* types = find_value(hf, "layer_types")) {
    require(types->is_array() && static_cast<int64_t>(types->size()) == c.layers, where,
            ": field 'layer_types' must list one type per layer (", c.layers, "), got ",
            types->dump());
    for (const json& type : *types) {
      require(type == "sliding_attention" || type == "full_attention", where,
              ": field 'layer_types' has ", type.dump(),
              " (expected \"sliding_attention\" or \"full_attention\")");
      c.layer_kinds.push_back(type == "sliding_attention" ? LayerKind::Local : LayerKind::Global);
    }
  } else {
    // Older configs give a period instead: every pattern-th layer is global.
    const int64_t pattern = integer_or(hf, "sliding_window_pattern", where, 6, 1, kMaxCount);
    for (int64_t i = 0; i < c.layers; ++i)
      c.layer_kinds.push_back((i + 1) % pattern != 0 ? LayerKind::Local : LayerKind::Global);
  }

  // Global layers: rope_theta (default 1e6) with rope_scaling; local layers:
  // rope_local_base_freq (default 1e4), unscaled. transformers 5 writes both as rope_parameters
  // keyed by layer type.
  c.rope_theta = number_or(hf, "rope_theta", where, 1e6);
  LocalRope local{number_or(hf, "rope_local_base_freq", where, 1e4), {}};
  if (const json* scaling = find_value(hf, "rope_scaling"); scaling && scaling->is_object())
    read_rope_object(*scaling, where + " rope_scaling", c.rope_theta, c.rope_scaling);
  if (const json* params = find_value(hf, "rope_parameters"); params && params->is_object()) {
    if (const json* full = find_value(*params, "full_attention"))
      read_rope_object(*full, where + " rope_parameters.full_attention", c.rope_theta,
                       c.rope_scaling);
    if (const json* sliding = find_value(*params, "sliding_attention"))
      read_rope_object(*sliding, where + " rope_parameters.sliding_attention", local.theta,
                       local.scaling);
  }
  c.local_rope = local;
  return c;
}

}  // namespace

const std::vector<std::string>& supported_hf_model_types() {
  static const std::vector<std::string> types = {"gpt2",    "gpt_neox", "llama",
                                                 "mistral", "qwen2",    "gemma3_text"};
  return types;
}

Config config_from_hf(const json& hf, const json& generation_config,
                      const std::filesystem::path& dir) {
  const std::string where = dir.empty() ? "config.json" : (dir / "config.json").string();
  const std::string generation_where =
      dir.empty() ? "generation_config.json" : (dir / "generation_config.json").string();
  require(hf.is_object(), where, ": expected a JSON object");
  require(generation_config.is_null() || generation_config.is_object(), generation_where,
          ": expected a JSON object");
  const std::string model_type = field<std::string>(hf, "model_type", where);
  Config c;
  if (model_type == "gpt2") {
    c.hidden = integer(hf, "n_embd", where, 1, kMaxHidden);
    c.layers = integer(hf, "n_layer", where, 1, kMaxCount);
    c.heads = integer(hf, "n_head", where, 1, kMaxCount);
    c.kv_heads = c.heads;
    c.head_dim = c.hidden / c.heads;
    c.intermediate = integer_or(hf, "n_inner", where, 4 * c.hidden, 1, kMaxIntermediate);
    c.max_positions = integer(hf, "n_positions", where, 1, kMaxPositions);
    c.norm = NormKind::LayerNorm;
    c.norm_eps = number_or(hf, "layer_norm_epsilon", where, 1e-5);
    c.activation = activation_from_name(
        field_or<std::string>(hf, "activation_function", where, "gelu_new"), where);
    c.gated_mlp = false;
    c.qkv_bias = c.out_bias = c.mlp_bias = true;
    c.tied_embeddings = field_or<bool>(hf, "tie_word_embeddings", where, true);
    c.positions = PositionKind::Learned;
  } else if (model_type == "gpt_neox") {
    c.hidden = integer(hf, "hidden_size", where, 1, kMaxHidden);
    c.layers = integer(hf, "num_hidden_layers", where, 1, kMaxCount);
    c.heads = integer(hf, "num_attention_heads", where, 1, kMaxCount);
    c.kv_heads = c.heads;
    c.head_dim = c.hidden / c.heads;
    c.intermediate = integer(hf, "intermediate_size", where, 1, kMaxIntermediate);
    c.max_positions = integer_or(hf, "max_position_embeddings", where, 2048, 1, kMaxPositions);
    c.norm = NormKind::LayerNorm;
    c.norm_eps = number_or(hf, "layer_norm_eps", where, 1e-5);
    c.activation =
        activation_from_name(field_or<std::string>(hf, "hidden_act", where, "gelu"), where);
    c.gated_mlp = false;
    c.parallel_residual = field_or<bool>(hf, "use_parallel_residual", where, true);
    c.qkv_bias = c.out_bias = field_or<bool>(hf, "attention_bias", where, true);
    c.mlp_bias = true;
    c.tied_embeddings = field_or<bool>(hf, "tie_word_embeddings", where, false);
    c.positions = PositionKind::Rotary;
    c.rope_theta =
        number_or(hf, "rotary_emb_base", where, number_or(hf, "rope_theta", where, 10000.0));
    const double fraction = number_or(
        hf, "rotary_pct", where, number_or(hf, "partial_rotary_factor", where, 1.0, Real::Fraction),
        Real::Fraction);
    read_rope_scaling(hf, where, c);
    c.rotary_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * fraction);
    c.rope_layout = RopeLayout::Half;
  } else if (model_type == "llama" || model_type == "mistral" || model_type == "qwen2") {
    c = llama_like_from_hf(hf, where);
    if (model_type == "qwen2") {
      c.qkv_bias = true;
      c.out_bias = false;
      if (field_or<bool>(hf, "use_sliding_window", where, false))
        c.sliding_window = integer_or(hf, "sliding_window", where, 0, 0, kNoLimit);
    }
    if (model_type == "mistral")
      c.sliding_window = integer_or(hf, "sliding_window", where, 0, 0, kNoLimit);
  } else if (model_type == "gemma3_text") {
    c = gemma3_from_hf(hf, where);
  } else {
    std::string supported;
    for (const std::string& t : supported_hf_model_types())
      supported += (supported.empty() ? "" : ", ") + t;
    fail(where, ": unsupported model_type '", model_type, "' (supported: ", supported, ")");
  }
  c.architecture = model_type;
  c.vocab_size = integer(hf, "vocab_size", where, 1, kMaxVocab);
  // generation_config.json's ids win over config.json's; both files' ids are checked.
  const std::vector<int32_t> bos = token_ids(hf, "bos_token_id", where, c.vocab_size, false);
  const std::vector<int32_t> eos = token_ids(hf, "eos_token_id", where, c.vocab_size, true);
  if (!bos.empty()) c.bos_id = bos.front();
  c.eos_ids = eos;
  if (generation_config.is_object()) {
    const std::vector<int32_t> generation_bos =
        token_ids(generation_config, "bos_token_id", generation_where, c.vocab_size, false);
    const std::vector<int32_t> generation_eos =
        token_ids(generation_config, "eos_token_id", generation_where, c.vocab_size, true);
    if (!generation_bos.empty()) c.bos_id = generation_bos.front();
    if (!generation_eos.empty()) c.eos_ids = generation_eos;
  }
  c.validate();
  return c;
}

Config config_from_gguf(const json& meta, const std::string& source) {
  const std::string arch = field<std::string>(meta, "general.architecture", source);
  const std::string where = source + " (" + arch + ")";
  auto key = [&](const std::string& name) { return arch + "." + name; };
  Config c;
  // llama.cpp's linear rope scaling (of every layer; of the global layers for gemma3).
  const auto read_gguf_rope_scaling = [&] {
    const std::string scaling =
        field_or<std::string>(meta, key("rope.scaling.type"), where, "none");
    if (scaling == "linear") {
      c.rope_scaling.type = RopeScaling::Type::Linear;
      c.rope_scaling.factor = number(meta, key("rope.scaling.factor"), where);
    } else if (scaling != "none") {
      fail(where, ": unsupported rope scaling type '", scaling, "'");
    }
  };
  c.architecture = arch;
  c.hidden = integer(meta, key("embedding_length"), where, 1, kMaxHidden);
  c.layers = integer(meta, key("block_count"), where, 1, kMaxCount);
  c.heads = integer(meta, key("attention.head_count"), where, 1, kMaxCount);
  c.kv_heads = integer_or(meta, key("attention.head_count_kv"), where, c.heads, 1, kMaxCount);
  c.head_dim =
      integer_or(meta, key("attention.key_length"), where, c.hidden / c.heads, 1, kMaxCount);
  c.intermediate = integer(meta, key("feed_forward_length"), where, 1, kMaxIntermediate);
  c.max_positions = integer_or(meta, key("context_length"), where, 2048, 1, kMaxPositions);
  if (arch == "llama" || arch == "mistral" || arch == "qwen2") {
    c.norm = NormKind::RMSNorm;
    c.norm_eps = number(meta, key("attention.layer_norm_rms_epsilon"), where);
    c.activation = Activation::SiLU;
    c.gated_mlp = true;
    c.positions = PositionKind::Rotary;
    c.rope_theta = number_or(meta, key("rope.freq_base"), where, 10000.0);
    c.rotary_dim = integer_or(meta, key("rope.dimension_count"), where, c.head_dim, 1, kMaxCount);
    // llama.cpp's converters permute llama Q/K rows so that RoPE pairs adjacent coordinates;
    // qwen2 keeps the Hugging Face layout.
    c.rope_layout = arch == "qwen2" ? RopeLayout::Half : RopeLayout::Interleaved;
    c.qkv_bias = arch == "qwen2";
    c.sliding_window = integer_or(meta, key("attention.sliding_window"), where, 0, 0, kNoLimit);
    read_gguf_rope_scaling();
  } else if (arch == "gemma3") {
    // What llama.cpp reads for gemma3 and transformers' GGUF loader maps to Gemma3TextConfig.
    // Where the two would fall back to different values (head dim: hidden / heads or 256; rope
    // base: 1e4 or 1e6; sliding window: none or 4096), the key is required.
    c.head_dim = integer(meta, key("attention.key_length"), where, 1, kMaxCount);
    c.max_positions = integer(meta, key("context_length"), where, 1, kMaxPositions);
    c.norm = NormKind::RMSNorm;
    c.norm_eps = number(meta, key("attention.layer_norm_rms_epsilon"), where);
    c.activation = Activation::GeluTanh;
    c.gated_mlp = true;
    c.positions = PositionKind::Rotary;
    c.rope_theta = number(meta, key("rope.freq_base"), where);
    c.rotary_dim = c.head_dim;
    c.rope_layout = RopeLayout::Half;  // llama.cpp rotates Gemma NeoX-style; no permutation
    read_gguf_rope_scaling();
    c.qk_norm = true;
    c.post_norms = true;
    c.embedding_scale = static_cast<float>(std::sqrt(static_cast<double>(c.hidden)));
    c.sliding_window = integer(meta, key("attention.sliding_window"), where, 1, kNoLimit);
    // The file stores neither the layer pattern nor the local rope base; llama.cpp and
    // transformers both take every sixth layer as global and 1e4 as the local base.
    for (int64_t i = 0; i < c.layers; ++i)
      c.layer_kinds.push_back((i + 1) % 6 != 0 ? LayerKind::Local : LayerKind::Global);
    c.local_rope = LocalRope{10000.0, {}};
    // query_pre_attn_scalar is not stored either: it is the head dim except for the 27B model
    // (62 layers), trained with hidden / heads, as llama.cpp sets it.
    c.attention_scale =
        1.0 / std::sqrt(static_cast<double>(c.layers == 62 ? c.hidden / c.heads : c.head_dim));
  } else if (arch == "gpt2") {
    c.norm = NormKind::LayerNorm;
    c.norm_eps = number(meta, key("attention.layer_norm_epsilon"), where);
    c.activation = Activation::GeluTanh;
    c.gated_mlp = false;
    c.qkv_bias = c.out_bias = c.mlp_bias = true;
    c.positions = PositionKind::Learned;
  } else if (arch == "gptneox") {
    c.norm = NormKind::LayerNorm;
    c.norm_eps = number(meta, key("attention.layer_norm_epsilon"), where);
    c.activation = Activation::GeluErf;
    c.gated_mlp = false;
    c.parallel_residual = field_or<bool>(meta, key("use_parallel_residual"), where, true);
    c.qkv_bias = c.out_bias = c.mlp_bias = true;
    c.positions = PositionKind::Rotary;
    c.rope_theta = number_or(meta, key("rope.freq_base"), where, 10000.0);
    c.rotary_dim = integer(meta, key("rope.dimension_count"), where, 1, kMaxCount);
    c.rope_layout = RopeLayout::Half;
  } else {
    fail(source, ": unsupported general.architecture '", arch,
         "' (supported: llama, mistral, qwen2, gemma3, gpt2, gptneox)");
  }
  const auto tokens = meta.find("tokenizer.ggml.tokens");
  c.vocab_size = integer_or(
      meta, key("vocab_size"), where,
      tokens != meta.end() && tokens->is_array() ? static_cast<int64_t>(tokens->size()) : 0, 1,
      kMaxVocab);
  require(c.vocab_size > 0, where, ": neither ", key("vocab_size"),
          " nor tokenizer.ggml.tokens gives the vocabulary size");
  c.bos_id = gguf_token_id(meta, "tokenizer.ggml.bos_token_id", c.vocab_size, where);
  if (const auto eos = gguf_token_id(meta, "tokenizer.ggml.eos_token_id", c.vocab_size, where))
    c.eos_ids.push_back(*eos);
  c.validate();
  return c;
}

LayerKind Config::layer_kind(int64_t layer) const {
  if (!layer_kinds.empty()) return layer_kinds.at(static_cast<size_t>(layer));
  return sliding_window > 0 ? LayerKind::Local : LayerKind::Global;
}

int64_t Config::layer_window(int64_t layer) const {
  return layer_kind(layer) == LayerKind::Local ? sliding_window : 0;
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
  require(hidden <= kMaxHidden && layers <= kMaxCount && heads <= kMaxCount &&
              head_dim <= kMaxCount && intermediate <= kMaxIntermediate && vocab_size <= kMaxVocab,
          where, ": implausible sizes");
  require(max_positions > 0 && max_positions <= kMaxPositions, where, ": context length ",
          max_positions, " must be positive and at most ", kMaxPositions);
  if (positions == PositionKind::Rotary) {
    require(rotary_dim > 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0, where,
            ": rotary dimension ", rotary_dim, " must be even and at most the head dim ", head_dim);
    require(rope_theta > 0 && std::isfinite(rope_theta), where,
            ": rope theta must be positive and finite");
    require(rope_scaling.type == RopeScaling::Type::None ||
                (rope_scaling.factor > 0 && std::isfinite(rope_scaling.factor)),
            where, ": rope scaling factor must be positive and finite");
  }
  require(sliding_window >= 0, where, ": negative sliding window");
  require(layer_kinds.empty() || static_cast<int64_t>(layer_kinds.size()) == layers, where, ": ",
          layer_kinds.size(), " layer kinds for ", layers, " layers");
  for (const LayerKind kind : layer_kinds)
    require(kind == LayerKind::Global || sliding_window > 0, where,
            ": local layers need a positive sliding window");
  if (local_rope) {
    require(local_rope->theta > 0 && std::isfinite(local_rope->theta), where,
            ": local rope theta must be positive and finite");
    require(local_rope->scaling.type == RopeScaling::Type::None ||
                (local_rope->scaling.factor > 0 && std::isfinite(local_rope->scaling.factor)),
            where, ": local rope scaling factor must be positive and finite");
  }
  require(embedding_scale > 0 && std::isfinite(embedding_scale), where,
          ": embedding scale must be positive and finite");
  require(final_logit_softcap >= 0 && std::isfinite(final_logit_softcap), where,
          ": final logit soft-cap must be zero (none) or positive");
  // The post-norms sit before each residual add of the sequential form.
  require(!(post_norms && parallel_residual), where,
          ": post-norms with a parallel residual are not supported");
  require(norm_eps > 0 && std::isfinite(norm_eps), where, ": norm epsilon must be positive");
}

std::string Config::describe() const {
  std::string window_text;
  if (sliding_window > 0) {
    int64_t local = 0;
    for (int64_t l = 0; l < layers; ++l) local += layer_kind(l) == LayerKind::Local ? 1 : 0;
    window_text = local == layers ? str_cat(", sliding window ", sliding_window)
                                  : str_cat(", sliding window ", sliding_window, " on ", local,
                                            " of ", layers, " layers");
    if (local_rope) window_text += str_cat(" (rope theta ", local_rope->theta, " there)");
  }
  return str_cat(architecture, ": ", layers, " layers, hidden ", hidden, ", ", heads, " heads (",
                 kv_heads, " kv heads) x ", head_dim, ", mlp ", intermediate,
                 gated_mlp ? " gated" : "", ", vocab ", vocab_size, ", ",
                 positions == PositionKind::Rotary
                     ? str_cat("rope theta ", rope_theta, " over ", rotary_dim, " dims",
                               rope_layout == RopeLayout::Interleaved ? " (interleaved pairs)" : "")
                     : std::string("learned positions"),
                 norm == NormKind::RMSNorm ? ", RMSNorm" : ", LayerNorm",
                 parallel_residual ? ", parallel residual" : "", qk_norm ? ", q/k norms" : "",
                 post_norms ? ", post-norms" : "", window_text,
                 final_logit_softcap > 0 ? str_cat(", logit soft-cap ", final_logit_softcap) : "");
}

}  // namespace visikv

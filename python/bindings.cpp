// The Python extension `visikv._visikv`: the engine, its codecs and selectors, scriptable from
// Python (python/visikv/__init__.py re-exports it). Every call that computes releases the GIL;
// every visikv::Error becomes visikv.Error with the engine's message. Arrays come back as numpy
// arrays that own their memory.
#include <cblas.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <omp.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "visikv/attention/selector_spec.h"
#include "visikv/attention/support.h"
#include "visikv/calibration/basis_file.h"
#include "visikv/cli/app.h"
#include "visikv/core/error.h"
#include "visikv/eval/generate.h"
#include "visikv/eval/text_stream.h"
#include "visikv/eval/trace.h"
#include "visikv/formats/json_file.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/kv/codec_spec.h"
#include "visikv/model/decoder.h"
#include "visikv/model/matmul.h"
#include "visikv/model/model.h"
#include "visikv/model/weight_kernels.h"
#include "visikv/tokenizer/chat_template.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace visikv::python {

namespace {

// A float32 numpy array that owns `values` (moved to the heap, freed with the array).
nb::ndarray<nb::numpy, float> to_numpy(std::vector<float>&& values,
                                       std::initializer_list<size_t> shape) {
  auto* owned = new std::vector<float>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  return nb::ndarray<nb::numpy, float>(owned->data(), shape, owner);
}

// nlohmann::json -> Python objects (dict, list, str, int, float, bool, None).
nb::object to_python(const nlohmann::json& value) {
  switch (value.type()) {
    case nlohmann::json::value_t::object: {
      nb::dict out;
      for (const auto& [key, item] : value.items()) out[nb::str(key.c_str())] = to_python(item);
      return out;
    }
    case nlohmann::json::value_t::array: {
      nb::list out;
      for (const auto& item : value) out.append(to_python(item));
      return out;
    }
    case nlohmann::json::value_t::string:
      return nb::str(value.get_ref<const std::string&>().c_str());
    case nlohmann::json::value_t::boolean:
      return nb::bool_(value.get<bool>());
    case nlohmann::json::value_t::number_integer:
      return nb::int_(value.get<int64_t>());
    case nlohmann::json::value_t::number_unsigned:
      return nb::int_(value.get<uint64_t>());
    case nlohmann::json::value_t::number_float:
      return nb::float_(value.get<double>());
    default:
      return nb::none();
  }
}

// The cache, attention and numerics settings of a call, parsed once where they enter.
struct RunSpecs {
  KeyCodecSpec keys;
  ValueCodecSpec values;
  SelectorSpec selector;
  ProductRounding rounding = ProductRounding::Fastest;
  std::optional<HeadqBasis> basis;

  const HeadqBasisVectors* basis_vectors() const { return basis ? &*basis : nullptr; }
};

// A spec argument's error names the argument, as the command line names the flag.
template <typename Parse>
auto parse_argument(const char* name, const std::string& text, Parse parse) {
  try {
    return parse(text);
  } catch (const Error& e) {
    fail(name, ": ", e.what());
  }
}

RunSpecs parse_specs(const Model& model, const std::string& keys, const std::string& values,
                     const std::string& selector, const std::string& numerics,
                     const std::optional<std::string>& basis) {
  RunSpecs specs;
  specs.keys = parse_argument("keys", keys, parse_key_codec_spec);
  specs.values = parse_argument("values", values, parse_value_codec_spec);
  specs.selector = parse_argument("selector", selector, parse_selector_spec);
  specs.rounding = parse_argument("numerics", numerics, numerics_rounding);
  if (basis) specs.basis = load_headq_basis(*basis, model);
  return specs;
}

std::vector<int32_t> checked_tokens(const Model& model, const std::vector<int64_t>& tokens) {
  const int64_t vocab = model.config().vocab_size;
  std::vector<int32_t> out;
  out.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    require(tokens[i] >= 0 && tokens[i] < vocab, "token ", i, " is ", tokens[i],
            ", outside the vocabulary [0, ", vocab, ")");
    out.push_back(static_cast<int32_t>(tokens[i]));
  }
  return out;
}

// One generated token: its id, its bytes ("" for special tokens) and the text it completes. A
// character can span tokens (byte-level BPE splits UTF-8 sequences), so `text` holds what the
// bytes so far complete and an unfinished character waits for the next token.
struct GeneratedToken {
  int32_t id;
  nb::bytes bytes;
  nb::str text;
};

// A streaming continuation: each __next__ runs one step with the GIL released. It keeps the
// model alive; its decoder, cache and support live on the heap, where the Generation that
// refers to them finds them however often Python moves this object.
class PyGeneration {
 public:
  PyGeneration(std::shared_ptr<const Model> model, std::vector<int32_t> prompt, RunSpecs specs,
               GenerationOptions options)
      : model_(std::move(model)), state_(std::make_unique<State>(*model_, std::move(specs))) {
    state_->decoder.set_product_rounding(state_->specs.rounding);
    const int64_t reserve =
        generation_cache_reserve(static_cast<int64_t>(prompt.size()), options.max_new_tokens);
    state_->cache =
        make_cache(state_->decoder.cache_shape(), state_->specs.keys, state_->specs.values, reserve,
                   state_->specs.selector.cache_block_size(), state_->specs.basis_vectors());
    prepare_summaries(*state_->cache, state_->specs.selector, state_->specs.basis_vectors());
    options.support = state_->support.get();
    state_->generation.emplace(state_->decoder, *state_->cache, prompt, options);
  }

  std::optional<GeneratedToken> next() {
    Generation& generation = *state_->generation;
    std::optional<int32_t> token;
    {
      nb::gil_scoped_release release;
      token = generation.next();
    }
    if (!token) return std::nullopt;
    const Tokenizer& tokenizer = model_->tokenizer();
    const std::string bytes =
        tokenizer.is_special(*token) ? std::string() : tokenizer.token_bytes(*token);
    std::string text = state_->text.push(bytes);
    // The last token flushes what is left, unfinished or not.
    if (generation.done()) text += state_->text.flush();
    return GeneratedToken{*token, nb::bytes(bytes.data(), bytes.size()),
                          nb::str(text.data(), text.size())};
  }

  const GenerationResult& result() const { return state_->generation->result(); }

 private:
  struct State {
    State(const Model& model, RunSpecs run_specs)
        : specs(std::move(run_specs)), decoder(model), support(make_support(specs.selector)) {}
    RunSpecs specs;
    Decoder decoder;
    std::unique_ptr<Support> support;
    std::unique_ptr<KVCache> cache;
    std::optional<Generation> generation;
    TextStream text;  // whole characters out, an unfinished one held back
  };
  std::shared_ptr<const Model> model_;
  std::unique_ptr<State> state_;
};

class PyModel {
 public:
  static PyModel load(const std::string& spec) {
    std::unique_ptr<Model> model;
    {
      nb::gil_scoped_release release;
      model = std::make_unique<Model>(Model::load(spec));
    }
    return PyModel(std::move(model));
  }

  const Model& model() const { return *model_; }

  nb::dict config() const {
    const Config& c = model_->config();
    nb::dict d;
    d["architecture"] = c.architecture;
    d["vocab_size"] = c.vocab_size;
    d["hidden"] = c.hidden;
    d["layers"] = c.layers;
    d["heads"] = c.heads;
    d["kv_heads"] = c.kv_heads;
    d["head_dim"] = c.head_dim;
    d["intermediate"] = c.intermediate;
    d["max_positions"] = c.max_positions;
    d["sliding_window"] = c.sliding_window;
    d["bos_id"] = c.bos_id ? nb::object(nb::int_(*c.bos_id)) : nb::none();
    d["eos_ids"] = c.eos_ids;
    return d;
  }

  std::vector<int32_t> tokenize(const std::string& text, bool add_special) const {
    nb::gil_scoped_release release;
    return model_->tokenizer().encode(text, add_special);
  }

  std::string detokenize(const std::vector<int64_t>& ids) const {
    const std::vector<int32_t> tokens = checked_tokens(*model_, ids);
    nb::gil_scoped_release release;
    return model_->tokenizer().decode(tokens);
  }

  nb::ndarray<nb::numpy, float> logits(const std::vector<int64_t>& ids, const std::string& keys,
                                       const std::string& values, const std::string& selector,
                                       const std::string& numerics,
                                       const std::optional<std::string>& basis) const {
    const std::vector<int32_t> tokens = checked_tokens(*model_, ids);
    require(!tokens.empty(), "logits: no tokens");
    const int64_t vocab = model_->config().vocab_size;
    std::vector<float> out;
    {
      nb::gil_scoped_release release;
      const RunSpecs specs = parse_specs(*model_, keys, values, selector, numerics, basis);
      Decoder decoder(*model_);
      decoder.set_product_rounding(specs.rounding);
      auto cache = make_cache(decoder.cache_shape(), specs.keys, specs.values,
                              static_cast<int64_t>(tokens.size()),
                              specs.selector.cache_block_size(), specs.basis_vectors());
      prepare_summaries(*cache, specs.selector, specs.basis_vectors());
      const std::unique_ptr<Support> support = make_support(specs.selector);
      out = decoder.all_logits(tokens, *cache, {.support = support.get()});
    }
    return to_numpy(std::move(out), {tokens.size(), static_cast<size_t>(vocab)});
  }

  PyGeneration generate(const nb::object& prompt, int64_t max_tokens, double temperature,
                        int64_t top_k, double top_p, uint64_t seed, bool stop_at_eos,
                        const std::string& keys, const std::string& values,
                        const std::string& selector, const std::string& numerics,
                        const std::optional<std::string>& basis) const {
    require(max_tokens >= 0, "generate: max_tokens must be >= 0, not ", max_tokens);
    require(temperature >= 0, "generate: temperature must be >= 0, not ", temperature);
    require(top_k >= 0, "generate: top_k must be >= 0, not ", top_k);
    require(top_p > 0 && top_p <= 1, "generate: top_p must be in (0, 1], not ", top_p);
    std::vector<int32_t> tokens;
    if (nb::isinstance<nb::str>(prompt))
      tokens = tokenize(nb::cast<std::string>(prompt), true);
    else
      tokens = checked_tokens(*model_, nb::cast<std::vector<int64_t>>(prompt));
    GenerationOptions options;
    options.max_new_tokens = max_tokens;
    options.sampling = {.temperature = temperature, .top_k = top_k, .top_p = top_p, .seed = seed};
    options.stop_at_eos = stop_at_eos;
    RunSpecs specs = parse_specs(*model_, keys, values, selector, numerics, basis);
    check_generation_context(model_->config(), static_cast<int64_t>(tokens.size()), max_tokens,
                             PastContext::Refuse);
    return PyGeneration(model_, std::move(tokens), std::move(specs), options);
  }

  std::string apply_chat_template(const std::string& messages_json, bool add_generation_prompt,
                                  const std::optional<std::string>& tools_json) const {
    // Depth-checked first (formats/json_file.h), then read in the caller's key order.
    parse_json(messages_json, "messages");
    if (tools_json) parse_json(*tools_json, "tools");
    const ChatTemplate chat = ChatTemplate::from_tokenizer(model_->tokenizer());
    return chat.render(
        nlohmann::ordered_json::parse(messages_json), add_generation_prompt,
        tools_json ? nlohmann::ordered_json::parse(*tools_json) : nlohmann::ordered_json(),
        chat_template_special_tokens(model_->tokenizer()));
  }

  nb::dict trace(const std::vector<int64_t>& ids, const std::optional<std::vector<int64_t>>& layers,
                 const std::string& keys, const std::string& values, const std::string& selector,
                 const std::optional<std::string>& basis) const {
    const std::vector<int32_t> tokens = checked_tokens(*model_, ids);
    Trace t;
    {
      nb::gil_scoped_release release;
      const RunSpecs specs = parse_specs(*model_, keys, values, selector, "exact", basis);
      Decoder decoder(*model_);
      t = visikv::trace(decoder, tokens,
                        {.keys = specs.keys,
                         .values = specs.values,
                         .selector = specs.selector,
                         .headq_basis = specs.basis_vectors(),
                         .layers = layers.value_or(std::vector<int64_t>{})});
    }
    const auto T = static_cast<size_t>(t.tokens), H = static_cast<size_t>(t.heads),
               KVH = static_cast<size_t>(t.kv_heads), D = static_cast<size_t>(t.head_dim);
    nb::list out_layers;
    for (LayerTrace& layer : t.layers) {
      nb::dict d;
      d["layer"] = layer.layer;
      d["q"] = to_numpy(std::move(layer.queries), {T, H, D});
      d["k"] = to_numpy(std::move(layer.keys), {T, KVH, D});
      d["v"] = to_numpy(std::move(layer.values), {T, KVH, D});
      d["attention"] = to_numpy(std::move(layer.attention), {H, T, T});
      out_layers.append(d);
    }
    nb::dict out;
    out["tokens"] = tokens;
    out["layers"] = out_layers;
    out["logits"] = to_numpy(std::move(t.logits), {T, static_cast<size_t>(t.vocab)});
    return out;
  }

 private:
  explicit PyModel(std::unique_ptr<Model> model) : model_(std::move(model)) {}
  std::shared_ptr<const Model> model_;
};

}  // namespace

}  // namespace visikv::python

NB_MODULE(_visikv, m) {
  using namespace visikv;
  using namespace visikv::python;
  m.doc() = "visikv: an exact inference engine and toolkit for KV-cache compression";

  static nb::exception<Error> error(m, "Error", PyExc_RuntimeError);

  m.def(
      "set_threads",
      [](int threads) {
        require(threads > 0, "set_threads: the thread count must be > 0, not ", threads);
        omp_set_num_threads(threads);
        openblas_set_num_threads(threads);
      },
      "threads"_a, "Worker threads of every later computation (default: all cores).");
  m.def(
      "threads", [] { return omp_get_max_threads(); }, "Worker threads computations use.");
  m.def(
      "run_command",
      [](const std::vector<std::string>& args) {
        nlohmann::json result;
        {
          nb::gil_scoped_release release;
          result = cli::run_command(args);
        }
        return to_python(result);
      },
      "args"_a,
      "Runs a visikv command line in-process (visikv.run wraps it); returns its JSON or None.");
  m.def(
      "kernels", [] { return weight_kernel_target(); },
      "The instruction set the weight kernels were chosen for on this CPU.");

  nb::class_<GeneratedToken>(m, "Token", "One generated token.")
      .def_ro("id", &GeneratedToken::id, "The token id.")
      .def_ro("bytes", &GeneratedToken::bytes, "Its bytes (b'' for special tokens).")
      .def_ro("text", &GeneratedToken::text,
              "The text it completes: its bytes, with those of an unfinished character "
              "before it, less an unfinished character at its end.")
      .def("__repr__", [](const GeneratedToken& t) {
        return nb::str("Token(id={}, text={})").format(t.id, nb::repr(t.text));
      });

  nb::class_<PyGeneration>(m, "Generation",
                           "A continuation in progress: iterate it for the new tokens.")
      .def(
          "__iter__", [](nb::handle self) { return self; },
          nb::sig("def __iter__(self) -> Generation"))
      .def("__next__",
           [](PyGeneration& g) {
             std::optional<GeneratedToken> token = g.next();
             if (!token) throw nb::stop_iteration();
             return *token;
           })
      .def_prop_ro(
          "tokens", [](const PyGeneration& g) { return g.result().tokens; },
          "The new token ids so far.")
      .def_prop_ro(
          "stopped_at_eos", [](const PyGeneration& g) { return g.result().stopped_at_eos; },
          "Whether an end-of-sequence token ended it.")
      .def_prop_ro(
          "prefill_seconds", [](const PyGeneration& g) { return g.result().prefill_seconds; },
          "Time spent on the prompt.")
      .def_prop_ro(
          "decode_seconds", [](const PyGeneration& g) { return g.result().decode_seconds; },
          "Time spent on the decode steps after the first token.");

  nb::class_<PyModel>(m, "Model", "A loaded checkpoint: config, weights and tokenizer.")
      .def_static("load", &PyModel::load, "path"_a = "default",
                  "Opens a Hugging Face model directory, a .gguf file, or 'default'.")
      .def_prop_ro(
          "source", [](const PyModel& p) { return p.model().source(); }, "The path it came from.")
      .def_prop_ro(
          "format", [](const PyModel& p) { return p.model().format(); }, "'gguf' or 'safetensors'.")
      .def_prop_ro("config", &PyModel::config, "The model's shapes and special tokens.")
      .def(
          "describe", [](const PyModel& p) { return p.model().describe(); },
          "The summary `visikv info` prints.")
      .def("__repr__",
           [](const PyModel& p) {
             return str_cat("visikv.Model('", p.model().source(), "', ",
                            p.model().config().architecture, ")");
           })
      .def("tokenize", &PyModel::tokenize, "text"_a, "add_special"_a = true,
           "Token ids of `text`; add_special adds BOS (or the template's tokens) as the model's "
           "tokenizer does.")
      .def("detokenize", &PyModel::detokenize, "ids"_a, "The text of token ids.")
      .def("logits", &PyModel::logits, "tokens"_a, nb::kw_only(), "keys"_a = "f32",
           "values"_a = "f32", "selector"_a = "dense", "numerics"_a = "exact",
           "basis"_a = nb::none(),
           "Next-token logits after every prefix of `tokens` (one forward pass from an empty "
           "cache), float32 [tokens, vocab].")
      .def("generate", &PyModel::generate,
           nb::sig("def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, *, "
                   "temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, "
                   "stop_at_eos: bool = True, keys: str = 'f32', values: str = 'f32', "
                   "selector: str = 'dense', numerics: str = 'exact', basis: str | None = None) "
                   "-> Generation"),
           "prompt"_a, "max_tokens"_a = 64, nb::kw_only(), "temperature"_a = 0.0, "top_k"_a = 0,
           "top_p"_a = 1.0, "seed"_a = 0, "stop_at_eos"_a = true, "keys"_a = "f32",
           "values"_a = "f32", "selector"_a = "dense", "numerics"_a = "exact",
           "basis"_a = nb::none(),
           "Continues a prompt (text or token ids): an iterator of Token, computed as it is "
           "consumed. Greedy at temperature 0.")
      .def("_apply_chat_template", &PyModel::apply_chat_template, "messages_json"_a,
           "add_generation_prompt"_a, "tools_json"_a = nb::none(),
           "Model.apply_chat_template's engine: messages and tools as JSON text.")
      .def("trace", &PyModel::trace, "tokens"_a, nb::kw_only(), "layers"_a = nb::none(),
           "keys"_a = "f32", "values"_a = "f32", "selector"_a = "dense", "basis"_a = nb::none(),
           "One forward pass, recorded: {'tokens', 'logits' [T, vocab], 'layers': [{'layer', "
           "'q' [T, heads, head_dim], 'k' and 'v' [T, kv_heads, head_dim], 'attention' [heads, "
           "T, T]}]}.");
}

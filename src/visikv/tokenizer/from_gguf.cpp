// Tokenizer::from_gguf_metadata: builds a Tokenizer from the tokenizer.ggml.* keys of a GGUF
// file the way llama.cpp's llama_vocab does: "gpt2" vocabularies are byte-level BPE with the
// split regexes llama.cpp ties to tokenizer.ggml.pre, "llama" vocabularies are SentencePiece BPE
// by scores with byte fallback and the leading-space rule.
#include <array>
#include <cmath>
#include <cstdint>

#include "visikv/core/error.h"
#include "visikv/tokenizer/bpe.h"
#include "visikv/tokenizer/chat_template.h"
#include "visikv/tokenizer/spm.h"
#include "visikv/tokenizer/tokenizer.h"
#include "visikv/tokenizer/tokenizer_impl.h"

namespace visikv {

namespace {

using nlohmann::json;

constexpr std::size_t kMaxTokens = std::size_t{1} << 24;

// llama.cpp's token types (tokenizer.ggml.token_type).
enum TokenType : int {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

const json* find_key(const json& metadata, const char* key) {
  const auto it = metadata.find(key);
  return it == metadata.end() ? nullptr : &*it;
}

const json& array_key(const json& metadata, const char* key) {
  const json* value = find_key(metadata, key);
  require(value != nullptr, "GGUF metadata has no ", key);
  require(value->is_array(), "GGUF metadata ", key, " is not an array");
  return *value;
}

std::optional<bool> bool_key(const json& metadata, const char* key) {
  const json* value = find_key(metadata, key);
  if (value == nullptr) return std::nullopt;
  require(value->is_boolean(), "GGUF metadata ", key, " is not a boolean");
  return value->get<bool>();
}

}  // namespace

std::optional<int32_t> gguf_token_id(const nlohmann::json& metadata, const std::string& key,
                                     int64_t vocab_size, const std::string& where) {
  const auto it = metadata.find(key);
  if (it == metadata.end()) return std::nullopt;
  require(it->is_number_integer(), where, ": ", key,
          " has the wrong type: expected an integer, got ", it->dump());
  const bool fits =
      !it->is_number_unsigned() || it->get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX);
  const int64_t id = fits ? it->get<int64_t>() : INT64_MAX;
  // llama.cpp writes -1 (as uint32 0xFFFFFFFF) for "none".
  if (id == -1 || id == 0xFFFFFFFFLL) return std::nullopt;
  require(id >= 0 && id < vocab_size, where, ": ", key, " = ", it->dump(),
          " is outside the vocabulary of ", vocab_size, " tokens");
  return static_cast<int32_t>(id);
}

Tokenizer Tokenizer::from_gguf_metadata(const nlohmann::json& metadata) {
  require(metadata.is_object(), "GGUF metadata is not a key/value object");
  const json* model_key = find_key(metadata, "tokenizer.ggml.model");
  require(model_key != nullptr, "GGUF metadata has no tokenizer.ggml.model (no tokenizer)");
  require(model_key->is_string(), "GGUF metadata tokenizer.ggml.model is not a string");
  const std::string model = model_key->get<std::string>();
  require(model == "gpt2" || model == "llama", "unsupported GGUF tokenizer.ggml.model '", model,
          "' (supported: gpt2 = byte-level BPE, llama = SentencePiece BPE)");

  const json& tokens = array_key(metadata, "tokenizer.ggml.tokens");
  const std::size_t n = tokens.size();
  require(n > 0 && n <= kMaxTokens, "GGUF metadata tokenizer.ggml.tokens has ", n, " tokens");
  std::vector<int> types(n, kNormal);
  if (find_key(metadata, "tokenizer.ggml.token_type") != nullptr) {
    const json& list = array_key(metadata, "tokenizer.ggml.token_type");
    require(list.size() == n, "GGUF metadata tokenizer.ggml.token_type has ", list.size(),
            " entries for ", n, " tokens");
    for (std::size_t i = 0; i < n; ++i) {
      require(list[i].is_number_integer(), "GGUF tokenizer.ggml.token_type[", i,
              "] is not an integer");
      types[i] = list[i].get<int>();
    }
  }

  auto impl = std::make_shared<TokenizerImpl>();
  impl->id_to_token.resize(n);
  impl->special.assign(n, 0);
  std::vector<AddedToken> added;
  for (std::size_t i = 0; i < n; ++i) {
    require(tokens[i].is_string(), "GGUF tokenizer.ggml.tokens[", i, "] is not a string");
    impl->id_to_token[i] = tokens[i].get<std::string>();
    // Later duplicates win, as in llama.cpp.
    impl->token_to_id[impl->id_to_token[i]] = static_cast<int32_t>(i);
    const int type = types[i];
    impl->special[i] = type == kControl || type == kUnknown;
    // llama.cpp looks for these in the text before tokenizing it (parse_special).
    if (type == kControl || type == kUnknown || type == kUserDefined) {
      added.push_back({impl->id_to_token[i], static_cast<int32_t>(i), false, false, false, false,
                       type != kUserDefined});
    }
  }
  impl->raw_added = AddedTokenMatcher(std::move(added));

  impl->bos_id = gguf_token_id(metadata, "tokenizer.ggml.bos_token_id", static_cast<int64_t>(n),
                               "GGUF metadata");
  impl->eos_id = gguf_token_id(metadata, "tokenizer.ggml.eos_token_id", static_cast<int64_t>(n),
                               "GGUF metadata");
  bool add_bos = false;

  if (model == "gpt2") {
    const json* pre_key = find_key(metadata, "tokenizer.ggml.pre");
    require(pre_key == nullptr || pre_key->is_string(),
            "GGUF metadata tokenizer.ggml.pre is not a string");
    const std::string pre = pre_key ? pre_key->get<std::string>() : "default";
    const LlamaCppPre info = llama_cpp_pre(pre);
    add_bos = info.adds_bos;

    const json& merge_list = array_key(metadata, "tokenizer.ggml.merges");
    std::vector<std::pair<std::string, std::string>> merges;
    merges.reserve(merge_list.size());
    for (std::size_t i = 0; i < merge_list.size(); ++i) {
      require(merge_list[i].is_string(), "GGUF tokenizer.ggml.merges[", i, "] is not a string");
      const std::string& text = merge_list[i].get_ref<const std::string&>();
      // Searching from 1 lets the first token itself be a space, as llama.cpp does.
      const std::size_t space = text.find(' ', 1);
      require(space != std::string::npos, "GGUF tokenizer.ggml.merges[", i, "] = '", text,
              "' is not two tokens separated by a space");
      merges.emplace_back(text.substr(0, space), text.substr(space + 1));
    }
    BpeOptions options;
    options.ignore_merges = info.ignore_merges;
    try {
      impl->model = std::make_unique<BpeModel>(impl->token_to_id, merges, options);
    } catch (const Error& e) {
      fail("GGUF tokenizer: ", e.what());
    }
    for (const std::string& pattern : info.patterns) {
      impl->pre_tokenizer.add(PreTokenizer::split(std::make_shared<const Regex>(pattern),
                                                  SplitBehavior::kIsolated, false));
    }
    impl->pre_tokenizer.add(PreTokenizer::byte_level(false, false));
    impl->decoder.add(Decoder::byte_level());
    impl->kind = "byte-level BPE (" + pre + " pre-tokenizer)";
  } else {
    add_bos = true;
    std::vector<float> scores(n, 0.0f);
    if (find_key(metadata, "tokenizer.ggml.scores") != nullptr) {
      const json& list = array_key(metadata, "tokenizer.ggml.scores");
      require(list.size() == n, "GGUF metadata tokenizer.ggml.scores has ", list.size(),
              " entries for ", n, " tokens");
      for (std::size_t i = 0; i < n; ++i) {
        require(list[i].is_number(), "GGUF tokenizer.ggml.scores[", i, "] is not a number");
        scores[i] = list[i].get<float>();
        // Merges are ranked by score; a NaN compares false both ways and breaks the ranking.
        require(std::isfinite(scores[i]), "GGUF tokenizer.ggml.scores[", i, "] = ", scores[i],
                " is not a finite number");
      }
    }
    TokenIndex mergeable;
    std::array<int32_t, 256> byte_ids;
    byte_ids.fill(-1);
    for (std::size_t i = 0; i < n; ++i) {
      const std::string& text = impl->id_to_token[i];
      if (types[i] == kByte) {
        unsigned value = 0;
        if (text.size() == 6 && std::sscanf(text.c_str(), "<0x%2X>", &value) == 1 && value < 256)
          byte_ids[value] = static_cast<int32_t>(i);
      } else if (types[i] != kControl && types[i] != kUnknown) {
        mergeable[text] = static_cast<int32_t>(i);
      }
    }
    std::optional<int32_t> unk = gguf_token_id(metadata, "tokenizer.ggml.unknown_token_id",
                                               static_cast<int64_t>(n), "GGUF metadata");
    impl->model =
        std::make_unique<SpmModel>(std::move(mergeable), std::move(scores), byte_ids, unk);
    const bool space_prefix = bool_key(metadata, "tokenizer.ggml.add_space_prefix").value_or(true);
    const std::string meta_space = "\u2581";
    // llama.cpp puts a space before each text fragment that starts the input or follows a
    // special token, then writes spaces as "▁": the normalizer of Llama-2's tokenizer.json.
    if (space_prefix) impl->normalizer.add(Normalizer::prepend(meta_space));
    impl->normalizer.add(Normalizer::replace(" ", meta_space));
    impl->decoder.add(Decoder::replace(meta_space, " "));
    impl->decoder.add(Decoder::byte_fallback());
    impl->decoder.add(Decoder::fuse());
    if (space_prefix) impl->decoder.add(Decoder::strip(" ", 1, 0));
    impl->kind = "SentencePiece BPE (scores, byte fallback)";
  }

  add_bos = bool_key(metadata, "tokenizer.ggml.add_bos_token").value_or(add_bos);
  const bool add_eos = bool_key(metadata, "tokenizer.ggml.add_eos_token").value_or(false);
  if (add_bos) {
    require(impl->bos_id.has_value(),
            "GGUF metadata asks to add a BOS token but has no tokenizer.ggml.bos_token_id");
    impl->prefix_ids.push_back(*impl->bos_id);
  }
  if (add_eos) {
    require(impl->eos_id.has_value(),
            "GGUF metadata asks to add an EOS token but has no tokenizer.ggml.eos_token_id");
    impl->suffix_ids.push_back(*impl->eos_id);
  }
  impl->chat_template = chat_template_from_gguf(metadata);
  return Tokenizer(std::move(impl));
}

}  // namespace visikv

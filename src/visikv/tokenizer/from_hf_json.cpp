// Tokenizer::from_hf_json: builds a Tokenizer from a Hugging Face tokenizer.json (the format of
// the `tokenizers` library), supporting the constructs byte-level and SentencePiece-style BPE
// models use. Anything else is rejected with an error naming the construct.
#include "visikv/core/error.h"
#include "visikv/core/file_kind.h"
#include "visikv/formats/json_file.h"
#include "visikv/tokenizer/bpe.h"
#include "visikv/tokenizer/chat_template.h"
#include "visikv/tokenizer/tokenizer.h"
#include "visikv/tokenizer/tokenizer_impl.h"

namespace visikv {

namespace {

using nlohmann::json;

// Largest token id accepted, so a corrupt file cannot make us allocate gigabytes.
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;

// Reads the sections of a parsed tokenizer.json. Sequences recurse once per level of JSON
// nesting, which parse_json bounds (kMaxJsonDepth) for every file; nothing else recurses.
class Parser {
 public:
  explicit Parser(std::string source) : source_(std::move(source)) {}

  template <typename... Args>
  [[noreturn]] void error(Args&&... args) const {
    fail("tokenizer.json ", source_, ": ", std::forward<Args>(args)...);
  }

  const json& member(const json& object, const char* key, const char* where) const {
    if (!object.is_object()) error(where, " is not a JSON object");
    const auto it = object.find(key);
    if (it == object.end()) error(where, " has no '", key, "'");
    return *it;
  }
  std::string string_member(const json& object, const char* key, const char* where) const {
    const json& value = member(object, key, where);
    if (!value.is_string()) error(where, ".", key, " is not a string");
    return value.get<std::string>();
  }
  bool bool_or(const json& object, const char* key, bool fallback, const char* where) const {
    const auto it = object.find(key);
    if (it == object.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) error(where, ".", key, " is not a boolean");
    return it->get<bool>();
  }
  std::string string_or(const json& object, const char* key, std::string fallback,
                        const char* where) const {
    const auto it = object.find(key);
    if (it == object.end() || it->is_null()) return fallback;
    if (!it->is_string()) error(where, ".", key, " is not a string");
    return it->get<std::string>();
  }
  std::size_t size_or(const json& object, const char* key, std::size_t fallback,
                      const char* where) const {
    const auto it = object.find(key);
    if (it == object.end() || it->is_null()) return fallback;
    if (!it->is_number_unsigned() && !(it->is_number_integer() && it->get<int64_t>() >= 0))
      error(where, ".", key, " is not a non-negative integer");
    return it->get<std::size_t>();
  }
  int32_t token_id(const json& value, const char* where) const {
    if (!value.is_number_integer()) error(where, " is not an integer token id");
    const auto id = value.get<int64_t>();
    if (id < 0 || id > kMaxTokenId) error(where, " has out-of-range token id ", id);
    return static_cast<int32_t>(id);
  }
  std::string type_of(const json& object, const char* where) const {
    return string_member(object, "type", where);
  }

  // {"String": "..."} or {"Regex": "..."}: a literal or a regex, both as a Regex.
  std::shared_ptr<const Regex> pattern(const json& object, const char* where) const {
    const json& p = member(object, "pattern", where);
    if (p.is_object() && p.contains("String") && p["String"].is_string())
      return std::make_shared<const Regex>(p["String"].get<std::string>(), /*literal=*/true);
    if (p.is_object() && p.contains("Regex") && p["Regex"].is_string())
      return std::make_shared<const Regex>(p["Regex"].get<std::string>());
    error(where, ".pattern is neither {\"String\": ...} nor {\"Regex\": ...}");
  }
  // The literal of a {"String": ...} pattern, if it is one.
  std::optional<std::string> literal_pattern(const json& object, const char* where) const {
    const json& p = member(object, "pattern", where);
    if (p.is_object() && p.contains("String") && p["String"].is_string())
      return p["String"].get<std::string>();
    return std::nullopt;
  }

  void normalizer(const json& spec, Normalizer& out) const {
    if (spec.is_null()) return;
    const std::string type = type_of(spec, "normalizer");
    if (type == "Sequence") {
      const json& list = member(spec, "normalizers", "Sequence normalizer");
      if (!list.is_array()) error("Sequence normalizer's 'normalizers' is not an array");
      for (const json& item : list) normalizer(item, out);
    } else if (type == "Prepend") {
      out.add(Normalizer::prepend(string_member(spec, "prepend", "Prepend normalizer")));
    } else if (type == "Replace") {
      const std::string content = string_member(spec, "content", "Replace normalizer");
      if (auto literal = literal_pattern(spec, "Replace normalizer")) {
        out.add(Normalizer::replace(*literal, content));
      } else {
        out.add(Normalizer::replace_regex(pattern(spec, "Replace normalizer"), content));
      }
    } else if (type == "NFC") {
      out.add(Normalizer::nfc());
    } else if (type == "Strip") {
      out.add(Normalizer::strip(bool_or(spec, "strip_left", true, "Strip normalizer"),
                                bool_or(spec, "strip_right", true, "Strip normalizer")));
    } else {
      error("unsupported normalizer type '", type,
            "' (supported: Sequence, Prepend, Replace, Strip, NFC)");
    }
  }

  SplitBehavior behavior(const json& spec, const char* where, SplitBehavior fallback) const {
    const std::string name = string_or(spec, "behavior", "", where);
    if (name.empty()) return fallback;
    if (name == "Removed") return SplitBehavior::kRemoved;
    if (name == "Isolated") return SplitBehavior::kIsolated;
    if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
    if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
    if (name == "Contiguous") return SplitBehavior::kContiguous;
    error(where, " has unknown split behavior '", name, "'");
  }

  PrependScheme prepend_scheme(const json& spec, const char* where) const {
    if (const auto it = spec.find("prepend_scheme"); it != spec.end() && !it->is_null()) {
      const std::string name = string_member(spec, "prepend_scheme", where);
      if (name == "always") return PrependScheme::kAlways;
      if (name == "first") return PrependScheme::kFirst;
      if (name == "never") return PrependScheme::kNever;
      error(where, " has unknown prepend_scheme '", name, "'");
    }
    // Files older than prepend_scheme say add_prefix_space.
    return bool_or(spec, "add_prefix_space", true, where) ? PrependScheme::kAlways
                                                          : PrependScheme::kNever;
  }

  void pre_tokenizer(const json& spec, PreTokenizer& out, bool& byte_level) const {
    if (spec.is_null()) return;
    const std::string type = type_of(spec, "pre_tokenizer");
    if (type == "Sequence") {
      const json& list = member(spec, "pretokenizers", "Sequence pre_tokenizer");
      if (!list.is_array()) error("Sequence pre_tokenizer's 'pretokenizers' is not an array");
      for (const json& item : list) pre_tokenizer(item, out, byte_level);
    } else if (type == "ByteLevel") {
      byte_level = true;
      out.add(PreTokenizer::byte_level(bool_or(spec, "add_prefix_space", false, "ByteLevel"),
                                       bool_or(spec, "use_regex", true, "ByteLevel")));
    } else if (type == "Split") {
      out.add(PreTokenizer::split(pattern(spec, "Split pre_tokenizer"),
                                  behavior(spec, "Split pre_tokenizer", SplitBehavior::kIsolated),
                                  bool_or(spec, "invert", false, "Split pre_tokenizer")));
    } else if (type == "Digits") {
      out.add(PreTokenizer::digits(bool_or(spec, "individual_digits", false, "Digits")));
    } else if (type == "Metaspace") {
      out.add(PreTokenizer::metaspace(string_or(spec, "replacement", "\u2581", "Metaspace"),
                                      prepend_scheme(spec, "Metaspace pre_tokenizer"),
                                      bool_or(spec, "split", true, "Metaspace")));
    } else if (type == "Whitespace") {
      static const auto words = std::make_shared<const Regex>(R"(\w+|[^\w\s]+)");
      out.add(PreTokenizer::split(words, SplitBehavior::kRemoved, /*invert=*/true));
    } else if (type == "WhitespaceSplit") {
      static const auto spaces = std::make_shared<const Regex>(R"(\s+)");
      out.add(PreTokenizer::split(spaces, SplitBehavior::kRemoved, false));
    } else if (type == "Punctuation") {
      static const auto punctuation =
          std::make_shared<const Regex>(R"([\p{P}\x21-\x2F\x3A-\x40\x5B-\x60\x7B-\x7E])");
      out.add(PreTokenizer::split(punctuation,
                                  behavior(spec, "Punctuation", SplitBehavior::kIsolated), false));
    } else {
      error("unsupported pre_tokenizer type '", type,
            "' (supported: Sequence, ByteLevel, Split, Digits, Metaspace, Whitespace, "
            "WhitespaceSplit, Punctuation)");
    }
  }

  void decoder(const json& spec, Decoder& out) const {
    if (spec.is_null()) return;
    const std::string type = type_of(spec, "decoder");
    if (type == "Sequence") {
      const json& list = member(spec, "decoders", "Sequence decoder");
      if (!list.is_array()) error("Sequence decoder's 'decoders' is not an array");
      for (const json& item : list) decoder(item, out);
    } else if (type == "ByteLevel") {
      out.add(Decoder::byte_level());
    } else if (type == "Replace") {
      const std::string content = string_member(spec, "content", "Replace decoder");
      if (auto literal = literal_pattern(spec, "Replace decoder")) {
        out.add(Decoder::replace(*literal, content));
      } else {
        out.add(Decoder::replace_regex(pattern(spec, "Replace decoder"), content));
      }
    } else if (type == "ByteFallback") {
      out.add(Decoder::byte_fallback());
    } else if (type == "Fuse") {
      out.add(Decoder::fuse());
    } else if (type == "Strip") {
      out.add(Decoder::strip(string_member(spec, "content", "Strip decoder"),
                             size_or(spec, "start", 0, "Strip decoder"),
                             size_or(spec, "stop", 0, "Strip decoder")));
    } else if (type == "Metaspace") {
      out.add(Decoder::metaspace(string_or(spec, "replacement", "\u2581", "Metaspace decoder"),
                                 prepend_scheme(spec, "Metaspace decoder")));
    } else {
      error("unsupported decoder type '", type,
            "' (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)");
    }
  }

  // Ids the post-processor puts around a single sequence.
  void post_processor(const json& spec, std::vector<int32_t>& prefix,
                      std::vector<int32_t>& suffix) const {
    if (spec.is_null()) return;
    const std::string type = type_of(spec, "post_processor");
    if (type == "Sequence") {
      const json& list = member(spec, "processors", "Sequence post_processor");
      if (!list.is_array()) error("Sequence post_processor's 'processors' is not an array");
      for (const json& item : list) post_processor(item, prefix, suffix);
    } else if (type == "ByteLevel") {
      // Only adjusts offsets.
    } else if (type == "TemplateProcessing") {
      const json& single = member(spec, "single", "TemplateProcessing");
      const json& specials = member(spec, "special_tokens", "TemplateProcessing");
      if (!single.is_array()) error("TemplateProcessing.single is not an array");
      std::vector<int32_t> before, after;
      bool seen_sequence = false;
      for (const json& piece : single) {
        if (piece.is_object() && piece.contains("Sequence")) {
          if (seen_sequence) error("TemplateProcessing.single names the sequence twice");
          seen_sequence = true;
          continue;
        }
        const json& special = member(piece, "SpecialToken", "TemplateProcessing.single item");
        const std::string name = string_member(special, "id", "TemplateProcessing SpecialToken");
        if (!specials.is_object() || !specials.contains(name))
          error("TemplateProcessing uses special token '", name,
                "' missing from its special_tokens");
        const json& ids = member(specials[name], "ids", "TemplateProcessing special token");
        if (!ids.is_array())
          error("TemplateProcessing special token '", name, "' ids not an array");
        for (const json& id : ids)
          (seen_sequence ? after : before).push_back(token_id(id, "TemplateProcessing id"));
      }
      if (!seen_sequence) error("TemplateProcessing.single has no $A sequence");
      prefix.insert(prefix.begin(), before.begin(), before.end());
      suffix.insert(suffix.end(), after.begin(), after.end());
    } else if (type == "RobertaProcessing" || type == "BertProcessing") {
      const json& cls = member(spec, "cls", "post_processor");
      const json& sep = member(spec, "sep", "post_processor");
      if (!cls.is_array() || cls.size() != 2 || !sep.is_array() || sep.size() != 2)
        error(type, " cls/sep are not [token, id] pairs");
      prefix.insert(prefix.begin(), token_id(cls[1], "cls id"));
      suffix.push_back(token_id(sep[1], "sep id"));
    } else {
      error("unsupported post_processor type '", type,
            "' (supported: TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, "
            "Sequence)");
    }
  }

 private:
  std::string source_;
};

std::optional<std::string> config_token(const json& config, const char* key) {
  const auto it = config.find(key);
  if (it == config.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return std::nullopt;
}

// BOS/EOS names from a tokenizer_config.json next to the tokenizer.json, when there is one
// (tokenizer.json itself does not say which tokens these are).
struct SpecialNames {
  std::optional<std::string> bos;
  std::optional<std::string> eos;
};

SpecialNames read_special_names(const std::filesystem::path& tokenizer_json) {
  SpecialNames names;
  const auto config_path = tokenizer_json.parent_path() / "tokenizer_config.json";
  if (file_kind(config_path) == FileKind::Missing) return names;
  const json config = read_json_file(config_path);
  require(config.is_object(), "tokenizer_config.json ", config_path, " is not a JSON object");
  names.bos = config_token(config, "bos_token");
  names.eos = config_token(config, "eos_token");
  return names;
}

std::shared_ptr<TokenizerImpl> build(const json& root, const std::string& source,
                                     const SpecialNames& names);

}  // namespace

Tokenizer Tokenizer::from_hf_json(const std::filesystem::path& tokenizer_json) {
  const json parsed = read_json_file(tokenizer_json);
  auto impl = build(parsed, tokenizer_json.string(), read_special_names(tokenizer_json));
  impl->chat_template = chat_template_from_hf_dir(tokenizer_json.parent_path());
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_hf_json_value(const nlohmann::json& root, const std::string& source) {
  return Tokenizer(build(root, source, SpecialNames{}));
}

namespace {

std::shared_ptr<TokenizerImpl> build(const json& root, const std::string& source,
                                     const SpecialNames& names) {
  const Parser p(source);
  try {
    if (!root.is_object()) p.error("the top level is not a JSON object");
    if (!root.contains("model") || root["model"].is_null()) p.error("missing 'model' section");
    const json& model = root["model"];
    if (!model.is_object()) p.error("'model' is not an object");
    const std::string model_type =
        model.contains("type") ? p.string_member(model, "type", "model") : "BPE";
    if (model_type != "BPE")
      p.error("unsupported model type '", model_type, "' (only BPE is supported)");

    auto impl = std::make_shared<TokenizerImpl>();
    TokenIndex model_vocab;
    const json& vocab = p.member(model, "vocab", "model");
    if (!vocab.is_object()) p.error("model.vocab is not an object");
    int32_t max_id = -1;
    for (const auto& [text, id_json] : vocab.items()) {
      const int32_t id = p.token_id(id_json, "model.vocab entry");
      model_vocab[text] = id;
      max_id = std::max(max_id, id);
    }

    std::vector<AddedToken> added;
    if (root.contains("added_tokens") && !root["added_tokens"].is_null()) {
      const json& list = root["added_tokens"];
      if (!list.is_array()) p.error("added_tokens is not an array");
      for (const json& item : list) {
        AddedToken token;
        token.id = p.token_id(p.member(item, "id", "added token"), "added token id");
        token.content = p.string_member(item, "content", "added token");
        token.single_word = p.bool_or(item, "single_word", false, "added token");
        token.lstrip = p.bool_or(item, "lstrip", false, "added token");
        token.rstrip = p.bool_or(item, "rstrip", false, "added token");
        token.normalized = p.bool_or(item, "normalized", false, "added token");
        token.special = p.bool_or(item, "special", false, "added token");
        max_id = std::max(max_id, token.id);
        added.push_back(std::move(token));
      }
    }
    if (max_id < 0) p.error("the vocabulary is empty");

    impl->id_to_token.assign(static_cast<std::size_t>(max_id) + 1, std::string());
    impl->special.assign(impl->id_to_token.size(), 0);
    for (const auto& [text, id] : model_vocab) {
      impl->id_to_token[static_cast<std::size_t>(id)] = text;
      impl->token_to_id[text] = id;
    }
    for (const AddedToken& token : added) {
      impl->id_to_token[static_cast<std::size_t>(token.id)] = token.content;
      impl->token_to_id[token.content] = token.id;
      impl->special[static_cast<std::size_t>(token.id)] = token.special ? 1 : 0;
    }

    // Merges: "left right" strings (older files) or [left, right] pairs.
    std::vector<std::pair<std::string, std::string>> merges;
    if (model.contains("merges") && !model["merges"].is_null()) {
      const json& list = model["merges"];
      if (!list.is_array()) p.error("model.merges is not an array");
      merges.reserve(list.size());
      for (const json& merge : list) {
        if (merge.is_string()) {
          const std::string text = merge.get<std::string>();
          const std::size_t space = text.find(' ');
          if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
            p.error("merge '", text, "' is not two tokens separated by one space");
          merges.emplace_back(text.substr(0, space), text.substr(space + 1));
        } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                   merge[1].is_string()) {
          merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
        } else {
          p.error("merge ", merge.dump(), " is neither \"a b\" nor [\"a\", \"b\"]");
        }
      }
    }

    BpeOptions options;
    options.byte_fallback = p.bool_or(model, "byte_fallback", false, "model");
    options.ignore_merges = p.bool_or(model, "ignore_merges", false, "model");
    options.fuse_unk = p.bool_or(model, "fuse_unk", false, "model");
    options.continuing_subword_prefix =
        p.string_or(model, "continuing_subword_prefix", "", "model");
    options.end_of_word_suffix = p.string_or(model, "end_of_word_suffix", "", "model");
    if (model.contains("dropout") && model["dropout"].is_number() &&
        model["dropout"].get<double>() > 0.0) {
      p.error("BPE dropout is not supported (it makes encoding random)");
    }
    if (const std::string unk = p.string_or(model, "unk_token", "", "model"); !unk.empty()) {
      options.unk_id = find_token(model_vocab, unk);
      if (!options.unk_id) p.error("unk_token '", unk, "' is not in the vocabulary");
    }
    try {
      impl->model = std::make_unique<BpeModel>(std::move(model_vocab), merges, options);
    } catch (const Error& e) {
      p.error(e.what());
    }

    p.normalizer(root.value("normalizer", json()), impl->normalizer);
    // As Hugging Face: "normalized" added tokens are looked for, in their normalized form, in
    // the normalized text; the others in the raw text.
    std::vector<AddedToken> raw_added, normalized_added;
    for (AddedToken& token : added) {
      if (token.normalized) {
        impl->normalizer.normalize(token.content);
        normalized_added.push_back(std::move(token));
      } else {
        raw_added.push_back(std::move(token));
      }
    }
    impl->raw_added = AddedTokenMatcher(std::move(raw_added));
    impl->normalized_added = AddedTokenMatcher(std::move(normalized_added));
    bool byte_level = false;
    p.pre_tokenizer(root.value("pre_tokenizer", json()), impl->pre_tokenizer, byte_level);
    p.decoder(root.value("decoder", json()), impl->decoder);
    p.post_processor(root.value("post_processor", json()), impl->prefix_ids, impl->suffix_ids);
    for (const int32_t id : impl->prefix_ids)
      if (id > max_id) p.error("post_processor adds token id ", id, " beyond the vocabulary");
    for (const int32_t id : impl->suffix_ids)
      if (id > max_id) p.error("post_processor adds token id ", id, " beyond the vocabulary");

    // BOS/EOS: from tokenizer_config.json when it was found, else from the usual token names
    // (tokenizer.json itself does not say which tokens these are).
    const auto named = [&](const std::optional<std::string>& configured,
                           std::initializer_list<const char*> usual) -> std::optional<int32_t> {
      if (configured) return find_token(impl->token_to_id, *configured);
      for (const char* name : usual)
        if (auto id = find_token(impl->token_to_id, name)) return id;
      return std::nullopt;
    };
    impl->bos_id = !impl->prefix_ids.empty()
                       ? std::optional<int32_t>(impl->prefix_ids.front())
                       : named(names.bos, {"<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"});
    impl->eos_id =
        named(names.eos, {"</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "<|im_end|>"});

    const std::string flavour = byte_level              ? "byte-level BPE"
                                : options.byte_fallback ? "BPE with byte fallback"
                                                        : "BPE";
    impl->kind = flavour + " (tokenizer.json)";
    return impl;
  } catch (const nlohmann::json::exception& e) {
    p.error("unexpected structure: ", e.what());
  }
}

}  // namespace

}  // namespace visikv

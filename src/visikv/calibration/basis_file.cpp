#include "visikv/calibration/basis_file.h"

#include <algorithm>
#include <bit>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <type_traits>

#include "visikv/core/error.h"
#include "visikv/core/file_kind.h"
#include "visikv/core/mapped_file.h"
#include "visikv/formats/json_file.h"
#include "visikv/model/model.h"

namespace visikv {

namespace {

static_assert(std::endian::native == std::endian::little, "basis files are little-endian");

constexpr char kMagic[8] = {'V', 'K', 'V', 'H', 'E', 'A', 'D', 'Q'};
constexpr size_t kPreamble = 8 + 4 + 8;
constexpr int64_t kMaxHeaderBytes = int64_t{1} << 24;

struct Fnv1a {
  uint64_t state = 0xcbf29ce484222325ULL;
  void add(std::span<const std::byte> bytes) {
    for (std::byte b : bytes) state = (state ^ static_cast<uint8_t>(b)) * 0x100000001b3ULL;
  }
  void add(const std::string& text) { add(std::as_bytes(std::span(text.data(), text.size()))); }
  std::string hex() const {
    char buffer[17];
    std::snprintf(buffer, sizeof buffer, "%016" PRIx64, state);
    return buffer;
  }
};

// The arrays of a basis (const or not) in file order, with their element counts.
template <typename Basis,
          typename Vector = std::conditional_t<std::is_const_v<Basis>, const std::vector<double>,
                                               std::vector<double>>>
struct ArrayRef {
  const char* name;
  Vector* data;
  std::vector<int64_t> shape;
  // Saturates far above any file size rather than overflow (shapes come from a file's header).
  int64_t count() const {
    int64_t n = 1;
    for (int64_t x : shape)
      if (__builtin_mul_overflow(n, x, &n)) return INT64_MAX / 16;
    return std::min(n, INT64_MAX / 16);
  }
};

// Version 2 adds the key means after the version-1 arrays; version 3 the within-group key spread
// (header field "key_group"); version 4 (full rank only) the query-weighted key PCA, the measured
// group distortions and the Fisher tables (header field "key_window").
template <typename Basis>
std::vector<ArrayRef<Basis>> arrays_of(Basis& b, uint32_t version) {
  const std::vector<int64_t> values = {b.heads(), b.head_dim},
                             vectors = {b.heads(), b.rank, b.head_dim};
  std::vector<ArrayRef<Basis>> out = {{"query_eigenvalues", &b.query_eigenvalues, values},
                                      {"query_vectors", &b.query_vectors, vectors},
                                      {"key_eigenvalues", &b.key_eigenvalues, values},
                                      {"key_vectors", &b.key_vectors, vectors}};
  if (version >= 2) out.push_back({"key_means", &b.key_means, values});
  if (version >= 3) {
    out.push_back({"key_group_eigenvalues", &b.key_group_eigenvalues, values});
    out.push_back({"key_group_vectors", &b.key_group_vectors, vectors});
  }
  if (version >= 4) {
    const std::vector<int64_t> square = {b.heads(), b.head_dim, b.head_dim};
    out.push_back({"weighted_rows", &b.weighted_rows, square});
    out.push_back({"weighted_dual_rows", &b.weighted_dual_rows, square});
    out.push_back({"key_group_distortion",
                   &b.key_group_distortion,
                   {b.heads(), QBasisSpec::kBases, b.head_dim, kQBasisMaxBits}});
    out.push_back(
        {"key_fisher", &b.key_fisher, {b.heads(), QBasisSpec::kBases, b.head_dim, kQBasisWidths}});
  }
  return out;
}

// The oldest version that holds everything `b` has.
uint32_t version_for(const HeadqBasis& b) {
  if (b.key_means.empty()) return 1;
  if (b.key_group == 0) return 2;
  if (b.key_group_distortion.empty() && b.weighted_rows.empty()) return 3;
  return kBasisFormatVersion;
}

}  // namespace

std::string model_fingerprint(const Model& model) {
  const Config& c = model.config();
  Fnv1a config_hash;
  config_hash.add(c.describe());
  config_hash.add(str_cat("|eps ", c.norm_eps, "|act ", static_cast<int>(c.activation), "|bias ",
                          c.qkv_bias, c.out_bias, c.mlp_bias, "|tied ", c.tied_embeddings, "|rope ",
                          static_cast<int>(c.rope_scaling.type), " ", c.rope_scaling.factor, " ",
                          c.rope_freq_factors.size(), "|scale ", c.attention_scale, "|max ",
                          c.max_positions));
  Fnv1a weight_hash;
  const Weights& w = model.weights();
  const auto add_tensor = [&](const TensorRef& t, size_t limit) {
    weight_hash.add(t.name);
    weight_hash.add(t.data.first(std::min(limit, t.data.size())));
  };
  constexpr size_t kAll = SIZE_MAX, kMiB = size_t{1} << 20;
  add_tensor(w.token_embedding, kMiB);
  if (!w.layers.empty()) {
    add_tensor(w.layers.front().q.weight, kAll);
    add_tensor(w.layers.front().k.weight, kAll);
    add_tensor(w.layers.back().k.weight, kAll);
  }
  return config_hash.hex() + "-" + weight_hash.hex();
}

void save_headq_basis(const HeadqBasis& b, const std::filesystem::path& path) {
  b.check_sizes();
  // A basis is written as the oldest version that holds it, which older builds read.
  const uint32_t version = version_for(b);
  nlohmann::json arrays = nlohmann::json::array();
  for (const auto& a : arrays_of(b, version))
    arrays.push_back({{"name", a.name}, {"shape", a.shape}});
  nlohmann::json header = {{"format", "visikv-headq-basis"},
                           {"version", version},
                           {"fingerprint", b.fingerprint},
                           {"model", b.model},
                           {"text", b.text},
                           {"tokens", b.tokens},
                           {"window", b.window},
                           {"layers", b.layers},
                           {"kv_heads", b.kv_heads},
                           {"head_dim", b.head_dim},
                           {"rank", b.rank},
                           {"dtype", "f64"},
                           {"arrays", arrays}};
  if (version >= 3) header["key_group"] = b.key_group;
  if (version >= 4) header["key_window"] = b.key_window;
  const std::string text = header.dump();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  require(out.good(), "cannot write HeadQ basis file ", path.string());
  const uint64_t length = text.size();
  out.write(kMagic, sizeof kMagic);
  out.write(reinterpret_cast<const char*>(&version), sizeof version);
  out.write(reinterpret_cast<const char*>(&length), sizeof length);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& a : arrays_of(b, version))
    out.write(reinterpret_cast<const char*>(a.data->data()),
              static_cast<std::streamsize>(a.data->size() * sizeof(double)));
  out.close();
  require(out.good(), "cannot write HeadQ basis file ", path.string());
}

HeadqBasis load_headq_basis(const std::filesystem::path& path) {
  const std::string where = str_cat("HeadQ basis file ", path.string());
  require(file_kind(path) == FileKind::Regular, where, ": no such file");
  const MappedFile file(path);
  const std::span<const std::byte> bytes = file.bytes();
  require(bytes.size() >= kPreamble && std::memcmp(bytes.data(), kMagic, sizeof kMagic) == 0, where,
          ": not a basis file (bad magic)");
  uint32_t version;
  uint64_t length;
  std::memcpy(&version, bytes.data() + 8, sizeof version);
  std::memcpy(&length, bytes.data() + 12, sizeof length);
  require(version >= 1 && version <= kBasisFormatVersion, where, ": format version ", version,
          ", this build reads versions 1 to ", kBasisFormatVersion);
  require(length <= static_cast<uint64_t>(kMaxHeaderBytes) && length <= bytes.size() - kPreamble,
          where, ": header length ", length, " runs past the end of the file");
  const nlohmann::json header =
      parse_json(std::string_view(reinterpret_cast<const char*>(bytes.data() + kPreamble),
                                  static_cast<size_t>(length)),
                 where + " header");
  HeadqBasis b;
  try {
    require(header.at("format") == "visikv-headq-basis", where, ": unknown format ",
            header.at("format").dump());
    require(header.at("dtype") == "f64", where, ": unsupported dtype ", header.at("dtype").dump());
    b.fingerprint = header.at("fingerprint").get<std::string>();
    b.model = header.at("model").get<std::string>();
    b.text = header.at("text").get<std::string>();
    b.tokens = header.at("tokens").get<int64_t>();
    b.window = header.at("window").get<int64_t>();
    b.layers = header.at("layers").get<int64_t>();
    b.kv_heads = header.at("kv_heads").get<int64_t>();
    b.head_dim = header.at("head_dim").get<int64_t>();
    b.rank = header.at("rank").get<int64_t>();
    if (version >= 3) b.key_group = header.at("key_group").get<int64_t>();
    if (version >= 4) b.key_window = header.at("key_window").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": bad header field: ", e.what());
  }
  constexpr int64_t kLimit = int64_t{1} << 20;
  require(b.layers > 0 && b.layers < kLimit && b.kv_heads > 0 && b.kv_heads < kLimit &&
              b.head_dim > 0 && b.head_dim < 1 << 16 && b.rank > 0 && b.rank <= b.head_dim,
          where, ": bad shape (", b.layers, " layers, ", b.kv_heads, " kv heads, head_dim ",
          b.head_dim, ", rank ", b.rank, ")");
  require(version < 3 || (b.key_group > 0 && b.key_group < kLimit), where, ": bad key group size ",
          b.key_group);
  require(b.key_window >= 0 && b.key_window < kLimit, where, ": bad key window ", b.key_window);
  size_t offset = kPreamble + static_cast<size_t>(length);
  for (const auto& a : arrays_of(b, version)) {
    const size_t size = static_cast<size_t>(a.count()) * sizeof(double);
    require(size <= bytes.size() - offset, where, ": array ", a.name, " (", a.count(),
            " numbers) runs past the end of the file");
    a.data->resize(static_cast<size_t>(a.count()));
    std::memcpy(a.data->data(), bytes.data() + offset, size);
    offset += size;
  }
  require(offset == bytes.size(), where, ": ", bytes.size() - offset,
          " unexpected bytes after the arrays");
  b.check_sizes();
  return b;
}

void check_basis_for_model(const HeadqBasis& basis, const Model& model, int64_t min_rank,
                           const std::string& where) {
  const std::string fingerprint = model_fingerprint(model);
  require(basis.fingerprint == fingerprint, where, " was calibrated on another model (fingerprint ",
          basis.fingerprint, ", from ", basis.model, "); ", model.source(), " has fingerprint ",
          fingerprint, ": run `visikv calibrate` for this model");
  const Config& c = model.config();
  require(basis.layers == c.layers && basis.kv_heads == c.kv_heads && basis.head_dim == c.head_dim,
          where, ": shape ", basis.layers, " layers x ", basis.kv_heads, " kv heads x head_dim ",
          basis.head_dim, " does not match the model's ", c.layers, " x ", c.kv_heads, " x ",
          c.head_dim);
  require(basis.rank >= min_rank, where, " holds rank ", basis.rank, " bases; rank ", min_rank,
          " is needed (calibrate with --rank ", min_rank, " or more)");
}

HeadqBasis load_headq_basis(const std::filesystem::path& path, const Model& model,
                            int64_t min_rank) {
  HeadqBasis basis = load_headq_basis(path);
  check_basis_for_model(basis, model, min_rank, str_cat("HeadQ basis file ", path.string()));
  return basis;
}

}  // namespace visikv

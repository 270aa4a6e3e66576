#include "visikv/eval/key_perturbation.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "visikv/core/error.h"
#include "visikv/core/random.h"
#include "visikv/core/spec_fields.h"
#include "visikv/calibration/headq_basis.h"
#include "visikv/kv/headq.h"

namespace visikv {

namespace {

constexpr double kMaxAmplitude = 1e6;

std::string format_amplitude(double a) {
  char buffer[32];
  const auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, a);
  return std::string(buffer, ec == std::errc() ? end : buffer);
}

}  // namespace

std::string AnalyzeKeySpec::text() const {
  switch (kind) {
    case Kind::Codec:
      return codec.text();
    case Kind::NullSpace:
      return "null:a" + format_amplitude(amplitude);
    case Kind::SpanMoved:
      return str_cat("span:", target == Target::QuerySpan ? "query" : "null", ":", codec.text());
  }
  return "";
}

bool AnalyzeKeySpec::needs_basis() const {
  if (kind != Kind::Codec) return true;
  return codec.headq && codec.headq->basis != HeadqSpec::Basis::Random;
}

int64_t AnalyzeKeySpec::needed_rank(const HeadqBasis& basis, double energy) const {
  int64_t rank =
      codec.headq && codec.headq->basis != HeadqSpec::Basis::Random ? codec.headq->rank : 0;
  if (kind != Kind::Codec)
    for (int64_t i = 0; i < basis.heads(); ++i)
      rank = std::max(
          rank, query_span_rank(
                    std::span(basis.query_eigenvalues).subspan(i * basis.head_dim, basis.head_dim),
                    energy));
  return rank;
}

AnalyzeKeySpec parse_analyze_key_spec(std::string_view text) {
  const std::string where = str_cat("key spec '", text, "'");
  AnalyzeKeySpec spec;
  if (text == "null" || text.starts_with("null:")) {
    spec.kind = AnalyzeKeySpec::Kind::NullSpace;
    const std::vector<std::string_view> fields = split_fields(text);
    require(fields.size() <= 2, where, ": expected null[:a<A>]");
    if (fields.size() == 2) {
      const std::string_view f = fields[1];
      require(f.size() > 1 && f[0] == 'a', where,
              ": expected a<A> (the perturbation length "
              "relative to the key), got '",
              f, "'");
      double a = 0;
      const auto [end, ec] = std::from_chars(f.data() + 1, f.data() + f.size(), a);
      require(ec == std::errc() && end == f.data() + f.size() && std::isfinite(a) && a > 0 &&
                  a <= kMaxAmplitude,
              where, ": amplitude '", f.substr(1), "' must be a positive number up to 1e6");
      spec.amplitude = a;
    }
    return spec;
  }
  if (text.starts_with("span:")) {
    spec.kind = AnalyzeKeySpec::Kind::SpanMoved;
    const std::string_view rest = text.substr(5);
    const size_t colon = rest.find(':');
    const std::string_view target = rest.substr(0, colon);
    require(target == "query" || target == "null", where,
            ": expected span:query:<codec> or span:null:<codec>");
    require(colon != std::string_view::npos && colon + 1 < rest.size(), where,
            ": the codec whose error is moved is missing");
    spec.target =
        target == "query" ? AnalyzeKeySpec::Target::QuerySpan : AnalyzeKeySpec::Target::NullSpace;
    spec.codec = parse_codec_spec(rest.substr(colon + 1));
    return spec;
  }
  spec.codec = parse_codec_spec(text);
  return spec;
}

int64_t query_span_rank(std::span<const double> eigenvalues, double energy) {
  require(energy > 0 && energy <= 1, "query-span energy ", energy, " must be in (0, 1]");
  double total = 0;
  for (double x : eigenvalues) total += std::max(0.0, x);
  if (total <= 0) return 0;
  double sum = 0;
  for (size_t i = 0; i < eigenvalues.size(); ++i) {
    sum += std::max(0.0, eigenvalues[i]);
    if (sum >= energy * total) return static_cast<int64_t>(i + 1);
  }
  return static_cast<int64_t>(eigenvalues.size());
}

std::vector<double> project_span(std::span<const double> rows, std::span<const double> x,
                                 bool complement) {
  const size_t d = x.size();
  require(d > 0 && rows.size() % d == 0, "project_span: rows of ", rows.size(),
          " numbers are not vectors of ", d);
  std::vector<double> projection(d, 0.0);
  for (size_t r = 0; r < rows.size() / d; ++r) {
    const std::span<const double> u = rows.subspan(r * d, d);
    double dot = 0;
    for (size_t c = 0; c < d; ++c) dot += u[c] * x[c];
    for (size_t c = 0; c < d; ++c) projection[c] += dot * u[c];
  }
  if (complement)
    for (size_t c = 0; c < d; ++c) projection[c] = x[c] - projection[c];
  return projection;
}

std::vector<double> random_unit_in_span(std::span<const double> rows, int64_t dim, bool complement,
                                        uint64_t seed) {
  const int64_t m = static_cast<int64_t>(rows.size()) / dim;
  if ((complement && m >= dim) || (!complement && m == 0))
    return std::vector<double>(static_cast<size_t>(dim), 0.0);
  // A random unit vector, projected and renormalised, is uniform on the subspace's sphere.
  // Retried with the next seed in the (measure-zero) case that it has no part in the subspace.
  for (uint64_t attempt = 0;; ++attempt) {
    std::vector<double> v =
        project_span(rows, random_orthonormal_rows(1, dim, seed + attempt), complement);
    double norm = 0;
    for (double x : v) norm += x * x;
    norm = std::sqrt(norm);
    if (norm > 1e-6) {
      for (double& x : v) x /= norm;
      return v;
    }
  }
}

uint64_t key_perturbation_seed(int64_t layer, int64_t kv_head, int64_t position) {
  uint64_t state = 0x6e75'11'5ace'0000ULL ^ (static_cast<uint64_t>(layer) << 40) ^
                   (static_cast<uint64_t>(kv_head) << 28) ^ static_cast<uint64_t>(position);
  return splitmix64(state);
}

std::vector<float> perturbed_keys(const AnalyzeKeySpec& spec, std::span<const float> keys,
                                  std::span<const float> base_errors, int64_t kv_heads,
                                  int64_t head_dim, int64_t layer, const HeadqBasis& basis,
                                  double energy, std::vector<int64_t>* span_ranks) {
  require(spec.kind != AnalyzeKeySpec::Kind::Codec, "perturbed_keys: '", spec.text(),
          "' is a cache codec, not a control");
  const int64_t d = head_dim;
  require(keys.size() % (kv_heads * d) == 0, "perturbed_keys: keys are not {tokens, ", kv_heads,
          ", ", d, "}");
  require(spec.kind != AnalyzeKeySpec::Kind::SpanMoved || base_errors.size() == keys.size(),
          "perturbed_keys: base errors do not match the keys");
  require(basis.kv_heads == kv_heads && basis.head_dim == d && layer >= 0 && layer < basis.layers,
          "perturbed_keys: the basis does not fit layer ", layer, " (", kv_heads, " kv heads x ", d,
          ")");
  const int64_t tokens = static_cast<int64_t>(keys.size()) / (kv_heads * d);
  std::vector<float> out(keys.begin(), keys.end());
  if (span_ranks) span_ranks->assign(static_cast<size_t>(kv_heads), 0);
  for (int64_t h = 0; h < kv_heads; ++h) {
    const int64_t index = layer * kv_heads + h;
    const int64_t m =
        query_span_rank(std::span(basis.query_eigenvalues).subspan(index * d, d), energy);
    require(m <= basis.rank, "key spec '", spec.text(), "': the query span of layer ", layer,
            " kv head ", h, " needs ", m, " eigenvectors to hold ", energy,
            " of the query energy, but the basis holds ", basis.rank,
            " per head (calibrate with --rank ", d, ")");
    const bool complement = spec.kind == AnalyzeKeySpec::Kind::NullSpace ||
                            spec.target == AnalyzeKeySpec::Target::NullSpace;
    // A head whose span is the whole space keeps its least visible direction as the complement,
    // so that every key is perturbed (and the moved error keeps its length).
    const int64_t used = complement ? std::min(m, d - 1) : m;
    if (span_ranks) (*span_ranks)[static_cast<size_t>(h)] = used;
    const std::span<const double> rows = basis.query_rows(layer, h).first(used * d);
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t at = (t * kv_heads + h) * d;
      double length = 0;
      const std::span<const float> source = spec.kind == AnalyzeKeySpec::Kind::NullSpace
                                                ? keys.subspan(at, d)
                                                : base_errors.subspan(at, d);
      for (float x : source) length += double(x) * double(x);
      length = std::sqrt(length);
      if (spec.kind == AnalyzeKeySpec::Kind::NullSpace) length *= spec.amplitude;
      const std::vector<double> direction =
          random_unit_in_span(rows, d, complement, key_perturbation_seed(layer, h, t));
      // The null-space control adds p_j; the moved error is an error e_j, so k̂_j = k_j - e_j.
      const double sign = spec.kind == AnalyzeKeySpec::Kind::NullSpace ? 1.0 : -1.0;
      for (int64_t c = 0; c < d; ++c)
        out[at + c] = static_cast<float>(double(keys[at + c]) + sign * length * direction[c]);
    }
  }
  return out;
}

}  // namespace visikv

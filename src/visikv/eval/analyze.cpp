#include "visikv/eval/analyze.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>

#include "visikv/attention/attention.h"
#include "visikv/calibration/headq_basis.h"
#include "visikv/core/error.h"
#include "visikv/eval/attention_metrics.h"
#include "visikv/eval/context_limit.h"
#include "visikv/eval/kv_grid.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/kv/headq.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"

namespace visikv {

namespace {

// Copies each query head's query into its slot of {layers, tokens, heads, head_dim}; each event
// writes its own slot, so worker threads need no lock.
class QueryRecorder final : public AttentionObserver {
 public:
  explicit QueryRecorder(AttentionTrace& trace) : trace_(trace) {}
  void observe(const AttentionEvent& e) override {
    const AttentionTrace& t = trace_;
    if (e.position < 0 || e.position >= t.tokens || e.layer < 0 || e.layer >= t.layers ||
        e.head < 0 || e.head >= t.heads || static_cast<int64_t>(e.query.size()) != t.head_dim)
      return;
    std::copy(e.query.begin(), e.query.end(),
              trace_.queries.begin() +
                  ((e.layer * t.tokens + e.position) * t.heads + e.head) * t.head_dim);
  }

 private:
  AttentionTrace& trace_;
};

CodecSpec f32_spec() { return parse_codec_spec("f32"); }

// Sums over the queries of one cell, turned into means at the end.
struct CellSums {
  double key_mse = 0, fisher = 0, kl = 0, entropy = 0, value_error = 0, value_only_error = 0,
         a2 = 0;
  int64_t queries = 0, flips = 0;
  std::vector<EntropyBinCount> bins;
};

size_t entropy_bin(const std::vector<double>& edges, double entropy) {
  return static_cast<size_t>(std::upper_bound(edges.begin(), edges.end(), entropy) - edges.begin());
}

struct LayerRun {
  std::vector<CellSums> cells;      // per query head
  std::vector<int64_t> span_ranks;  // controls: per KV head
};

// One (key spec, layer) of the analysis: see analyze.h for what is measured.
LayerRun run_layer(const AttentionTrace& trace, const AnalyzeKeySpec& spec,
                   const CodecSpec& value_codec, bool value_metrics, const AnalyzeOptions& options,
                   int64_t layer) {
  const int64_t n = trace.tokens, d = trace.head_dim, kv_heads = trace.kv_heads,
                group = trace.group(), row = kv_heads * d;
  const CacheShape shape{trace.layers, kv_heads, d};
  const std::span<const float> keys = trace.layer_keys(layer), values = trace.layer_values(layer);
  LayerRun run;

  // What the key store receives: the model's keys for a codec, the perturbed keys (stored in
  // f32) for a control.
  const CodecSpec key_codec = spec.kind == AnalyzeKeySpec::Kind::Codec ? spec.codec : f32_spec();
  std::vector<float> input_keys(keys.begin(), keys.end());
  std::vector<float> stored(static_cast<size_t>(d));
  if (spec.kind != AnalyzeKeySpec::Kind::Codec) {
    std::vector<float> base_errors;
    if (spec.kind == AnalyzeKeySpec::Kind::SpanMoved) {
      CodecCache base(shape, spec.codec, f32_spec(), 0, 32, options.basis);
      for (int64_t t = 0; t < n; ++t)
        base.append(layer, keys.subspan(t * row, row), values.subspan(t * row, row), 1);
      base_errors.resize(keys.size());
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < kv_heads; ++h) {
          base.stored_key(layer, h, t, stored);
          for (int64_t c = 0; c < d; ++c)
            base_errors[(t * kv_heads + h) * d + c] = keys[(t * kv_heads + h) * d + c] - stored[c];
        }
    }
    input_keys = perturbed_keys(spec, keys, base_errors, kv_heads, d, layer, *options.basis,
                                options.null_energy, &run.span_ranks);
  }

  // Errors of each stored key and value: right after it is written ("first") and once every
  // token is written ("final"). A token's stored form changes at most once, when it leaves the
  // fp16 window and is quantized (quantized_tokens says which are), so the error a query at t
  // sees is final for the first quantized_tokens(t + 1) positions and first for the rest.
  auto error_table = [&] { return std::vector<double>(static_cast<size_t>(n * kv_heads), 0.0); };
  std::vector<double> key_first = error_table(), key_final = error_table(),
                      value_first = error_table(), value_final = error_table();
  auto record_errors = [&](const CodecCache& cache, int64_t t, std::vector<double>& key_errors,
                           std::vector<double>& value_errors) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      const size_t at = static_cast<size_t>(t * kv_heads + h);
      cache.stored_key(layer, h, t, stored);
      key_errors[at] = squared_error(keys.subspan(at * d, d), stored);
      if (value_metrics) {
        cache.stored_value(layer, h, t, stored);
        value_errors[at] = squared_error(values.subspan(at * d, d), stored);
      }
    }
  };
  {
    CodecCache final_state(shape, key_codec, value_codec, 0, 32, options.basis);
    for (int64_t t = 0; t < n; ++t)
      final_state.append(layer, std::span(input_keys).subspan(t * row, row),
                         values.subspan(t * row, row), 1);
    for (int64_t t = 0; t < n; ++t) record_errors(final_state, t, key_final, value_final);
  }

  CodecCache reference(shape, f32_spec(), f32_spec(), 0, 32, nullptr);
  reference.append(layer, keys, values, n);
  CodecCache cache(shape, key_codec, value_codec, 0, 32, options.basis);

  const size_t bins = options.entropy_edges.size() + 1;
  run.cells.assign(static_cast<size_t>(trace.heads), CellSums{});
  for (CellSums& c : run.cells) c.bins.assign(bins, EntropyBinCount{});
  std::vector<float> raw, raw_hat, weights_float, weights_hat_float, out_hat, out_value_only;
  std::vector<double> s, s_hat;
  for (int64_t t = 0; t < n; ++t) {
    cache.append(layer, std::span(input_keys).subspan(t * row, row), values.subspan(t * row, row),
                 1);
    record_errors(cache, t, key_first, value_first);
    const PositionSet visible = visible_positions(t, trace.windows.at(layer));
    const int64_t lo = visible.begin(), count = visible.size();
    const int64_t key_quantized = quantized_tokens(key_codec, t + 1),
                  value_quantized = quantized_tokens(value_codec, t + 1);
    auto seen = [&](const std::vector<double>& first, const std::vector<double>& final_errors,
                    int64_t quantized, int64_t j, int64_t h) {
      const size_t at = static_cast<size_t>(j * kv_heads + h);
      return j < quantized ? final_errors[at] : first[at];
    };
    raw.resize(static_cast<size_t>(group * count));
    raw_hat.resize(raw.size());
    for (int64_t h = 0; h < kv_heads; ++h) {
      const std::span<const float> queries = trace.group_queries(layer, t, h);
      reference.score(layer, h, queries, visible, raw);
      cache.score(layer, h, queries, visible, raw_hat);
      double key_mse = 0;
      for (int64_t j = lo; j < lo + count; ++j)
        key_mse += seen(key_first, key_final, key_quantized, j, h);
      key_mse /= double(count * d);
      if (value_metrics) {
        weights_float.resize(raw.size());
        weights_hat_float.resize(raw.size());
        out_hat.assign(static_cast<size_t>(group * d), 0.0f);
        out_value_only.assign(out_hat.size(), 0.0f);
      }
      std::vector<std::vector<double>> exact_weights(static_cast<size_t>(group));
      for (int64_t g = 0; g < group; ++g) {
        s.resize(static_cast<size_t>(count));
        s_hat.resize(s.size());
        for (int64_t j = 0; j < count; ++j) {
          s[j] = trace.scale * double(raw[g * count + j]);
          s_hat[j] = trace.scale * double(raw_hat[g * count + j]);
        }
        const AttentionComparison cmp = compare_attention<double>(s, s_hat);
        CellSums& cell = run.cells[static_cast<size_t>(h * group + g)];
        cell.queries += 1;
        cell.key_mse += key_mse;
        cell.fisher += cmp.fisher;
        cell.kl += cmp.kl;
        cell.entropy += cmp.entropy;
        cell.flips += cmp.route_flip ? 1 : 0;
        EntropyBinCount& bin = cell.bins[entropy_bin(options.entropy_edges, cmp.entropy)];
        bin.queries += 1;
        bin.flips += cmp.route_flip ? 1 : 0;
        if (value_metrics) {
          exact_weights[g] = softmax_weights<double>(s);
          const std::vector<double> approx = softmax_weights<double>(s_hat);
          for (int64_t j = 0; j < count; ++j) {
            weights_float[g * count + j] = static_cast<float>(exact_weights[g][j]);
            weights_hat_float[g * count + j] = static_cast<float>(approx[j]);
          }
        }
      }
      if (!value_metrics) continue;
      cache.accumulate(layer, h, weights_hat_float, visible, out_hat);
      cache.accumulate(layer, h, weights_float, visible, out_value_only);
      std::vector<double> value_errors(static_cast<size_t>(count));
      for (int64_t j = 0; j < count; ++j)
        value_errors[j] = seen(value_first, value_final, value_quantized, lo + j, h);
      // The exact readout from the model's values, in double.
      std::vector<float> exact_values(static_cast<size_t>(count * d));
      for (int64_t j = 0; j < count; ++j)
        std::copy_n(values.begin() + ((lo + j) * kv_heads + h) * d, d,
                    exact_values.begin() + j * d);
      for (int64_t g = 0; g < group; ++g) {
        const std::vector<double> exact = weighted_sum(exact_weights[g], exact_values);
        double error = 0, value_only = 0;
        for (int64_t c = 0; c < d; ++c) {
          const double a = exact[c] - double(out_hat[g * d + c]);
          const double b = exact[c] - double(out_value_only[g * d + c]);
          error += a * a;
          value_only += b * b;
        }
        CellSums& cell = run.cells[static_cast<size_t>(h * group + g)];
        cell.value_error += error;
        cell.value_only_error += value_only;
        cell.a2 += a2_surrogate(exact_weights[g], value_errors);
      }
    }
  }
  return run;
}

}  // namespace

std::span<const float> AttentionTrace::layer_keys(int64_t layer) const {
  const int64_t size = tokens * kv_heads * head_dim;
  return std::span(keys).subspan(layer * size, size);
}

std::span<const float> AttentionTrace::layer_values(int64_t layer) const {
  const int64_t size = tokens * kv_heads * head_dim;
  return std::span(values).subspan(layer * size, size);
}

std::span<const float> AttentionTrace::group_queries(int64_t layer, int64_t t,
                                                     int64_t kv_head) const {
  return std::span(queries).subspan(((layer * tokens + t) * heads + kv_head * group()) * head_dim,
                                    group() * head_dim);
}

std::vector<AnalyzeKeySpec> default_analyze_key_specs(int64_t head_dim, bool with_basis) {
  KvGridSpec grid;
  grid.ranks = {std::min<int64_t>(8, head_dim)};
  const std::vector<KvGridRow> rows = kv_grid_rows(head_dim, grid);
  auto key_codec = [&](const std::string& name) {
    for (const KvGridRow& r : rows)
      if (r.name == name) return r.key_codec.text();
    fail("analyze: the eval kv grid has no row ", name);
  };
  const std::string int2_tok = key_codec("k2-tok");
  std::vector<std::string> specs = {"f16", key_codec("k4-tok"), key_codec("k3-tok"), int2_tok,
                                    key_codec("k2-chan")};
  if ((head_dim & (head_dim - 1)) == 0)
    for (const char* name : {"k2-tok", "k3-tok"}) {
      CodecSpec rotated = parse_codec_spec(key_codec(name));
      rotated.hadamard = true;
      specs.push_back(rotated.text());
    }
  if (with_basis) {
    specs.push_back(key_codec(str_cat("k2-tok+hq-r", grid.ranks.front())));
    specs.push_back("null:a1");
    specs.push_back("span:query:" + int2_tok);
    specs.push_back("span:null:" + int2_tok);
  }
  std::vector<AnalyzeKeySpec> parsed;
  for (const std::string& text : specs) parsed.push_back(parse_analyze_key_spec(text));
  return parsed;
}

AttentionTrace trace_attention(const Model& model, std::span<const int32_t> tokens) {
  const Config& c = model.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  require(n >= 2, "analyze needs at least 2 tokens, got ", n);
  check_context(c, n, str_cat("analyze: ", n, " tokens"));
  AttentionTrace trace;
  trace.layers = c.layers;
  trace.heads = c.heads;
  trace.kv_heads = c.kv_heads;
  trace.head_dim = c.head_dim;
  trace.tokens = n;
  trace.scale = c.score_scale();
  for (int64_t l = 0; l < c.layers; ++l) trace.windows.push_back(c.layer_window(l));
  trace.queries.assign(static_cast<size_t>(c.layers * n * c.heads * c.head_dim), 0.0f);
  Decoder decoder(model);
  const CacheShape shape = decoder.cache_shape();
  CodecCache cache(shape, f32_spec(), f32_spec(), n, 32, nullptr);
  QueryRecorder recorder(trace);
  decoder.forward(tokens, cache, LogitRows::Last, [](int64_t, int64_t, std::span<const float>) {},
                  {.observer = &recorder});
  const int64_t d = c.head_dim;
  trace.keys.resize(static_cast<size_t>(c.layers * n * c.kv_heads * d));
  trace.values.resize(trace.keys.size());
  for (int64_t l = 0; l < c.layers; ++l)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < c.kv_heads; ++h) {
        const size_t at = static_cast<size_t>(((l * n + t) * c.kv_heads + h) * d);
        cache.stored_key(l, h, t, std::span(trace.keys).subspan(at, d));
        cache.stored_value(l, h, t, std::span(trace.values).subspan(at, d));
      }
  return trace;
}

void check_analyze_options(const AttentionTrace& trace, const AnalyzeOptions& options) {
  require(!options.key_specs.empty(), "analyze: no key spec given");
  require(trace.tokens >= 1 && trace.layers >= 1 && trace.kv_heads >= 1 &&
              trace.heads % trace.kv_heads == 0 &&
              static_cast<int64_t>(trace.windows.size()) == trace.layers,
          "analyze: empty or malformed attention trace");
  for (size_t i = 0; i < options.entropy_edges.size(); ++i)
    require(std::isfinite(options.entropy_edges[i]) && options.entropy_edges[i] > 0 &&
                (i == 0 || options.entropy_edges[i] > options.entropy_edges[i - 1]),
            "--entropy-bins: edges must be positive and increasing (nats), got ",
            options.entropy_edges[i]);
  const bool value_metrics = options.value_codec.has_value();
  const CodecSpec value_codec = value_metrics ? options.value_codec->codec : f32_spec();
  const CacheShape shape{trace.layers, trace.kv_heads, trace.head_dim};
  for (const AnalyzeKeySpec& spec : options.key_specs) {
    const std::string text = spec.text();
    if (spec.needs_basis()) {
      require(options.basis != nullptr, "key spec '", text,
              "' needs a calibrated HeadQ basis (pass --basis FILE from `visikv calibrate`, or "
              "let analyze calibrate)");
      const int64_t rank = spec.needed_rank(*options.basis, options.null_energy);
      require(rank <= options.basis->rank, "key spec '", text, "' needs ", rank,
              " basis vectors per head but the basis holds ", options.basis->rank,
              " (calibrate with --rank ", trace.head_dim, ")");
    }
    // Builds each cache once, empty, so that a spec that does not fit fails before any work.
    const CodecSpec key_codec =
        spec.kind == AnalyzeKeySpec::Kind::NullSpace ? f32_spec() : spec.codec;
    CodecCache(shape, key_codec, value_codec, 0, 32, options.basis);
  }
}

void correlate_cells(AnalyzeResult& result) {
  std::vector<double> mse, fisher, kl;
  for (const AnalyzeCell& c : result.cells) {
    mse.push_back(c.key_mse);
    fisher.push_back(c.fisher);
    kl.push_back(c.kl);
  }
  result.spearman_mse = spearman_correlation(mse, kl);
  result.spearman_fisher = spearman_correlation(fisher, kl);
  result.pearson_mse = pearson_correlation(mse, kl);
  result.pearson_fisher = pearson_correlation(fisher, kl);
}

AnalyzeResult analyze_attention(const AttentionTrace& trace, const AnalyzeOptions& options,
                                const AnalyzeProgress& progress) {
  check_analyze_options(trace, options);
  const bool value_metrics = options.value_codec.has_value();
  const CodecSpec value_codec = value_metrics ? options.value_codec->codec : f32_spec();
  const std::vector<AnalyzeKeySpec>& specs = options.key_specs;

  const int64_t layers = trace.layers, jobs = static_cast<int64_t>(specs.size()) * layers;
  std::vector<LayerRun> runs(static_cast<size_t>(jobs));
  std::exception_ptr error;
  std::mutex mutex;
  std::atomic<int64_t> done{0};
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t job = 0; job < jobs; ++job) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (error) continue;
    }
    try {
      runs[static_cast<size_t>(job)] = run_layer(trace, specs[static_cast<size_t>(job / layers)],
                                                 value_codec, value_metrics, options, job % layers);
      const int64_t finished = ++done;
      if (progress) {
        std::lock_guard<std::mutex> lock(mutex);
        progress(finished, jobs);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);

  AnalyzeResult result;
  const size_t bins = options.entropy_edges.size() + 1;
  for (size_t i = 0; i < specs.size(); ++i) {
    CodecSummary summary;
    summary.key_codec = specs[i].text();
    if (specs[i].kind == AnalyzeKeySpec::Kind::Codec)
      summary.bits_per_key = codec_bits(specs[i].codec, trace.head_dim).bits_per_vector;
    summary.bins.assign(bins, EntropyBinCount{});
    double value_error = 0, value_only = 0, a2 = 0;
    for (int64_t l = 0; l < layers; ++l) {
      const LayerRun& run = runs[i * layers + l];
      for (int64_t r : run.span_ranks) {
        summary.span_rank_min = std::min(summary.span_rank_min.value_or(r), r);
        summary.span_rank_max = std::max(summary.span_rank_max.value_or(r), r);
      }
      for (int64_t head = 0; head < trace.heads; ++head) {
        const CellSums& sums = run.cells[static_cast<size_t>(head)];
        const double q = double(std::max<int64_t>(sums.queries, 1));
        AnalyzeCell cell;
        cell.key_codec = summary.key_codec;
        cell.layer = l;
        cell.head = head;
        cell.kv_head = head / trace.group();
        cell.queries = sums.queries;
        cell.key_mse = sums.key_mse / q;
        cell.fisher = sums.fisher / q;
        cell.kl = sums.kl / q;
        cell.entropy = sums.entropy / q;
        cell.flip_rate = double(sums.flips) / q;
        cell.bins = sums.bins;
        if (value_metrics) {
          cell.value_error = sums.value_error / q;
          cell.value_only_error = sums.value_only_error / q;
          cell.a2_surrogate = sums.a2 / q;
          value_error += *cell.value_error;
          value_only += *cell.value_only_error;
          a2 += *cell.a2_surrogate;
        }
        summary.cells += 1;
        summary.queries += sums.queries;
        summary.mse_mean += cell.key_mse;
        summary.fisher_mean += cell.fisher;
        summary.kl_mean += cell.kl;
        summary.flip_rate += cell.flip_rate;
        for (size_t b = 0; b < bins; ++b) {
          summary.bins[b].queries += sums.bins[b].queries;
          summary.bins[b].flips += sums.bins[b].flips;
        }
        result.cells.push_back(std::move(cell));
      }
    }
    const double cells = double(std::max<int64_t>(summary.cells, 1));
    summary.mse_mean /= cells;
    summary.fisher_mean /= cells;
    summary.kl_mean /= cells;
    summary.flip_rate /= cells;
    if (value_metrics) {
      summary.value_error_mean = value_error / cells;
      summary.value_only_error_mean = value_only / cells;
      summary.a2_surrogate_mean = a2 / cells;
    }
    result.codecs.push_back(std::move(summary));
  }

  correlate_cells(result);
  return result;
}

}  // namespace visikv

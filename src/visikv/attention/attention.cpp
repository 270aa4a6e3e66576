#include "visikv/attention/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "visikv/attention/support_dense.h"
#include "visikv/core/error.h"
#include "visikv/core/vec.h"

namespace visikv {

PositionSet visible_positions(int64_t position, int64_t sliding_window) {
  const int64_t first =
      sliding_window > 0 ? std::max<int64_t>(0, position - sliding_window + 1) : 0;
  return PositionSet::range(first, position + 1);
}

double softmax_in_place(std::span<float> values) {
  if (values.empty()) return -INFINITY;
  const float max = vec::max_value(values);
  const float sum = vec::exp_shifted(values, max);
  const float inverse = 1.0f / sum;
  for (float& v : values) v *= inverse;
  return static_cast<double>(max) + std::log(static_cast<double>(sum));
}

namespace {

// A query that reads more positions than this reads them in parts of this many: each part gives
// its own softmax pieces (largest score, sum of exponentials, unnormalised value sum) and the
// parts are merged in order (log-sum-exp). In decode the parts of every KV head are shared out
// among the threads, so that long contexts use every core even with fewer KV heads than threads;
// prefill computes the same parts one after the other, so that decode equals prefill bit for bit
// and neither depends on the thread count. The size is fixed (not derived from the thread count)
// for the same reason, and large enough that contexts up to it keep the one-pass softmax.
constexpr int64_t kPartPositions = 2048;

int64_t part_count(int64_t positions) {
  return positions <= kPartPositions ? 1 : (positions + kPartPositions - 1) / kPartPositions;
}

// One (token, KV head, slot) of attend(): the query heads that share one choice of support.
struct Item {
  int64_t token = 0, kv = 0, first_head = 0;
};

// The softmax pieces of one part for `group` query heads: max[g], sum[g] = Σ exp(s - max[g]) and
// out[g * d ..] = Σ exp(s - max[g]) · v over the part's positions.
struct PartSums {
  float* max;
  float* sum;
  float* out;
};

// Part `p` of a support of `n` positions. `given`: the raw scores of the whole support ({group, n},
// from the choice) or null to score the part here.
void attend_part(const KVCache& cache, int64_t layer, int64_t kv, std::span<const float> queries,
                 int64_t group, int64_t d, const PositionSet& positions, int64_t p,
                 const float* given, double scale, std::vector<float>& scores, PartSums sums) {
  const int64_t n = positions.size(), first = p * kPartPositions;
  const int64_t count = std::min(kPartPositions, n - first);
  const PositionSet part = positions.slice(first, count);
  scores.resize(static_cast<size_t>(group * count));
  if (given != nullptr) {
    for (int64_t g = 0; g < group; ++g)
      std::copy_n(given + g * n + first, count, scores.begin() + g * count);
  } else {
    cache.score(layer, kv, queries, part, scores);
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * count;
    for (int64_t i = 0; i < count; ++i) s[i] = static_cast<float>(s[i] * scale);
    const std::span<float> part_scores(s, static_cast<size_t>(count));
    const float max = vec::max_value(part_scores);
    sums.max[g] = max;
    sums.sum[g] = vec::exp_shifted(part_scores, max);
  }
  std::fill(sums.out, sums.out + group * d, 0.0f);
  cache.accumulate(layer, kv, scores, part, {sums.out, static_cast<size_t>(group * d)});
}

// out[g * d ..] += the parts' value sums, each weighted exp(max_p - M) / Z with M the largest
// max and Z = Σ_p sum_p exp(max_p - M), taken in part order. Pieces are {parts, group} and
// {parts, group * d}.
void merge_parts(int64_t parts, int64_t group, int64_t d, const float* maxes, const float* sums,
                 const float* outs, float* out) {
  for (int64_t g = 0; g < group; ++g) {
    float max = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) max = std::max(max, maxes[p * group + g]);
    float total = 0.0f;
    for (int64_t p = 0; p < parts; ++p)
      total += sums[p * group + g] * std::exp(maxes[p * group + g] - max);
    for (int64_t p = 0; p < parts; ++p) {
      const float weight = std::exp(maxes[p * group + g] - max) / total;
      const float* part_out = outs + p * group * d + g * d;
      for (int64_t c = 0; c < d; ++c) out[g * d + c] += weight * part_out[c];
    }
  }
}

// What a decode call keeps between its phases: every slot's scratch, chosen support and pieces.
struct DecodeScratch {
  std::vector<SupportScratch> item_scratch;
  std::vector<std::optional<ChosenSupport>> chosen;
  std::vector<float> pieces;
};

}  // namespace

void attend(const KVCache& cache, int64_t layer, std::span<const float> queries, int64_t tokens,
            int64_t first_position, const AttentionSpec& spec, Support& support,
            std::span<float> out, std::span<SparseQueryStats> stats, AttentionObserver* observer) {
  const CacheShape& shape = cache.shape();
  const int64_t d = spec.head_dim, kv_heads = shape.kv_heads;
  require(d == shape.head_dim && spec.heads > 0 && spec.heads % kv_heads == 0, "attention: shape (",
          spec.heads, " heads of ", d, ") does not match the cache (", kv_heads, " KV heads of ",
          shape.head_dim, ")");
  const int64_t group = spec.heads / kv_heads, row = spec.heads * d;
  require(tokens >= 0 && first_position >= 0 && first_position + tokens <= cache.length(layer),
          "attention: the cache holds ", cache.length(layer), " tokens of layer ", layer,
          ", queries reach position ", first_position + tokens - 1);
  require(static_cast<int64_t>(queries.size()) >= tokens * row &&
              static_cast<int64_t>(out.size()) >= tokens * row,
          "attention: queries and out need ", tokens, " x ", row, " values");
  require(stats.empty() || static_cast<int64_t>(stats.size()) >= tokens * spec.heads,
          "attention: stats need ", tokens * spec.heads, " entries, got ", stats.size());
  support.prepare(cache, spec);
  const int64_t slot_group = support.heads_per_choice(group);  // query heads sharing one choice
  const int64_t slots = group / slot_group;
  const bool per_head = slot_group != group;
  std::fill(out.begin(), out.begin() + tokens * row, 0.0f);
  const int64_t items = tokens * kv_heads * slots;
  auto item_of = [&](int64_t i) {
    Item item;
    item.token = i / (kv_heads * slots);
    item.kv = i / slots % kv_heads;
    item.first_head = item.kv * group + i % slots * slot_group;
    return item;
  };
  auto slot_queries = [&](const Item& item) {
    return queries.subspan(item.token * row + item.first_head * d, slot_group * d);
  };
  auto slot_out = [&](const Item& item) {
    return out.subspan(item.token * row + item.first_head * d, slot_group * d);
  };
  // Chooses an item's support into `scratch`, records its statistics.
  auto choose = [&](const Item& item, SupportScratch& scratch) {
    SparseQueryStats st;
    scratch.deltas.assign(static_cast<size_t>(slot_group), NAN);
    const int64_t position = first_position + item.token;
    const ChosenSupport chosen = support.choose(
        {cache, layer, item.kv, per_head ? item.first_head : item.kv, position, slot_queries(item),
         slot_group, spec.sliding_window, spec.scale, tokens == 1, item.token == tokens - 1},
        scratch, st);
    st.support = chosen.positions.size();
    if (!stats.empty()) {
      for (int64_t g = 0; g < slot_group; ++g) {
        SparseQueryStats& s = stats[item.token * spec.heads + item.first_head + g];
        s = st;
        s.delta = scratch.deltas[g];
      }
    }
    return chosen;
  };
  // One pass over a support of at most kPartPositions positions (or any, with an observer, which
  // sees the whole softmax): score, scale, softmax, observe, accumulate into `out`.
  auto attend_whole = [&](const Item& item, const ChosenSupport& chosen, SupportScratch& scratch,
                          std::vector<float>& logits) {
    const PositionSet& positions = chosen.positions;
    const int64_t n = positions.size();
    if (!chosen.scored) {
      scratch.scores.resize(static_cast<size_t>(slot_group * n));
      cache.score(layer, item.kv, slot_queries(item), positions, scratch.scores);
    }
    for (int64_t g = 0; g < slot_group; ++g) {
      std::span<float> s(scratch.scores.data() + g * n, static_cast<size_t>(n));
      for (float& v : s) v = static_cast<float>(v * spec.scale);
      if (observer == nullptr) {
        softmax_in_place(s);
      } else {
        logits.assign(s.begin(), s.end());
        softmax_in_place(s);
        observer->observe({layer, item.first_head + g, item.kv, first_position + item.token,
                           slot_queries(item).subspan(g * d, d), positions, logits, s});
      }
    }
    cache.accumulate(layer, item.kv, scratch.scores, positions, slot_out(item));
  };
  auto split = [&](int64_t n) { return observer == nullptr && part_count(n) > 1; };
  const int64_t piece_floats = slot_group * (d + 2);  // max, sum and value sums of one part
  auto part_sums = [&](float* pieces, int64_t parts, int64_t p) {
    return PartSums{pieces + p * slot_group, pieces + (parts + p) * slot_group,
                    pieces + 2 * parts * slot_group + p * slot_group * d};
  };
  auto merge = [&](const Item& item, const float* pieces, int64_t parts) {
    merge_parts(parts, slot_group, d, pieces, pieces + parts * slot_group,
                pieces + 2 * parts * slot_group, slot_out(item).data());
  };

  // A support is a subset of the visible positions, so below kPartPositions of them no query
  // splits, and decode keeps its single parallel loop (one barrier instead of four).
  const int64_t visible = visible_positions(first_position, spec.sliding_window).size();
  if (tokens == 1 && observer == nullptr && visible > kPartPositions) {
    // Decode: choose every slot's support, then share all parts of all slots among the threads,
    // then merge (three loops, so three barriers: every slot gets room for the most parts any
    // visible set can need, so no serial step sizes the pieces between them). Scratch and
    // pieces are kept between calls (nothing allocated once grown), by the calling thread; the
    // workers reach them through these references, since a thread_local named inside the
    // parallel region would be each worker's own.
    thread_local DecodeScratch kept;
    std::vector<SupportScratch>& item_scratch = kept.item_scratch;
    std::vector<std::optional<ChosenSupport>>& chosen = kept.chosen;
    std::vector<float>& pieces = kept.pieces;
    const int64_t max_parts = part_count(visible), slot_floats = max_parts * piece_floats;
    if (static_cast<int64_t>(item_scratch.size()) < items) item_scratch.resize(items);
    chosen.assign(static_cast<size_t>(items), std::nullopt);
    if (static_cast<int64_t>(pieces.size()) < items * slot_floats)
      pieces.resize(static_cast<size_t>(items * slot_floats));
    auto parts_of = [&](int64_t i) {
      const int64_t n = chosen[i]->positions.size();
      return split(n) ? part_count(n) : 1;
    };
#pragma omp parallel
    {
      std::vector<float> logits;
      thread_local std::vector<float> part_scores;
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < items; ++i) chosen[i] = choose(item_of(i), item_scratch[i]);
        // Unit u is part u % max_parts of slot u / max_parts; slots with fewer parts skip the rest.
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < items * max_parts; ++u) {
        const int64_t i = u / max_parts, p = u % max_parts, parts = parts_of(i);
        if (p >= parts) continue;
        const Item item = item_of(i);
        if (parts == 1)
          attend_whole(item, *chosen[i], item_scratch[i], logits);
        else
          attend_part(cache, layer, item.kv, slot_queries(item), slot_group, d,
                      chosen[i]->positions, p,
                      chosen[i]->scored ? item_scratch[i].scores.data() : nullptr, spec.scale,
                      part_scores, part_sums(pieces.data() + i * slot_floats, parts, p));
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < items; ++i) {
        const int64_t parts = parts_of(i);
        if (parts > 1) merge(item_of(i), pieces.data() + i * slot_floats, parts);
      }
    }
    return;
  }

#pragma omp parallel
  {
    SupportScratch scratch;
    std::vector<float> logits, part_scores, item_pieces;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) {
      const Item item = item_of(i);
      const ChosenSupport chosen = choose(item, scratch);
      const int64_t n = chosen.positions.size();
      if (!split(n)) {
        attend_whole(item, chosen, scratch, logits);
        continue;
      }
      const int64_t parts = part_count(n);
      item_pieces.resize(static_cast<size_t>(parts * piece_floats));
      for (int64_t p = 0; p < parts; ++p)
        attend_part(cache, layer, item.kv, slot_queries(item), slot_group, d, chosen.positions, p,
                    chosen.scored ? scratch.scores.data() : nullptr, spec.scale, part_scores,
                    part_sums(item_pieces.data(), parts, p));
      merge(item, item_pieces.data(), parts);
    }
  }
}

void attend_causal(const KVCache& cache, int64_t layer, std::span<const float> queries,
                   int64_t tokens, int64_t first_position, const AttentionSpec& spec,
                   std::span<float> out, AttentionObserver* observer) {
  DenseSupport dense;
  attend(cache, layer, queries, tokens, first_position, spec, dense, out, {}, observer);
}

}  // namespace visikv

#include "visikv/attention/attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <optional>
#include <thread>
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

// The scores of one query times the attention scale (a double, rounded back to float once).
void scale_scores(std::span<float> scores, double scale) {
  for (float& v : scores) v = static_cast<float>(v * scale);
}

// A part's softmax pieces of one query's scaled scores: their largest value, and each score
// replaced by exp(score - max), whose sum is returned.
float part_exponentials(std::span<float> scores, float& max) {
  max = vec::max_value(scores);
  return vec::exp_shifted(scores, max);
}

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
    const std::span<float> part_scores(scores.data() + g * count, static_cast<size_t>(count));
    scale_scores(part_scores, scale);
    sums.sum[g] = part_exponentials(part_scores, sums.max[g]);
  }
  std::fill(sums.out, sums.out + group * d, 0.0f);
  cache.accumulate(layer, kv, scores, part, {sums.out, static_cast<size_t>(group * d)});
}

// The pieces of `parts` parts of `group` queries, laid out {parts, group} maxima, {parts, group}
// sums, {parts, group, d} value sums: those of part p.
PartSums part_sums(float* pieces, int64_t parts, int64_t group, int64_t d, int64_t p) {
  return PartSums{pieces + p * group, pieces + (parts + p) * group,
                  pieces + 2 * parts * group + p * group * d};
}
int64_t piece_floats(int64_t parts, int64_t group, int64_t d) { return parts * group * (d + 2); }

// out[g * d ..] += the parts' value sums (`pieces`, laid out as part_sums says), each weighted
// exp(max_p - M) / Z with M the largest max and Z = Σ_p sum_p exp(max_p - M), taken in part
// order.
void merge_parts(const float* pieces, int64_t parts, int64_t group, int64_t d, float* out) {
  const float* maxes = pieces;
  const float* sums = pieces + parts * group;
  const float* outs = pieces + 2 * parts * group;
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

// Query rows (tokens times the query heads of a KV head) per prefill tile: enough that a row read
// from the cache serves many queries, few enough that a part's scores ({queries, 2048}) stay in
// L2.
constexpr int64_t kTileQueries = 64;

// What a thread keeps for prefill tiles (grown, never shrunk, so nothing is allocated once a
// prefill is under way).
struct TileScratch {
  std::vector<float> queries, shared, head, rest, row, pieces, outs, weights;
};

// Prefill of `count` consecutive tokens of one KV head whose supports are ranges (dense
// attention): token t reads sizes[t] positions from begins[t], and either every range starts at
// one position (sizes then non-decreasing) or every range is one part long (at most 2048
// positions, as under a sliding window). Every part (positions [p · 2048, ..) of a range, as
// attend_part cuts them) is scored and accumulated for all the tokens that reach it in one call
// over the positions they all read, and per token for the few before and after those, so each
// cached row is read once per tile rather than once per token. Each score is the cache's score of
// that row, each softmax runs over the query's whole part in one span, and each output takes the
// rows in order, so the bits are those of attend_whole / attend_part and decode. queries and out:
// the whole call's ({tokens, heads, d}, `row` apart), from this tile's first token on.
void attend_tile(const KVCache& cache, int64_t layer, int64_t kv, const float* queries, int64_t row,
                 int64_t group, int64_t d, std::span<const int64_t> begins,
                 std::span<const int64_t> sizes, double scale, float* out, TileScratch& s) {
  const int64_t count = static_cast<int64_t>(sizes.size()), q_floats = group * d;
  int64_t max_parts = 1;
  for (const int64_t n : sizes) max_parts = std::max(max_parts, part_count(n));
  s.queries.resize(static_cast<size_t>(count * q_floats));
  for (int64_t t = 0; t < count; ++t)
    std::copy_n(queries + t * row + kv * q_floats, q_floats, s.queries.begin() + t * q_floats);
  const int64_t token_pieces = piece_floats(max_parts, group, d);
  if (max_parts > 1) s.pieces.resize(static_cast<size_t>(count * token_pieces));
  const auto slot_out = [&](int64_t t) { return out + t * row + kv * q_floats; };

  for (int64_t p = 0; p < max_parts; ++p) {
    int64_t first = 0;  // the first token that reaches part p (sizes are non-decreasing here)
    while (part_count(sizes[first]) <= p) ++first;
    const int64_t reaching = count - first, queries_here = reaching * group;
    // Token t's part is [lo(t), hi(t)); the tokens share [shared_lo, shared_hi) and read the
    // head [lo(t), shared_lo) and the tail [shared_hi, hi(t)) alone.
    const auto lo = [&](int64_t t) { return begins[t] + p * kPartPositions; };
    const auto hi = [&](int64_t t) {
      return lo(t) + std::min(kPartPositions, sizes[t] - p * kPartPositions);
    };
    int64_t shared_lo = lo(first), shared_hi = hi(first);
    for (int64_t t = first; t < count; ++t)
      shared_lo = std::max(shared_lo, lo(t)), shared_hi = std::min(shared_hi, hi(t));
    if (shared_hi < shared_lo) shared_hi = shared_lo = hi(count - 1);  // nothing shared
    const int64_t shared = shared_hi - shared_lo;
    const auto head = [&](int64_t t) { return std::min(shared_lo, hi(t)) - lo(t); };
    const auto tail = [&](int64_t t) { return std::max<int64_t>(0, hi(t) - shared_hi); };
    int64_t head_stride = 0, tail_stride = 0;
    for (int64_t t = first; t < count; ++t)
      head_stride = std::max(head_stride, head(t)), tail_stride = std::max(tail_stride, tail(t));
    const auto head_positions = [&](int64_t t) {
      return PositionSet::range(lo(t), lo(t) + head(t));
    };
    const auto tail_positions = [&](int64_t t) {
      return PositionSet::range(hi(t) - tail(t), hi(t));
    };
    const PositionSet shared_positions = PositionSet::range(shared_lo, shared_hi);
    const float* token_queries = s.queries.data() + first * q_floats;

    // Scores: the shared positions for every query at once, each token's head and tail alone
    // ({group, length} each, kept in rows `stride` apart).
    s.shared.resize(static_cast<size_t>(queries_here * shared));
    if (shared > 0)
      cache.score(layer, kv, {token_queries, static_cast<size_t>(queries_here * d)},
                  shared_positions, s.shared);
    s.head.resize(static_cast<size_t>(queries_here * head_stride));
    s.rest.resize(static_cast<size_t>(queries_here * tail_stride));
    const auto score_alone = [&](int64_t t, const PositionSet& positions, std::vector<float>& to,
                                 int64_t stride) {
      const int64_t length = positions.size();
      if (length == 0) return;
      s.weights.resize(static_cast<size_t>(group * length));
      cache.score(layer, kv, {s.queries.data() + t * q_floats, static_cast<size_t>(q_floats)},
                  positions, s.weights);
      for (int64_t g = 0; g < group; ++g)
        std::copy_n(s.weights.begin() + g * length, length,
                    to.begin() + ((t - first) * group + g) * stride);
    };
    for (int64_t t = first; t < count; ++t) {
      score_alone(t, head_positions(t), s.head, head_stride);
      score_alone(t, tail_positions(t), s.rest, tail_stride);
    }
    // Softmax (one part: normalized weights; several: exponentials and pieces), each query's
    // scores gathered into one span in position order.
    for (int64_t t = first; t < count; ++t) {
      const int64_t size = hi(t) - lo(t), parts = part_count(sizes[t]);
      const int64_t heads_here = head(t), tails_here = tail(t);
      const int64_t shared_here = size - heads_here - tails_here;  // shared, or 0
      for (int64_t g = 0; g < group; ++g) {
        const int64_t q = (t - first) * group + g;
        float* head_row = s.head.data() + q * head_stride;
        float* shared_row = s.shared.data() + q * shared;
        float* tail_row = s.rest.data() + q * tail_stride;
        s.row.resize(static_cast<size_t>(size));
        float* whole = s.row.data();
        std::copy_n(head_row, heads_here, whole);
        std::copy_n(shared_row, shared_here, whole + heads_here);
        std::copy_n(tail_row, tails_here, whole + heads_here + shared_here);
        const std::span<float> scores(whole, static_cast<size_t>(size));
        scale_scores(scores, scale);
        if (parts == 1) {
          softmax_in_place(scores);
        } else {
          const PartSums sums = part_sums(s.pieces.data() + t * token_pieces, parts, group, d, p);
          sums.sum[g] = part_exponentials(scores, sums.max[g]);
        }
        std::copy_n(whole, heads_here, head_row);
        std::copy_n(whole + heads_here, shared_here, shared_row);
        std::copy_n(whole + heads_here + shared_here, tails_here, tail_row);
      }
    }
    // Value sums in position order (head, shared, tail) into each token's output (one part) or
    // its part's piece (several).
    const auto target = [&](int64_t t) {
      const int64_t parts = part_count(sizes[t]);
      return parts == 1 ? slot_out(t)
                        : part_sums(s.pieces.data() + t * token_pieces, parts, group, d, p).out;
    };
    const auto accumulate_alone = [&](int64_t t, const PositionSet& positions,
                                      const std::vector<float>& from, int64_t stride) {
      const int64_t length = positions.size();
      if (length == 0) return;
      s.weights.resize(static_cast<size_t>(group * length));
      for (int64_t g = 0; g < group; ++g)
        std::copy_n(from.begin() + ((t - first) * group + g) * stride, length,
                    s.weights.begin() + g * length);
      cache.accumulate(layer, kv, s.weights, positions, {target(t), static_cast<size_t>(q_floats)});
    };
    s.outs.resize(static_cast<size_t>(queries_here * d));
    for (int64_t t = first; t < count; ++t) {
      float* to = target(t);
      if (part_count(sizes[t]) > 1) std::fill(to, to + q_floats, 0.0f);
      accumulate_alone(t, head_positions(t), s.head, head_stride);
      std::copy_n(to, q_floats, s.outs.begin() + (t - first) * q_floats);
    }
    if (shared > 0) cache.accumulate(layer, kv, s.shared, shared_positions, s.outs);
    for (int64_t t = first; t < count; ++t) {
      std::copy_n(s.outs.begin() + (t - first) * q_floats, q_floats, target(t));
      accumulate_alone(t, tail_positions(t), s.rest, tail_stride);
    }
  }
  for (int64_t t = 0; t < count; ++t) {
    const int64_t parts = part_count(sizes[t]);
    if (parts == 1) continue;
    merge_parts(s.pieces.data() + t * token_pieces, parts, group, d, slot_out(t));
  }
}

// What a decode call keeps between its phases: every slot's scratch, chosen support and pieces.
struct DecodeScratch {
  std::vector<SupportScratch> item_scratch;
  std::vector<SparseQueryStats> item_stats;
  std::vector<std::optional<ChosenSupport>> chosen;
  std::vector<float> pieces;
  std::vector<int64_t> firsts;                   // first ticket per phase and slot
  std::unique_ptr<std::atomic<int64_t>[]> done;  // units finished per phase and slot
  int64_t done_size = 0;
};

// A hint to the core that this thread is spinning (fewer wasted cycles and memory-order flushes).
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until `counter` reaches `target` (another thread's units finishing); after a while yields
// the core, in case the thread it waits for shares it.
void wait_for(const std::atomic<int64_t>& counter, int64_t target) {
  for (int64_t spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 4096)
      spin_pause();
    else
      std::this_thread::yield();
  }
}

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
  auto query_of = [&](const Item& item) {
    return SupportQuery{cache,
                        layer,
                        item.kv,
                        per_head ? item.first_head : item.kv,
                        first_position + item.token,
                        slot_queries(item),
                        slot_group,
                        spec.sliding_window,
                        spec.scale,
                        tokens == 1,
                        item.token == tokens - 1};
  };
  // Records an item's statistics once its support is chosen.
  auto record = [&](const Item& item, const ChosenSupport& chosen, SparseQueryStats st,
                    const SupportScratch& scratch) {
    st.support = chosen.positions.size();
    if (stats.empty()) return;
    for (int64_t g = 0; g < slot_group; ++g) {
      SparseQueryStats& s = stats[item.token * spec.heads + item.first_head + g];
      s = st;
      s.delta = scratch.deltas[g];
    }
  };
  // Chooses an item's support into `scratch`, records its statistics.
  auto choose = [&](const Item& item, SupportScratch& scratch) {
    SparseQueryStats st;
    scratch.deltas.assign(static_cast<size_t>(slot_group), NAN);
    const ChosenSupport chosen = support.choose(query_of(item), scratch, st);
    record(item, chosen, st, scratch);
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
      scale_scores(s, spec.scale);
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
  auto merge = [&](const Item& item, const float* pieces, int64_t parts) {
    merge_parts(pieces, parts, slot_group, d, slot_out(item).data());
  };

  // A support is a subset of the visible positions, so below kPartPositions of them no query
  // splits, and decode keeps its single parallel loop (one barrier instead of four).
  const int64_t visible = visible_positions(first_position, spec.sliding_window).size();
  if (tokens == 1 && observer == nullptr && visible > kPartPositions) {
    // Decode: every slot's choice (in its steps, when the rule has them), then its support's
    // parts, then their merge, as units handed out in that order to whichever thread is free
    // (a ticket counter); a unit waits only for the units of its own slot's previous phase, so
    // one slot's serial phases (a cut, a merge) overlap other slots' parts instead of every
    // thread meeting at a barrier after each phase (with three KV heads on two threads, one of
    // them waited for a third of every serial phase). No deadlock: a unit waits only on units
    // handed out before it. Each unit computes what it would in order on one thread, so the bits
    // do not depend on the thread count. Every slot gets as many units per phase as it can need
    // (Support::most_choice_units, and the most parts any visible set can need); those past the
    // slot's own count do nothing. Scratch and pieces are kept between calls (nothing allocated
    // once grown), by the calling thread; the workers reach them through these references, since
    // a thread_local named inside the parallel region would be each worker's own.
    thread_local DecodeScratch kept;
    std::vector<SupportScratch>& item_scratch = kept.item_scratch;
    std::vector<std::optional<ChosenSupport>>& chosen = kept.chosen;
    std::vector<float>& pieces = kept.pieces;
    const int64_t max_parts = part_count(visible),
                  slot_floats = piece_floats(max_parts, slot_group, d);
    if (static_cast<int64_t>(item_scratch.size()) < items) item_scratch.resize(items);
    chosen.assign(static_cast<size_t>(items), std::nullopt);
    if (static_cast<int64_t>(pieces.size()) < items * slot_floats)
      pieces.resize(static_cast<size_t>(items * slot_floats));
    auto parts_of = [&](int64_t i) {
      const int64_t n = chosen[i]->positions.size();
      return split(n) ? part_count(n) : 1;
    };
    std::vector<SparseQueryStats>& item_stats = kept.item_stats;
    item_stats.assign(static_cast<size_t>(items), SparseQueryStats{});
    // Phases: the choice's steps, finish_choice(), the parts, the merge. firsts[ph * items + i]:
    // the first ticket of slot i's units in phase ph (phase by phase, slot by slot).
    const int steps = support.choice_steps();
    const int64_t finish_phase = steps, attend_phase = steps + 1, merge_phase = steps + 2,
                  phases = steps + 3;
    std::vector<int64_t>& firsts = kept.firsts;
    firsts.assign(static_cast<size_t>(phases * items + 1), 0);
    for (int64_t ph = 0; ph < phases; ++ph)
      for (int64_t i = 0; i < items; ++i) {
        const int64_t units =
            ph < steps ? support.most_choice_units(static_cast<int>(ph), query_of(item_of(i)))
            : ph == attend_phase ? max_parts
                                 : 1;
        firsts[ph * items + i + 1] = firsts[ph * items + i] + units;
      }
    const int64_t tickets = firsts.back();
    if (kept.done_size < phases * items) {
      kept.done = std::make_unique<std::atomic<int64_t>[]>(static_cast<size_t>(phases * items));
      kept.done_size = phases * items;
    }
    std::atomic<int64_t>* done = kept.done.get();  // units finished per phase and slot
    for (int64_t k = 0; k < phases * items; ++k) done[k].store(0, std::memory_order_relaxed);
    std::atomic<int64_t> next_ticket{0};
#pragma omp parallel
    {
      std::vector<float> logits;
      thread_local std::vector<float> part_scores;
      for (int64_t t = next_ticket.fetch_add(1, std::memory_order_relaxed); t < tickets;
           t = next_ticket.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t k = std::upper_bound(firsts.begin(), firsts.end(), t) - firsts.begin() - 1;
        const int64_t ph = k / items, i = k % items, unit = t - firsts[k];
        if (ph > 0) wait_for(done[k - items], firsts[k - items + 1] - firsts[k - items]);
        const Item item = item_of(i);
        if (ph < steps) {
          if (unit < support.choice_units(static_cast<int>(ph), query_of(item), item_scratch[i]))
            support.run_choice_unit(static_cast<int>(ph), unit, query_of(item), item_scratch[i],
                                    item_stats[i]);
        } else if (ph == finish_phase) {
          item_scratch[i].deltas.assign(static_cast<size_t>(slot_group), NAN);
          chosen[i] = support.finish_choice(query_of(item), item_scratch[i], item_stats[i]);
          record(item, *chosen[i], item_stats[i], item_scratch[i]);
        } else if (ph == attend_phase) {
          const int64_t parts = parts_of(i);
          if (parts == 1 && unit == 0)
            attend_whole(item, *chosen[i], item_scratch[i], logits);
          else if (unit < parts && parts > 1)
            attend_part(cache, layer, item.kv, slot_queries(item), slot_group, d,
                        chosen[i]->positions, unit,
                        chosen[i]->scored ? item_scratch[i].scores.data() : nullptr, spec.scale,
                        part_scores,
                        part_sums(pieces.data() + i * slot_floats, parts, slot_group, d, unit));
        } else if (ph == merge_phase) {
          const int64_t parts = parts_of(i);
          if (parts > 1) merge(item, pieces.data() + i * slot_floats, parts);
        }
        done[k].fetch_add(1, std::memory_order_release);
      }
    }
    return;
  }

  if (tokens > 1 && observer == nullptr && !per_head && support.chooses_visible_ranges()) {
    // Prefill of dense attention in tiles of consecutive tokens per KV head (attend_tile), the
    // latest tokens (the longest supports) first so that the threads finish together.
    const int64_t tile_tokens = std::max<int64_t>(1, kTileQueries / group);
    const int64_t tiles = (tokens + tile_tokens - 1) / tile_tokens;
#pragma omp parallel
    {
      SupportScratch scratch;
      thread_local TileScratch tile;  // kept by each worker across calls: grown, never shrunk
      std::vector<int64_t> begins, sizes;
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < tiles * kv_heads; ++i) {
        const int64_t kv = i % kv_heads, first = (tiles - 1 - i / kv_heads) * tile_tokens;
        const int64_t last = std::min(tokens, first + tile_tokens);
        // Runs of tokens attend_tile takes together: ranges from one start (the whole tile
        // without a sliding window), or ranges of one part each (a sliding window within 2048).
        int64_t run_first = first;
        bool one_begin = true, one_part = true;
        begins.clear();
        sizes.clear();
        for (int64_t t = first; t <= last; ++t) {
          PositionSet positions = PositionSet::range(0, 0);
          if (t < last) {
            const ChosenSupport chosen = choose({t, kv, kv * group}, scratch);
            require(chosen.positions.is_range() && !chosen.scored,
                    "attention: a support that chooses visible ranges chose otherwise");
            positions = chosen.positions;
            one_begin = one_begin && (begins.empty() || positions.begin() == begins.front());
            one_part = one_part && positions.size() <= kPartPositions;
          }
          if (t == last || !(one_begin || one_part)) {
            attend_tile(cache, layer, kv, queries.data() + run_first * row, row, group, d, begins,
                        sizes, spec.scale, out.data() + run_first * row, tile);
            begins.clear();
            sizes.clear();
            run_first = t;
            one_begin = true;
            one_part = positions.size() <= kPartPositions;
          }
          if (t < last) {
            begins.push_back(positions.begin());
            sizes.push_back(positions.size());
          }
        }
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
      item_pieces.resize(static_cast<size_t>(piece_floats(parts, slot_group, d)));
      for (int64_t p = 0; p < parts; ++p)
        attend_part(cache, layer, item.kv, slot_queries(item), slot_group, d, chosen.positions, p,
                    chosen.scored ? scratch.scores.data() : nullptr, spec.scale, part_scores,
                    part_sums(item_pieces.data(), parts, slot_group, d, p));
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

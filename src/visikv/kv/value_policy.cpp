#include "visikv/kv/value_policy.h"

#include <algorithm>
#include <cmath>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/core/vec.h"
#include "visikv/kv/int_row_codec.h"

namespace visikv {

namespace {

constexpr int64_t kScaleZeroBytes = 4;  // one fp16 scale and one fp16 zero per group

}  // namespace

void AttentionAccount::record(std::span<const float> weights, const PositionSet& positions) {
  const int64_t n = positions.size();
  require(static_cast<int64_t>(weights.size()) == n, "attention account: ", weights.size(),
          " weights for ", n, " positions");
  if (n == 0) return;
  const int64_t first = positions.is_range() ? positions.begin() : positions[0];
  const int64_t last = positions.is_range() ? positions.end() - 1 : positions[n - 1];
  require(first >= 0 && last < size(), "attention account: positions [", first, ", ", last,
          "] outside the ", size(), " tokens accounted");
  for (int64_t i = 0; i < n; ++i) {
    const double w = weights[i];
    const int64_t j = positions[i];
    mass_[j] += w;
    squared_mass_[j] += w * w;
  }
}

int64_t ValuePolicyStore::Pool::slots() const {
  return code_bytes == 0 ? 0 : static_cast<int64_t>(codes.size()) / code_bytes;
}

ValuePolicyStore::ValuePolicyStore(const CodecSpec& spec, int64_t head_dim, int64_t reserve_tokens)
    : spec_(spec), dim_(head_dim) {
  require(spec.policy && !spec.is_dense() && spec.axis == CodecSpec::Axis::Tokens &&
              spec.window == 0 && !spec.hadamard && !spec.headq,
          "value policy store: '", spec.text(), "' is not a value policy spec");
  check_codec_fits(spec, head_dim);
  policy_ = *spec.policy;
  group_ = spec.group;
  groups_ = head_dim / group_;
  const int steps = policy_.steps();
  pools_.resize(static_cast<size_t>(steps + 1));
  for (int k = 0; k <= steps; ++k) {
    pools_[k].bits = policy_.level_bits(k, spec.bits);
    pools_[k].code_bytes = int_rows::packed_bytes(dim_, pools_[k].bits);
  }
  // D(b) = 1 / (2^b - 1)²: the squared error of a uniform grid of 2^b levels over a fixed range,
  // up to a factor common to all widths; each step's drop relative to the top step's.
  const auto distortion = [](int bits) {
    const double levels = static_cast<double>((1 << bits) - 1);
    return 1.0 / (levels * levels);
  };
  const auto drop = [&](int k) {
    return distortion(pools_[k - 1].bits) - distortion(pools_[k].bits);
  };
  for (int k = 1; k <= steps; ++k)
    model_drops_.push_back(drop(steps) > 0 ? drop(k) / drop(steps) : 1.0);
  pools_[0].codes.reserve(static_cast<size_t>(reserve_tokens * pools_[0].code_bytes));
  pools_[0].params.reserve(static_cast<size_t>(reserve_tokens * 2 * groups_));
  where_.reserve(static_cast<size_t>(reserve_tokens));
  row_.resize(static_cast<size_t>(dim_));
  probe_.resize(static_cast<size_t>(dim_));
  codes_.resize(static_cast<size_t>(dim_));
}

int32_t ValuePolicyStore::store_row(Pool& pool, const float* x) {
  int32_t slot;
  if (!pool.free_slots.empty()) {
    slot = pool.free_slots.back();
    pool.free_slots.pop_back();
  } else {
    slot = static_cast<int32_t>(pool.slots());
    pool.codes.resize(pool.codes.size() + pool.code_bytes);
    pool.params.resize(pool.params.size() + 2 * groups_);
  }
  uint16_t* scales = pool.params.data() + slot * 2 * groups_;
  // Per-token groups, as the plain integer store quantizes them.
  int_rows::encode_row({x, static_cast<size_t>(dim_)}, pool.bits, {dim_, group_},
                       pool.codes.data() + slot * pool.code_bytes, scales, scales + groups_, 1,
                       codes_);
  return slot;
}

void ValuePolicyStore::decode(const Pool& pool, int32_t slot, float* out) const {
  const uint16_t* scales = pool.params.data() + slot * 2 * groups_;
  int_rows::decode_row({pool.codes.data() + slot * pool.code_bytes, scales, scales + groups_},
                       pool.bits, {dim_, group_}, out);
}

void ValuePolicyStore::decode(int64_t position, float* out) const {
  const Where w = where_[position];
  decode(pools_[w.level], w.slot, out);
}

double ValuePolicyStore::weight(int64_t position) const {
  switch (policy_.rule) {
    case ValuePolicySpec::Rule::Recency:
      return static_cast<double>(position);
    case ValuePolicySpec::Rule::A1:
      return account_.mass(position);
    case ValuePolicySpec::Rule::A2:
    case ValuePolicySpec::Rule::A2E:
      return account_.squared_mass(position);
  }
  return 0;
}

double ValuePolicyStore::gain(int64_t position) const {
  const int level = where_[position].level;
  if (level == 0) return 0;
  const double drop = policy_.rule == ValuePolicySpec::Rule::A2E
                          ? drops_[position * policy_.steps() + level - 1]
                          : model_drops_[level - 1];
  return weight(position) * drop;
}

// a2e: the squared error of each reading the new token can have, from H down through the
// demotions that would produce it (the same re-quantization demote() performs: of the level above,
// or of the float value under fromfloat), against the float value it arrived as. The H reading
// is the new token's own row, just stored.
void ValuePolicyStore::record_drops(std::span<const float> value) {
  const int steps = policy_.steps();
  const auto squared_error = [&](const std::vector<float>& reading) {
    double sum = 0;
    for (int64_t c = 0; c < dim_; ++c) {
      const double e = static_cast<double>(value[c]) - reading[c];
      sum += e * e;
    }
    return sum;
  };
  decode(size() - 1, row_.data());
  std::vector<double> errors(static_cast<size_t>(steps + 1));
  errors[steps] = squared_error(row_);
  for (int k = steps - 1; k >= 0; --k) {
    // Round trip at level k through a scratch slot of that width (kept free afterwards).
    Pool& pool = pools_[k];
    const int32_t slot = store_row(pool, policy_.from_float ? value.data() : row_.data());
    decode(pool, slot, probe_.data());
    pool.free_slots.push_back(slot);
    errors[k] = squared_error(probe_);
    std::swap(row_, probe_);
  }
  for (int k = 1; k <= steps; ++k) drops_.push_back(errors[k - 1] - errors[k]);
}

void ValuePolicyStore::demote(int64_t position) {
  Where& w = where_[position];
  Pool &from = pools_[w.level], &to = pools_[w.level - 1];
  int32_t slot;
  if (from.bits == to.bits) {
    // Same width: the code moves as it is (re-quantizing a reconstruction could move it).
    slot = static_cast<int32_t>(to.slots());
    const auto codes = from.codes.begin() + w.slot * from.code_bytes;
    to.codes.insert(to.codes.end(), codes, codes + from.code_bytes);
    const auto params = from.params.begin() + w.slot * 2 * groups_;
    to.params.insert(to.params.end(), params, params + 2 * groups_);
  } else if (policy_.from_float) {
    slot = store_row(to, originals_.data() + position * dim_);
  } else {
    decode(from, w.slot, row_.data());
    slot = store_row(to, row_.data());
  }
  from.free_slots.push_back(w.slot);
  w = {static_cast<int8_t>(w.level - 1), slot};
  ++demotions_;
}

void ValuePolicyStore::append(std::span<const float> vector) {
  require(static_cast<int64_t>(vector.size()) == dim_, "value policy store: expected ", dim_,
          " numbers, got ", vector.size());
  const int steps = policy_.steps();
  const int64_t n = size();
  where_.push_back({static_cast<int8_t>(steps), store_row(pools_[steps], vector.data())});
  account_.add_token();
  if (policy_.from_float) originals_.insert(originals_.end(), vector.begin(), vector.end());
  if (policy_.rule == ValuePolicySpec::Rule::A2E) record_drops(vector);
  // The tokens older than the newest W_n leave the window and join S (one per append at most:
  // W_n grows by at most one per append); S holds at most `cap` steps.
  const int64_t stored = n + 1;
  const int64_t window = std::min(stored, policy_.window_at(stored, spec_.bits));
  for (; left_ < stored - window; ++left_) {
    kept_.push_back(static_cast<int32_t>(left_));
    kept_steps_ += where_[left_].level;
  }
  const int64_t cap = policy_.raised_steps(stored, spec_.bits) - steps * window;
  // At most `steps` over (cap grows by at most `steps` per append): the smallest gain goes, one
  // step at a time; among equal gains the newest, so a token already kept is not displaced by a
  // tie.
  while (kept_steps_ > cap) {
    size_t lowest = 0;
    double lowest_gain = gain(kept_[0]);
    for (size_t i = 1; i < kept_.size(); ++i) {
      const double g = gain(kept_[i]);
      if (g < lowest_gain || (g == lowest_gain && kept_[i] > kept_[lowest])) {
        lowest = i;
        lowest_gain = g;
      }
    }
    const int32_t position = kept_[lowest];
    demote(position);
    --kept_steps_;
    if (where_[position].level == 0)
      kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(lowest));
  }
}

void ValuePolicyStore::accumulate(std::span<const float> weights, const PositionSet& positions,
                                  std::span<float> out) const {
  const int64_t n = positions.size(), count = static_cast<int64_t>(out.size()) / dim_;
  std::vector<float> row(static_cast<size_t>(dim_));
  for (int64_t i = 0; i < n; ++i) {
    decode(positions[i], row.data());
    for (int64_t q = 0; q < count; ++q)
      vec::axpy(weights[q * n + i], row.data(), out.data() + q * dim_, dim_);
  }
}

void ValuePolicyStore::reconstruct(int64_t position, std::span<float> out) const {
  decode(position, out.data());
}

int64_t ValuePolicyStore::level_count(int level) const {
  const Pool& pool = pools_[level];
  return pool.slots() - static_cast<int64_t>(pool.free_slots.size());
}

int64_t ValuePolicyStore::raised_steps() const {
  int64_t steps = 0;
  for (int k = 1; k <= policy_.steps(); ++k) steps += k * level_count(k);
  return steps;
}

int64_t ValuePolicyStore::stored_bytes() const {
  const int64_t row_params = groups_ * kScaleZeroBytes;
  int64_t bytes = 0;
  for (int k = 0; k <= policy_.steps(); ++k)
    bytes += level_count(k) * (pools_[k].code_bytes + row_params);
  return bytes;
}

void ValuePolicyStore::clear() {
  for (Pool& pool : pools_) {
    pool.codes.clear();
    pool.params.clear();
    pool.free_slots.clear();
  }
  where_.clear();
  kept_.clear();
  kept_steps_ = 0;
  left_ = 0;
  drops_.clear();
  originals_.clear();
  account_.clear();
  demotions_ = 0;
}

void ValuePolicyStore::record_attention(std::span<const float> weights,
                                        const PositionSet& positions) {
  account_.record(weights, positions);
}

}  // namespace visikv

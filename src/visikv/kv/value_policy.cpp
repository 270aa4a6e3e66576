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
  high_.bits = policy_.high_bits;
  low_.bits = spec.bits;
  for (Pool* pool : {&high_, &low_}) pool->code_bytes = int_rows::packed_bytes(dim_, pool->bits);
  low_.codes.reserve(static_cast<size_t>(reserve_tokens * low_.code_bytes));
  low_.params.reserve(static_cast<size_t>(reserve_tokens * 2 * groups_));
  where_.reserve(static_cast<size_t>(reserve_tokens));
  row_.resize(static_cast<size_t>(dim_));
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
  decode(w.high ? high_ : low_, w.slot, out);
}

double ValuePolicyStore::score(int64_t position) const {
  switch (policy_.rule) {
    case ValuePolicySpec::Rule::Recency:
      return static_cast<double>(position);
    case ValuePolicySpec::Rule::A1:
      return account_.mass(position);
    case ValuePolicySpec::Rule::A2:
      return account_.squared_mass(position);
  }
  return 0;
}

void ValuePolicyStore::demote(int64_t position) {
  Where& w = where_[position];
  int32_t slot;
  if (high_.bits == low_.bits) {
    // Same width: the code moves as it is (re-quantizing a reconstruction could move it).
    slot = static_cast<int32_t>(low_.slots());
    const auto codes = high_.codes.begin() + w.slot * high_.code_bytes;
    low_.codes.insert(low_.codes.end(), codes, codes + high_.code_bytes);
    const auto params = high_.params.begin() + w.slot * 2 * groups_;
    low_.params.insert(low_.params.end(), params, params + 2 * groups_);
  } else {
    decode(high_, w.slot, row_.data());
    slot = store_row(low_, row_.data());
  }
  high_.free_slots.push_back(w.slot);
  w = {false, slot};
  ++demotions_;
}

void ValuePolicyStore::append(std::span<const float> vector) {
  require(static_cast<int64_t>(vector.size()) == dim_, "value policy store: expected ", dim_,
          " numbers, got ", vector.size());
  const int64_t n = size();
  where_.push_back({true, store_row(high_, vector.data())});
  account_.add_token();
  // Token n - W leaves the window and joins S; S holds at most `cap` tokens.
  const int64_t leaving = n - policy_.window;
  if (leaving < 0) return;
  kept_.push_back(static_cast<int32_t>(leaving));
  const int64_t stored = n + 1;
  const int64_t cap =
      policy_.high_tokens(stored, spec_.bits) - std::min<int64_t>(stored, policy_.window);
  if (static_cast<int64_t>(kept_.size()) <= cap) return;
  // One more than the budget allows (cap grows by at most one per append): the lowest score
  // goes; among equal scores the newest, so a token already kept is not displaced by a tie.
  size_t lowest = 0;
  for (size_t i = 1; i < kept_.size(); ++i) {
    const double a = score(kept_[i]), b = score(kept_[lowest]);
    if (a < b || (a == b && kept_[i] > kept_[lowest])) lowest = i;
  }
  demote(kept_[lowest]);
  kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(lowest));
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

int64_t ValuePolicyStore::high_count() const {
  return high_.slots() - static_cast<int64_t>(high_.free_slots.size());
}

int64_t ValuePolicyStore::stored_bytes() const {
  const int64_t row_params = groups_ * kScaleZeroBytes;
  return high_count() * (high_.code_bytes + row_params) +
         low_.slots() * (low_.code_bytes + row_params);
}

void ValuePolicyStore::clear() {
  for (Pool* pool : {&high_, &low_}) {
    pool->codes.clear();
    pool->params.clear();
    pool->free_slots.clear();
  }
  where_.clear();
  kept_.clear();
  account_.clear();
  demotions_ = 0;
}

void ValuePolicyStore::record_attention(std::span<const float> weights,
                                        const PositionSet& positions) {
  account_.record(weights, positions);
}

}  // namespace visikv

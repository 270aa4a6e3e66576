#include "visikv/cuda/int_layout.h"

#include <algorithm>
#include <cmath>

#include "visikv/core/error.h"
#include "visikv/core/half.h"
#include "visikv/kv/headq.h"
#include "visikv/kv/int_row_codec.h"

namespace visikv::cuda {

namespace {

void check_base(const CodecSpec& spec, int64_t head_dim, const char* side) {
  require(spec.kind == CodecSpec::Kind::Int && spec.axis == CodecSpec::Axis::Tokens &&
              spec.window == 0 && !spec.hadamard,
          "GPU integer cache: ", side, " codec '", spec.text(),
          "' is not supported (the GPU reads int<b>:g<G>:tok without :r and :had)");
  require(spec.bits == 2 || spec.bits == 4, "GPU integer cache: ", side, " codec '", spec.text(),
          "' has ", spec.bits, " bits; the GPU reads 2 or 4");
  require(spec.group % 8 == 0 && head_dim % spec.group == 0, "GPU integer cache: ", side,
          " codec '", spec.text(), "': group ", spec.group,
          " must be a multiple of 8 that divides head_dim ", head_dim);
}

// A row of `count` codes in groups of `group` with interleaved (scale, zero) parameters, read
// back by the row codec the CPU stores use.
void decode_codes(const uint8_t* packed, int bits, const uint16_t* params, int64_t group,
                  int64_t count, float* out) {
  int_rows::decode_row_scalar({packed, params, params + 1, 2}, bits, {count, group}, out);
}

// Quantizes `values` in groups of `group` into packed codes and interleaved (scale, zero).
void encode_codes(std::span<const float> values, int bits, int64_t group, uint8_t* packed,
                  uint16_t* params) {
  std::vector<uint8_t> codes(values.size());
  int_rows::encode_row(values, bits, {static_cast<int64_t>(values.size()), group}, packed, params,
                       params + 1, 2, codes);
}

}  // namespace

IntLayout IntLayout::from_specs(const CodecSpec& keys, const CodecSpec& values, int64_t head_dim) {
  check_codec_fits(keys, head_dim);
  check_codec_fits(values, head_dim);
  check_base(keys, head_dim, "key");
  check_base(values, head_dim, "value");
  IntLayout layout;
  layout.head_dim = head_dim;
  layout.key_bits = keys.bits;
  layout.value_bits = values.bits;
  layout.key_group = keys.group;
  layout.value_group = values.group;
  if (keys.headq) {
    const HeadqSpec& side = *keys.headq;
    require(side.bits == 2 || side.bits == 4 || side.bits == 8, "GPU integer cache: key codec '",
            keys.text(), "': the GPU reads side codes of 2, 4 or 8 bits, not ", side.bits);
    require(side.rank % 8 == 0 && side.rank <= head_dim / 8, "GPU integer cache: key codec '",
            keys.text(), "': HeadQ rank ", side.rank, " must be a multiple of 8 and at most ",
            head_dim / 8, " (head_dim / 8)");
    layout.side_rank = side.rank;
    layout.side_bits = side.bits;
    layout.side_sign = side.wrong_sign ? -1.0f : 1.0f;
  }
  return layout;
}

IntCacheHost::IntCacheHost(const IntLayout& layout, int64_t sequences, int64_t kv_heads,
                           int64_t capacity)
    : layout_(layout), sequences_(sequences), kv_heads_(kv_heads), capacity_(capacity) {
  require(sequences > 0 && kv_heads > 0 && capacity > 0, "GPU integer cache: ", sequences,
          " sequences x ", kv_heads, " kv heads x ", capacity, " tokens must all be positive");
  const auto rows = static_cast<size_t>(sequences * kv_heads * capacity);
  key_codes.assign(rows * layout.key_row_bytes(), 0);
  key_params.assign(rows * 2 * layout.key_groups(), 0);
  value_codes.assign(rows * layout.value_row_bytes(), 0);
  value_params.assign(rows * 2 * layout.value_groups(), 0);
  side_codes.assign(rows * layout.side_row_bytes(), 0);
  side_params.assign(layout.side_rank > 0 ? rows * 2 : 0, 0);
  basis.assign(static_cast<size_t>(kv_heads * layout.side_rank * layout.head_dim), 0.0f);
}

int64_t IntCacheHost::row(int64_t sequence, int64_t kv_head, int64_t token) const {
  require(sequence >= 0 && sequence < sequences_ && kv_head >= 0 && kv_head < kv_heads_ &&
              token >= 0 && token < capacity_,
          "GPU integer cache: slot (", sequence, ", ", kv_head, ", ", token, ") out of range");
  return (sequence * kv_heads_ + kv_head) * capacity_ + token;
}

void IntCacheHost::set_basis(int64_t kv_head, std::span<const float> rows) {
  const int64_t size = layout_.side_rank * layout_.head_dim;
  require(kv_head >= 0 && kv_head < kv_heads_ && static_cast<int64_t>(rows.size()) == size,
          "GPU integer cache: basis of kv head ", kv_head, " needs ", size, " numbers, got ",
          rows.size());
  std::copy(rows.begin(), rows.end(), basis.begin() + kv_head * size);
}

void IntCacheHost::store(int64_t sequence, int64_t kv_head, int64_t token,
                         std::span<const float> key, std::span<const float> value) {
  const int64_t d = layout_.head_dim, r = row(sequence, kv_head, token);
  require(static_cast<int64_t>(key.size()) == d && static_cast<int64_t>(value.size()) == d,
          "GPU integer cache: key and value need ", d, " numbers");
  encode_codes(key, layout_.key_bits, layout_.key_group,
               key_codes.data() + r * layout_.key_row_bytes(),
               key_params.data() + r * 2 * layout_.key_groups());
  encode_codes(value, layout_.value_bits, layout_.value_group,
               value_codes.data() + r * layout_.value_row_bytes(),
               value_params.data() + r * 2 * layout_.value_groups());
  if (layout_.side_rank == 0) return;
  // The side code of the residual against k̂, as the CPU HeadQ store computes it.
  std::vector<float> stored(d), projected(layout_.side_rank);
  decode_key(sequence, kv_head, token, stored);
  headq_project_residual(
      std::span(basis).subspan(kv_head * layout_.side_rank * d, layout_.side_rank * d), key, stored,
      projected);
  encode_codes(projected, layout_.side_bits, layout_.side_rank,
               side_codes.data() + r * layout_.side_row_bytes(), side_params.data() + r * 2);
}

void IntCacheHost::decode_key(int64_t sequence, int64_t kv_head, int64_t token,
                              std::span<float> out) const {
  const int64_t r = row(sequence, kv_head, token);
  decode_codes(key_codes.data() + r * layout_.key_row_bytes(), layout_.key_bits,
               key_params.data() + r * 2 * layout_.key_groups(), layout_.key_group,
               layout_.head_dim, out.data());
}

void IntCacheHost::decode_side(int64_t sequence, int64_t kv_head, int64_t token,
                               std::span<float> out) const {
  const int64_t r = row(sequence, kv_head, token);
  decode_codes(side_codes.data() + r * layout_.side_row_bytes(), layout_.side_bits,
               side_params.data() + r * 2, layout_.side_rank, layout_.side_rank, out.data());
}

void IntCacheHost::decode_value(int64_t sequence, int64_t kv_head, int64_t token,
                                std::span<float> out) const {
  const int64_t r = row(sequence, kv_head, token);
  decode_codes(value_codes.data() + r * layout_.value_row_bytes(), layout_.value_bits,
               value_params.data() + r * 2 * layout_.value_groups(), layout_.value_group,
               layout_.head_dim, out.data());
}

void IntCacheHost::scored_key(int64_t sequence, int64_t kv_head, int64_t token,
                              std::span<float> out) const {
  decode_key(sequence, kv_head, token, out);
  const int64_t d = layout_.head_dim, rank = layout_.side_rank;
  if (rank == 0) return;
  std::vector<float> side(rank);
  decode_side(sequence, kv_head, token, side);
  const float* rows = basis.data() + kv_head * rank * d;
  for (int64_t j = 0; j < rank; ++j)
    for (int64_t c = 0; c < d; ++c)
      out[c] = std::fma(layout_.side_sign * side[j], rows[j * d + c], out[c]);
}

}  // namespace visikv::cuda

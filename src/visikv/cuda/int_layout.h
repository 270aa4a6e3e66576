// The integer KV-cache layout the GPU kernels read (docs/CUDA.md), and its host-side packer.
//
// The GPU kernels decode the same numbers as the CPU codecs (kv/codec_spec.h): per-token groups
// (`int<b>:g<G>:tok`, b = 2 or 4, no fp16 window, no rotation) and the HeadQ side code
// (`+headq:r<r>:s<S>`, S = 2, 4 or 8). This header is plain C++ (no CUDA), so the packing is
// built and tested on machines without a GPU.
//
// Layout, per (sequence, KV head) and token `t` of a head with `capacity` token slots, row index
// `(sequence * kv_heads + kv_head) * capacity + t`:
//   key_codes   [row][d·b_k/8] bytes   codes packed as in kv/int_row_codec.h (8 codes in b bytes)
//   key_params  [row][d/G_k][2] fp16   (scale, zero) of each group, interleaved
//   side_codes  [row][r·S/8] bytes     side code j at bits [S·j, S·(j+1)) (r % 8 == 0)
//   side_params [row][2] fp16          (scale, zero) of the side code
//   value_codes, value_params          as the keys, with b_v and G_v
//   basis       [kv_head][r][d] float  U_rᵀ: row j is basis vector j
// The CPU stores hold the same codes and parameters; the CPU keeps a token group's scales and
// zeros as two runs ([scales][zeros]) and the side codes as one bit stream over all keys, which
// with r·S % 8 == 0 is the rows above laid end to end.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "visikv/kv/codec_spec.h"

namespace visikv::cuda {

struct IntLayout {
  int64_t head_dim = 0;
  int key_bits = 0, value_bits = 0;        // 2 or 4
  int64_t key_group = 0, value_group = 0;  // channels sharing a scale and zero (multiple of 8)
  int64_t side_rank = 0;                   // 0: no HeadQ side code
  int side_bits = 0;                       // 2, 4 or 8
  float side_sign = 1.0f;                  // -1 for the :wrongsign control

  // Throws visikv::Error naming the spec when the GPU kernels cannot read it.
  static IntLayout from_specs(const CodecSpec& keys, const CodecSpec& values, int64_t head_dim);

  int64_t key_row_bytes() const { return head_dim * key_bits / 8; }
  int64_t value_row_bytes() const { return head_dim * value_bits / 8; }
  int64_t key_groups() const { return head_dim / key_group; }
  int64_t value_groups() const { return head_dim / value_group; }
  int64_t side_row_bytes() const { return side_rank * side_bits / 8; }
};

// A host copy of an integer cache in the GPU layout, filled token by token with the CPU codecs'
// quantization (kv/int_row_codec.h, kv/headq.h), so it holds the codes a CodecCache holds.
class IntCacheHost {
 public:
  IntCacheHost(const IntLayout& layout, int64_t sequences, int64_t kv_heads, int64_t capacity);

  const IntLayout& layout() const { return layout_; }
  int64_t sequences() const { return sequences_; }
  int64_t kv_heads() const { return kv_heads_; }
  int64_t capacity() const { return capacity_; }

  // The HeadQ basis of one KV head: {side_rank, head_dim} rows (the rows a CodecCache of this
  // spec uses for that head, kv/headq.h: headq_basis_rows). Set it before storing keys.
  void set_basis(int64_t kv_head, std::span<const float> rows);
  // Quantizes one token's key and value (head_dim floats each) into slot `token`.
  void store(int64_t sequence, int64_t kv_head, int64_t token, std::span<const float> key,
             std::span<const float> value);

  // The numbers the codes stand for: k̂ (base codec only), ĉ (side_rank numbers), v̂, and the
  // key as scores see it, k̂ + sign · U_r ĉ (CodecCache::stored_key's number).
  void decode_key(int64_t sequence, int64_t kv_head, int64_t token, std::span<float> out) const;
  void decode_side(int64_t sequence, int64_t kv_head, int64_t token, std::span<float> out) const;
  void decode_value(int64_t sequence, int64_t kv_head, int64_t token, std::span<float> out) const;
  void scored_key(int64_t sequence, int64_t kv_head, int64_t token, std::span<float> out) const;

  std::vector<uint8_t> key_codes, side_codes, value_codes;
  std::vector<uint16_t> key_params, side_params, value_params;  // fp16 bits
  std::vector<float> basis;                                     // {kv_heads, side_rank, d}

 private:
  int64_t row(int64_t sequence, int64_t kv_head, int64_t token) const;

  IntLayout layout_;
  int64_t sequences_, kv_heads_, capacity_;
};

}  // namespace visikv::cuda

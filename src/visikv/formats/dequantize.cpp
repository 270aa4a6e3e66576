// Scalar dequantization, block by block, following ggml's dequantize_row_* (ggml-quants.c).
// The float operations are done in the same order as ggml (and as the `gguf` Python package's
// numpy versions) so that results agree bit for bit.
#include "visikv/formats/dequantize.h"

#include <cstdint>
#include <cstring>

#include "visikv/core/error.h"
#include "visikv/core/half.h"

namespace visikv {

namespace {

constexpr int kQK = 32;    // elements per block of the legacy formats
constexpr int kQKK = 256;  // elements per super-block of the k-quants

float load_fp16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return fp16_to_float(bits);
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t value;
  std::memcpy(&value, p, sizeof(value));
  return value;
}

// Block: fp16 d, 16 bytes of 4-bit quants (low nibbles = first half, high = second half).
void block_q4_0(const uint8_t* block, float* y) {
  const float d = load_fp16(block);
  const uint8_t* qs = block + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
    y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// Block: fp16 d, fp16 m, 16 bytes of 4-bit quants.
void block_q4_1(const uint8_t* block, float* y) {
  const float d = load_fp16(block);
  const float m = load_fp16(block + 2);
  const uint8_t* qs = block + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
    y[j + kQK / 2] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// Block: fp16 d, 32 fifth bits (uint32), 16 bytes of low nibbles.
void block_q5_0(const uint8_t* block, float* y) {
  const float d = load_fp16(block);
  const uint32_t qh = load_u32(block + 2);
  const uint8_t* qs = block + 6;
  for (int j = 0; j < kQK / 2; ++j) {
    const int high0 = static_cast<int>(((qh >> j) << 4) & 0x10);
    const int high1 = static_cast<int>((qh >> (j + 12)) & 0x10);
    y[j] = static_cast<float>(((qs[j] & 0x0F) | high0) - 16) * d;
    y[j + kQK / 2] = static_cast<float>(((qs[j] >> 4) | high1) - 16) * d;
  }
}

// Block: fp16 d, fp16 m, 32 fifth bits, 16 bytes of low nibbles.
void block_q5_1(const uint8_t* block, float* y) {
  const float d = load_fp16(block);
  const float m = load_fp16(block + 2);
  const uint32_t qh = load_u32(block + 4);
  const uint8_t* qs = block + 8;
  for (int j = 0; j < kQK / 2; ++j) {
    const int high0 = static_cast<int>(((qh >> j) << 4) & 0x10);
    const int high1 = static_cast<int>((qh >> (j + 12)) & 0x10);
    y[j] = static_cast<float>((qs[j] & 0x0F) | high0) * d + m;
    y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) | high1) * d + m;
  }
}

// Block: fp16 d, 32 int8 quants.
void block_q8_0(const uint8_t* block, float* y) {
  const float d = load_fp16(block);
  const auto* qs = reinterpret_cast<const int8_t*>(block + 2);
  for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(qs[j]) * d;
}

// The 6-bit scale and min of sub-block j, packed into 12 bytes (ggml get_scale_min_k4).
void scale_min_k4(int j, const uint8_t* q, uint8_t& scale, uint8_t& min) {
  if (j < 4) {
    scale = q[j] & 63;
    min = q[j + 4] & 63;
  } else {
    scale = static_cast<uint8_t>((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    min = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Super-block: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of 4-bit quants.
void block_q4_k(const uint8_t* block, float* y) {
  const float d = load_fp16(block);
  const float dmin = load_fp16(block + 2);
  const uint8_t* scales = block + 4;
  const uint8_t* q = block + 16;
  for (int j = 0, is = 0; j < kQKK; j += 64, is += 2, q += 32) {
    uint8_t sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
  }
}

// Super-block: fp16 d, fp16 dmin, 12 bytes of scales/mins, 32 bytes of fifth bits, 128 bytes of
// low nibbles.
void block_q5_k(const uint8_t* block, float* y) {
  const float d = load_fp16(block);
  const float dmin = load_fp16(block + 2);
  const uint8_t* scales = block + 4;
  const uint8_t* qh = block + 16;
  const uint8_t* ql = block + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < kQKK; j += 64, is += 2, ql += 32) {
    uint8_t sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) {
      *y++ = d1 * static_cast<float>((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0)) - m1;
    }
    for (int l = 0; l < 32; ++l) {
      *y++ = d2 * static_cast<float>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
    }
    u1 = static_cast<uint8_t>(u1 << 2);
    u2 = static_cast<uint8_t>(u2 << 2);
  }
}

// Super-block: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d.
void block_q6_k(const uint8_t* block, float* y) {
  const uint8_t* ql = block;
  const uint8_t* qh = block + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(block + 192);
  const float d = load_fp16(block + 208);
  for (int n = 0; n < kQKK; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l + 0] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

template <void (*Block)(const uint8_t*, float*)>
void for_each_block(const uint8_t* in, float* out, int64_t blocks, int64_t block_bytes,
                    int64_t block_elements) {
  for (int64_t b = 0; b < blocks; ++b) Block(in + b * block_bytes, out + b * block_elements);
}

}  // namespace

void dequantize(DType type, std::span<const std::byte> in, std::span<float> out) {
  const DTypeInfo& info = dtype_info(type);
  const int64_t elements = static_cast<int64_t>(out.size());
  const int64_t expected = storage_bytes(type, elements);
  require(static_cast<int64_t>(in.size()) == expected, "dequantize ", info.name, ": ", elements,
          " elements need ", expected, " bytes but ", in.size(), " were given");
  const auto* src = reinterpret_cast<const uint8_t*>(in.data());
  float* dst = out.data();
  const int64_t blocks = elements / info.block_elements;
  switch (type) {
    case DType::F32:
      if (elements > 0) std::memcpy(dst, src, static_cast<size_t>(expected));
      return;
    case DType::F16:
      for (int64_t i = 0; i < elements; ++i) dst[i] = load_fp16(src + 2 * i);
      return;
    case DType::BF16:
      for (int64_t i = 0; i < elements; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, sizeof(bits));
        dst[i] = bf16_to_float(bits);
      }
      return;
    case DType::Q8_0:
      return for_each_block<block_q8_0>(src, dst, blocks, info.block_bytes, info.block_elements);
    case DType::Q4_0:
      return for_each_block<block_q4_0>(src, dst, blocks, info.block_bytes, info.block_elements);
    case DType::Q4_1:
      return for_each_block<block_q4_1>(src, dst, blocks, info.block_bytes, info.block_elements);
    case DType::Q5_0:
      return for_each_block<block_q5_0>(src, dst, blocks, info.block_bytes, info.block_elements);
    case DType::Q5_1:
      return for_each_block<block_q5_1>(src, dst, blocks, info.block_bytes, info.block_elements);
    case DType::Q4_K:
      return for_each_block<block_q4_k>(src, dst, blocks, info.block_bytes, info.block_elements);
    case DType::Q5_K:
      return for_each_block<block_q5_k>(src, dst, blocks, info.block_bytes, info.block_elements);
    case DType::Q6_K:
      return for_each_block<block_q6_k>(src, dst, blocks, info.block_bytes, info.block_elements);
  }
  fail("dequantize: unknown dtype ", static_cast<int>(type));
}

std::vector<float> to_float(const TensorRef& tensor) {
  std::vector<float> values(static_cast<size_t>(tensor.elements()));
  dequantize(tensor.dtype, tensor.data, values);
  return values;
}

}  // namespace visikv

#include "visikv/model/amx_products.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "visikv/core/aligned.h"
#include "visikv/core/error.h"

#if VISIKV_AMX_COMPILED
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#endif

namespace visikv::amx {

namespace {

#if VISIKV_AMX_COMPILED
bool detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
  const bool avx512 = (b & (1u << 16)) != 0 && (b & (1u << 17)) != 0 && (b & (1u << 30)) != 0 &&
                      (b & (1u << 31)) != 0 && (c & (1u << 11)) != 0;  // F, DQ, BW, VL, VNNI
  const bool tiles = (d & (1u << 24)) != 0 && (d & (1u << 25)) != 0;   // AMX-TILE, AMX-INT8
  if (!avx512 || !tiles) return false;
  // Linux hands out the 8 KB of tile state only to a process that asks for it
  // (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); its threads then have it too.
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}
#else
bool detect() { return false; }
#endif

bool cached_available() {
  static const bool value = detect();
  return value;
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{cached_available()};
  return flag;
}

}  // namespace

bool available() { return cached_available(); }
bool enabled() { return enabled_flag().load(std::memory_order_relaxed); }

void set_enabled(bool on) {
  require(!on || available(), "AMX tile products are not available on this CPU");
  enabled_flag().store(on, std::memory_order_relaxed);
}

// --- blocks of 32, packed sixteen rows at a time -------------------------------------------------

namespace {

struct PackedLayout {
  int code_bytes;   // 256 (4- and 5-bit codes) or 512 (Q8_0)
  int fifth_bytes;  // 64 for the 5-bit codes
  bool has_min;     // Q4_1, Q5_1
  int code_offset;  // c = q - code_offset
  int scales_at() const { return code_bytes + fifth_bytes; }
  int block_bytes() const { return scales_at() + (has_min ? 64 : 32); }
};

constexpr PackedLayout packed_layout(DType type) {
  switch (type) {
    case DType::Q4_0:
      return {256, 0, false, 8};
    case DType::Q4_1:
      return {256, 0, true, 0};
    case DType::Q5_0:
      return {256, 64, false, 16};
    case DType::Q5_1:
      return {256, 64, true, 0};
    default:
      return {512, 0, false, 0};  // Q8_0
  }
}

// A stored block's 32 codes q (before the offset) and the bits of its fp16 d and m.
struct StoredBlock {
  int q[32];
  uint16_t d = 0, m = 0;
};

StoredBlock read_stored_block(DType type, const uint8_t* p) {
  StoredBlock s;
  std::memcpy(&s.d, p, 2);
  if (type == DType::Q8_0) {
    for (int j = 0; j < 32; ++j) s.q[j] = static_cast<int8_t>(p[2 + j]);
    return s;
  }
  const bool has_min = type == DType::Q4_1 || type == DType::Q5_1;
  const bool fifth = type == DType::Q5_0 || type == DType::Q5_1;
  if (has_min) std::memcpy(&s.m, p + 2, 2);
  const uint8_t* rest = p + (has_min ? 4 : 2);
  uint32_t high = 0;
  if (fifth) {
    std::memcpy(&high, rest, 4);
    rest += 4;
  }
  for (int j = 0; j < 16; ++j) {
    s.q[j] = (rest[j] & 0x0F) | static_cast<int>((high >> j) & 1u) << 4;
    s.q[16 + j] = (rest[j] >> 4) | static_cast<int>((high >> (16 + j)) & 1u) << 4;
  }
  return s;
}

// The packed super-blocks of 16 rows (amx_products.h): where their parts begin (0: none).
struct SuperLayout {
  int masks_at;       // Q6_K: the codes' high bits as lane masks
  int scales_at;      // a byte per group and row (signed for Q6_K), lane order
  int mins_at;        // Q4_K: a byte per group and row, lane order
  int d_at, dmin_at;  // fp16 per row, lane order
  int bytes;
  int group_values;  // values per scale: 32 (Q4_K) or 16 (Q6_K)
};
constexpr SuperLayout kQ4KLayout{0, 2048, 2176, 2304, 2336, 2368, 32};
constexpr SuperLayout kQ6KLayout{2048, 3072, 0, 3328, 0, 3360, 16};
constexpr SuperLayout super_layout(DType type) {
  return type == DType::Q6_K ? kQ6KLayout : kQ4KLayout;
}
constexpr bool is_super_type(DType type) { return type == DType::Q4_K || type == DType::Q6_K; }

// Row r's lane in the lane order of a packed super-block's scales: even rows, then odd ones.
constexpr int lane_of_row(int r) { return r % 2 == 0 ? r / 2 : 8 + r / 2; }

// The 6-bit scales and mins of a stored Q4_K block's 8 sub-blocks (12 bytes after d and dmin).
void read_q4_k_scales(const uint8_t* p, int (&scale)[8], int (&min)[8]) {
  const uint8_t* packed = p + 4;
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      scale[j] = packed[j] & 63;
      min[j] = packed[j + 4] & 63;
    } else {
      scale[j] = (packed[j + 4] & 0x0F) | (packed[j - 4] >> 6) << 4;
      min[j] = (packed[j + 4] >> 4) | (packed[j] >> 6) << 4;
    }
  }
}

uint32_t load_word(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  return word;
}

// Row r of a stored block (`stored`) into its packed block (`out`) of the blocks of 32.
void pack_block_row(DType type, const uint8_t* stored, int r, uint8_t* out) {
  const PackedLayout layout = packed_layout(type);
  const StoredBlock s = read_stored_block(type, stored);
  for (int k = 0; k < 2; ++k) {
    if (layout.code_bytes == 512) {
      for (int c = 0; c < 16; ++c) out[c * 32 + 2 * r + k] = static_cast<uint8_t>(s.q[2 * c + k]);
      continue;
    }
    for (int c = 0; c < 8; ++c) {
      const int low = s.q[4 * c + k], high = s.q[4 * c + 2 + k];
      out[c * 32 + 2 * r + k] = static_cast<uint8_t>((low & 0x0F) | (high & 0x0F) << 4);
      if (layout.fifth_bytes == 0) continue;
      uint32_t masks[2];
      std::memcpy(masks, out + 256 + 8 * c, 8);
      masks[0] |= static_cast<uint32_t>(low >> 4) << (2 * r + k);
      masks[1] |= static_cast<uint32_t>(high >> 4) << (2 * r + k);
      std::memcpy(out + 256 + 8 * c, masks, 8);
    }
  }
  std::memcpy(out + layout.scales_at() + 2 * r, &s.d, 2);
  if (layout.has_min) std::memcpy(out + layout.scales_at() + 32 + 2 * r, &s.m, 2);
}

// The blocks of up to 16 stored Q4_K or Q6_K rows (`stored[r]` for r < rows) into their packed
// super-block (zero-filled: rows past `rows` stay zero). Chunk c holds values 4c .. 4c + 3, which
// both stored layouts keep as four consecutive nibbles of one half of their code bytes (Q4_K: sub-
// block u = c / 8 in the low or high nibbles of the 32 bytes at 16 + 32 (u / 2); Q6_K: value
// 128 h + 32 uu + l in the low or high nibbles of byte 64 h + 32 (uu & 1) + l, its bits 4-5 in
// bits 2 uu of byte 128 + 32 h + l), so a row's chunk is one 32-bit word of each.
void pack_super_tile(DType type, const uint8_t* const (&stored)[16], int rows, uint8_t* out) {
  const bool q6_k = type == DType::Q6_K;
  const SuperLayout layout = super_layout(type);
  for (int c = 0; c < 64; ++c) {
    const int l = 4 * (c % 8);
    int nibbles_at = 0, nibble_shift = 0, highs_at = 0, high_shift = 0;
    if (q6_k) {
      const int h = c / 32, uu = c % 32 / 8;
      nibbles_at = 64 * h + 32 * (uu & 1) + l;
      nibble_shift = 4 * (uu >> 1);
      highs_at = 128 + 32 * h + l;
      high_shift = 2 * uu;
    } else {
      const int u = c / 8;
      nibbles_at = 16 + 32 * (u / 2) + l;
      nibble_shift = 4 * (u & 1);
    }
    // Q6_K's fifth bit adds 16; its sixth bit clear subtracts 32 (q - 32 = low + 16 b4 - 32 (1 -
    // b5)): masks of the low-nibble values' b4, the high-nibble ones' b4, then of b5 clear.
    uint32_t masks[4] = {};
    for (int r = 0; r < rows; ++r) {
      // Byte k: value 4c + k's low four bits; byte 2r + k of the chunk takes values 4c + k and
      // 4c + 2 + k.
      const uint32_t low = load_word(stored[r] + nibbles_at) >> nibble_shift & 0x0F0F0F0Fu;
      const uint32_t pairs = (low & 0xFFFFu) | (low >> 16) << 4;
      out[32 * c + 2 * r] = static_cast<uint8_t>(pairs);
      out[32 * c + 2 * r + 1] = static_cast<uint8_t>(pairs >> 8);
      if (!q6_k) continue;
      const uint32_t high = load_word(stored[r] + highs_at) >> high_shift & 0x03030303u;
      for (int k = 0; k < 2; ++k) {
        const int bit = 2 * r + k;
        masks[0] |= (high >> (8 * k) & 1u) << bit;
        masks[1] |= (high >> (8 * (k + 2)) & 1u) << bit;
        masks[2] |= (~high >> (8 * k + 1) & 1u) << bit;
        masks[3] |= (~high >> (8 * (k + 2) + 1) & 1u) << bit;
      }
    }
    if (q6_k) std::memcpy(out + layout.masks_at + 16 * c, masks, 16);
  }
  for (int r = 0; r < rows; ++r) {
    const int lane = lane_of_row(r);
    if (q6_k) {
      for (int g = 0; g < 16; ++g) out[layout.scales_at + 16 * g + lane] = stored[r][192 + g];
      std::memcpy(out + layout.d_at + 2 * lane, stored[r] + 208, 2);
      continue;
    }
    int scale[8], min[8];
    read_q4_k_scales(stored[r], scale, min);
    for (int g = 0; g < 8; ++g) {
      out[layout.scales_at + 16 * g + lane] = static_cast<uint8_t>(scale[g]);
      out[layout.mins_at + 16 * g + lane] = static_cast<uint8_t>(min[g]);
    }
    std::memcpy(out + layout.d_at + 2 * lane, stored[r], 2);
    std::memcpy(out + layout.dmin_at + 2 * lane, stored[r] + 2, 2);
  }
}

}  // namespace

bool packs_rows(DType type) {
  return type == DType::Q4_0 || type == DType::Q4_1 || type == DType::Q5_0 || type == DType::Q5_1 ||
         type == DType::Q8_0 || is_super_type(type);
}

PackedRows pack_rows(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                     int64_t elements, const std::function<void(int64_t, int64_t)>& packed_slice) {
  constexpr int64_t kSliceTiles = 64;  // 1024 rows
  require(packs_rows(type), "no packed rows for ", dtype_name(type), " weights");
  const bool super = is_super_type(type);
  const int64_t block_values = super ? 256 : 32;
  require(elements % block_values == 0 && elements > 0 && rows > 0, "packed rows of ", rows, " x ",
          elements, " values (whole blocks of ", block_values, " needed)");
  PackedRows packed;
  packed.type = type;
  packed.rows = rows;
  packed.elements = elements;
  packed.block_values = block_values;
  packed.block_bytes = super ? super_layout(type).bytes : packed_layout(type).block_bytes();
  const int64_t blocks = elements / block_values, stored_bytes = dtype_info(type).block_bytes;
  packed.data.assign(static_cast<size_t>(packed.tiles() * packed.tile_bytes()), 0);
  for (int64_t tile = 0; tile < packed.tiles(); ++tile) {
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* out = packed.data.data() + (tile * blocks + b) * packed.block_bytes;
      const int tile_rows = static_cast<int>(std::min<int64_t>(16, rows - tile * 16));
      const uint8_t* stored[16] = {};
      for (int r = 0; r < tile_rows; ++r)
        stored[r] = reinterpret_cast<const uint8_t*>(first_row) + (tile * 16 + r) * row_bytes +
                    b * stored_bytes;
      if (super) {
        pack_super_tile(type, stored, tile_rows, out);
        continue;
      }
      for (int r = 0; r < tile_rows; ++r) pack_block_row(type, stored[r], r, out);
    }
    if (packed_slice && ((tile + 1) % kSliceTiles == 0 || tile + 1 == packed.tiles())) {
      const int64_t first = tile / kSliceTiles * kSliceTiles * 16;
      packed_slice(first, std::min(rows, (tile + 1) * 16) - first);
    }
  }
  return packed;
}

#if VISIKV_AMX_COMPILED
// GCC 12's AVX-512 conversion intrinsics start from an "undefined" vector, which its flow analysis
// reports as maybe uninitialized wherever they are inlined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
namespace {

#define VISIKV_AMX_ATTR \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,amx-tile,amx-int8")))

constexpr int kTile = 16;       // rows of a tile (tokens, or groups of 4 values)
constexpr int kTileBytes = 64;  // bytes of a tile row
constexpr int kTileSize = kTile * kTileBytes;
constexpr int kBlockValues = 256;  // a super-block
constexpr int kStepsPerBlock = kBlockValues / kTileBytes;

// Palette 1: tiles 0-3 the four sums (high · high, high · low, low · high, low · low: the two
// cross terms in tiles of their own, so that no tile waits on more than one product per 64
// values), 4-5 the activations' high and low bytes, 6-7 the weights' high and low bytes, all
// 16 x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// A configuration with tiles [first, end) of `rows` rows of `bytes` bytes added.
constexpr TileConfig with_tiles(TileConfig config, int first, int end, int rows, int bytes) {
  for (int i = first; i < end; ++i) {
    config.rows[i] = static_cast<uint8_t>(rows);
    config.bytes_per_row[i] = static_cast<uint16_t>(bytes);
  }
  return config;
}

// Loaded from static memory: GCC 12 dropped the stores into a local configuration as dead (it
// does not see _tile_loadconfig read them), which left every tile unconfigured.
VISIKV_AMX_ATTR void load_tile_config(const TileConfig& config) { _tile_loadconfig(&config); }

constexpr TileConfig kSuperBlockTiles = with_tiles(TileConfig{}, 0, 8, kTile, kTileBytes);

VISIKV_AMX_ATTR void configure_tiles() { load_tile_config(kSuperBlockTiles); }

// r[i] holds 16 dwords; afterwards r[j] holds dword j of every r[i], in order of i.
VISIKV_AMX_ATTR inline void transpose_dwords(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // Each 128-bit lane j of r[4a + e] now holds element 4j + e of rows 4a .. 4a + 3.
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  __m512i out[16];
  for (int e = 0; e < 4; ++e) {
    const __m512i ab_low = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44);
    const __m512i ab_high = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xEE);
    const __m512i cd_low = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44);
    const __m512i cd_high = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xEE);
    out[e] = _mm512_shuffle_i32x4(ab_low, cd_low, 0x88);
    out[4 + e] = _mm512_shuffle_i32x4(ab_low, cd_low, 0xDD);
    out[8 + e] = _mm512_shuffle_i32x4(ab_high, cd_high, 0x88);
    out[12 + e] = _mm512_shuffle_i32x4(ab_high, cd_high, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = out[i];
}

// 64 16-bit weights of a row as 64 low bytes (unsigned) and 64 high bytes (signed).
VISIKV_AMX_ATTR inline void split_weights(const int16_t* w, __m512i& high, __m512i& low) {
  const __m512i a = _mm512_loadu_si512(w), b = _mm512_loadu_si512(w + 32);
  low = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(a)), _mm512_cvtepi16_epi8(b),
                           1);
  high = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(_mm512_srai_epi16(a, 8))),
                            _mm512_cvtepi16_epi8(_mm512_srai_epi16(b, 8)), 1);
}

// The weights of 16 rows (from `w`; rows past `rows` are zero) and 64 values as two tiles in the
// VNNI layout: row j of a tile holds values 4j .. 4j + 3 of each of the 16 rows, row after row.
VISIKV_AMX_ATTR void pack_weight_tiles(const int16_t* w, int64_t stride, int64_t rows,
                                       uint8_t* high_tile, uint8_t* low_tile) {
  __m512i high[16], low[16];
  for (int i = 0; i < 16; ++i) {
    if (i < rows)
      split_weights(w + i * stride, high[i], low[i]);
    else
      high[i] = low[i] = _mm512_setzero_si512();
  }
  transpose_dwords(high);
  transpose_dwords(low);
  for (int j = 0; j < 16; ++j) {
    _mm512_store_si512(high_tile + j * kTileBytes, high[j]);
    _mm512_store_si512(low_tile + j * kTileBytes, low[j]);
  }
}

// Eight int32 sums as doubles (exact).
VISIKV_AMX_ATTR inline __m512d to_double(const int32_t* sums) {
  return _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(sums)));
}

// The four sums tiles (high · high, high · low, low · high, low · low) into memory.
VISIKV_AMX_ATTR inline void store_sums(int32_t (&sums)[4][kTile][kTile]) {
  _tile_stored(0, sums[0], kTileBytes);
  _tile_stored(1, sums[1], kTileBytes);
  _tile_stored(2, sums[2], kTileBytes);
  _tile_stored(3, sums[3], kTileBytes);
}

// One super-block's tile sums for `tokens` tokens (at most 16) and `rows` rows (at most 16, more
// left alone): T = 65536 hh + 256 (hl + lh) + ll, exact in double, and products[t *
// product_stride + r] += T * (d[r] * s_t), with s_t = scales[t * scale_stride].
VISIKV_AMX_ATTR inline void add_tile_totals(const int32_t (&sums)[4][kTile][kTile], int64_t tokens,
                                            const float* scales, int64_t scale_stride,
                                            const float* d, int64_t rows, double* products,
                                            int64_t product_stride) {
  for (int64_t t = 0; t < tokens; ++t) {
    const __m512d activation_scale = _mm512_set1_pd(scales[t * scale_stride]);
    double* out = products + t * product_stride;
    for (int h = 0; h < 2; ++h) {
      const int64_t count = std::clamp<int64_t>(rows - 8 * h, 0, 8);
      if (count == 0) break;
      const __mmask8 mask = static_cast<__mmask8>((1u << count) - 1);
      // hl + lh is exact in int32 (each at most 256 * 128 * 255 in magnitude).
      const __m512d cross = _mm512_cvtepi32_pd(_mm256_add_epi32(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(&sums[1][t][8 * h])),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(&sums[2][t][8 * h]))));
      const __m512d total = _mm512_fmadd_pd(
          to_double(&sums[0][t][8 * h]), _mm512_set1_pd(65536.0),
          _mm512_fmadd_pd(cross, _mm512_set1_pd(256.0), to_double(&sums[3][t][8 * h])));
      const __m512d row_d = _mm512_cvtps_pd(_mm256_loadu_ps(d + 8 * h));
      const __m512d p = _mm512_maskz_loadu_pd(mask, out + 8 * h);
      _mm512_mask_storeu_pd(out + 8 * h, mask,
                            _mm512_fmadd_pd(total, _mm512_mul_pd(row_d, activation_scale), p));
    }
  }
}

VISIKV_AMX_ATTR void run(const SuperBlockStep& s) {
  configure_tiles();
  const int64_t row_tiles = padded_rows(s.rows) / kTile;
  const int64_t padded = row_tiles * kTile;
  const int64_t value_steps = s.blocks * kStepsPerBlock;  // 64 values each
  // Grows to the largest call and is then reused.
  thread_local std::vector<uint8_t, CacheAlignedAllocator<uint8_t>> weight_buffer;
  const size_t weight_bytes = static_cast<size_t>(2 * row_tiles * value_steps * kTileSize);
  if (weight_buffer.size() < weight_bytes) weight_buffer.resize(weight_bytes);
  // Weight tiles of row tile rt and value step q: high at weight_tiles + (2 (rt * value_steps + q))
  // tiles, low one tile after.
  uint8_t* weight_tiles = weight_buffer.data();
  for (int64_t rt = 0; rt < row_tiles; ++rt)
    for (int64_t q = 0; q < value_steps; ++q) {
      uint8_t* tile = weight_tiles + 2 * (rt * value_steps + q) * kTileSize;
      pack_weight_tiles(s.weights + rt * kTile * s.weight_stride + q * kTileBytes, s.weight_stride,
                        s.rows - rt * kTile, tile, tile + kTileSize);
    }
  alignas(64) int32_t sums[4][kTile][kTile];  // token, row
  // A block's weight tiles (8 KB) stay in L1 while every tile of tokens passes over them; each
  // (token, row) pair still meets the blocks in order.
  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    const int64_t r0 = rt * kTile;
    for (int64_t b = 0; b < s.blocks; ++b) {
      for (int64_t t0 = 0; t0 < s.tokens; t0 += kTile) {
        const int64_t tile_tokens = std::min<int64_t>(kTile, s.tokens - t0);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int q = 0; q < kStepsPerBlock; ++q) {
          const int64_t value = b * kBlockValues + q * kTileBytes;
          const uint8_t* tile =
              weight_tiles + 2 * (rt * value_steps + b * kStepsPerBlock + q) * kTileSize;
          _tile_loadd(4, s.high + t0 * s.activation_stride + value, s.activation_stride);
          _tile_loadd(5, s.low + t0 * s.activation_stride + value, s.activation_stride);
          _tile_loadd(6, tile, kTileBytes);
          _tile_loadd(7, tile + kTileSize, kTileBytes);
          if (t0 + kTile < s.tokens)
            for (int i = 0; i < kTile; ++i) {
              const int64_t next = (t0 + kTile + i) * s.activation_stride + value;
              _mm_prefetch(reinterpret_cast<const char*>(s.high + next), _MM_HINT_T0);
              _mm_prefetch(reinterpret_cast<const char*>(s.low + next), _MM_HINT_T0);
            }
          _tile_dpbssd(0, 4, 6);  // xh · wh
          _tile_dpbsud(1, 4, 7);  // xh · wl
          _tile_dpbusd(2, 5, 6);  // xl · wh
          _tile_dpbuud(3, 5, 7);  // xl · wl
        }
        store_sums(sums);
        add_tile_totals(sums, tile_tokens, s.scales + t0 * s.scale_stride + b, s.scale_stride,
                        s.d + b * padded + r0, s.rows - r0, s.products + t0 * s.rows + r0, s.rows);
      }
    }
  }
}

VISIKV_AMX_ATTR void release_tiles() { _tile_release(); }

// --- blocks of 32
// ---------------------------------------------------------------------------------

template <DType kType>
constexpr PackedLayout kLayout = packed_layout(kType);

VISIKV_AMX_ATTR inline __m256i load_256(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Chunk c's nibbles as 16-bit lanes 2r + k: `low` values 4c + k, `high` values 4c + 2 + k of
// row r (their low four bits).
VISIKV_AMX_ATTR inline void nibble_pairs(const uint8_t* block, int c, __m512i& low, __m512i& high) {
  const __m512i bytes = _mm512_cvtepu8_epi16(load_256(block + 32 * c));
  low = _mm512_and_si512(bytes, _mm512_set1_epi16(0x0F));
  high = _mm512_srli_epi16(bytes, 4);
}

// Chunk c of a packed block of 4- or 5-bit codes as 16-bit lanes 2r + k: `low` values 4c + k,
// `high` values 4c + 2 + k of row r.
template <DType kType>
VISIKV_AMX_ATTR inline void code_pairs(const uint8_t* block, int c, __m512i& low, __m512i& high) {
  nibble_pairs(block, c, low, high);
  if constexpr (kLayout<kType>.fifth_bytes != 0) {
    uint32_t masks[2];
    std::memcpy(masks, block + 256 + 8 * c, 8);
    const __m512i sixteen = _mm512_set1_epi16(16);
    low = _mm512_mask_add_epi16(low, masks[0], low, sixteen);
    high = _mm512_mask_add_epi16(high, masks[1], high, sixteen);
  }
}

// Chunk c of Q8_0's packed codes as 16-bit lanes 2r + k (values 2c + k of row r).
VISIKV_AMX_ATTR inline __m512i byte_pairs(const uint8_t* block, int c) {
  return _mm512_cvtepi8_epi16(load_256(block + 32 * c));
}

// Two 16-bit activation codes in every 32-bit lane.
VISIKV_AMX_ATTR inline __m512i code_pair(const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, 4);
  return _mm512_set1_epi32(pair);
}

// The 16 rows' d and m of a packed block.
template <DType kType>
VISIKV_AMX_ATTR inline void block_scales(const uint8_t* block, __m512& d, __m512& m) {
  constexpr PackedLayout layout = kLayout<kType>;
  d = _mm512_cvtph_ps(load_256(block + layout.scales_at()));
  m = layout.has_min ? _mm512_cvtph_ps(load_256(block + layout.scales_at() + 32))
                     : _mm512_setzero_ps();
}

// The definition's step for one block (amx_products.h), sixteen rows of one token at a time: both
// engines take it, so that they give the same bits. `sums` are the block's integer sums of the
// codes q; `code_sum` is the block's sum of activation codes X_b and `scaled_sum` X_b s_b.
template <DType kType>
VISIKV_AMX_ATTR inline __m512 add_block(__m512i sums, __m512 d, __m512 m, float scale,
                                        int32_t code_sum, float scaled_sum, __m512 acc) {
  constexpr PackedLayout layout = kLayout<kType>;
  if constexpr (layout.code_offset != 0)  // sum (q - o) x = sum q x - o X, exactly
    sums = _mm512_sub_epi32(sums, _mm512_set1_epi32(layout.code_offset * code_sum));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(d, _mm512_set1_ps(scale)), acc);
  if constexpr (layout.has_min) acc = _mm512_fmadd_ps(m, _mm512_set1_ps(scaled_sum), acc);
  return acc;
}

// Sixteen rows' outputs, fewer at the matrix's end.
VISIKV_AMX_ATTR inline void store_rows(float* y, __m512 v, int64_t rows) {
  _mm512_mask_storeu_ps(y, rows >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << rows) - 1), v);
}

// Decode: kTiles tiles of 16 rows from `tile0` times kTokens tokens. Lane r of a sum accumulates
// row r's products of the block, two value pairs at a time (VNNI's vpdpwssd), in two chains (even
// and odd chunks) per row tile and token.
template <DType kType, int kTiles, int kTokens>
VISIKV_AMX_ATTR void vector_products(const PackedRows& w, int64_t tile0, const Int16Activations& x,
                                     int64_t first, float* y, int64_t y_stride) {
  constexpr PackedLayout layout = kLayout<kType>;
  // Into L2, 16 KB ahead, as the stored-layout kernels (weight_kernels.cpp PrefetchAhead).
  constexpr int64_t kPrefetchBytes = 16384;
  const int64_t n = x.elements, blocks = n / 32;
  const uint8_t* tiles[kTiles];
  for (int i = 0; i < kTiles; ++i) tiles[i] = w.data.data() + (tile0 + i) * w.tile_bytes();
  const int16_t* codes[kTokens];
  const float* scales[kTokens];
  const int32_t* code_sums[kTokens];
  const float* scaled_sums[kTokens];
  for (int t = 0; t < kTokens; ++t) {
    codes[t] = x.codes.data() + (first + t) * n;
    scales[t] = x.scales.data() + (first + t) * blocks;
    code_sums[t] = x.block_sums.data() + (first + t) * blocks;
    scaled_sums[t] = x.scaled_block_sums.data() + (first + t) * blocks;
  }
  __m512 acc[kTiles][kTokens];
  for (auto& row : acc)
    for (__m512& a : row) a = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i even[kTiles][kTokens], odd[kTiles][kTokens];
    const uint8_t* block[kTiles];
    for (int i = 0; i < kTiles; ++i) {
      block[i] = tiles[i] + b * layout.block_bytes();
      for (int line = 0; line < layout.block_bytes(); line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(block[i] + kPrefetchBytes + line), _MM_HINT_T1);
      for (int t = 0; t < kTokens; ++t) even[i][t] = odd[i][t] = _mm512_setzero_si512();
    }
    const int16_t* xb[kTokens];
    for (int t = 0; t < kTokens; ++t) xb[t] = codes[t] + 32 * b;
    if constexpr (layout.code_bytes == 256) {
      for (int c = 0; c < 8; ++c) {
        __m512i low[kTiles], high[kTiles];
        for (int i = 0; i < kTiles; ++i) code_pairs<kType>(block[i], c, low[i], high[i]);
        for (int t = 0; t < kTokens; ++t) {
          const __m512i x_low = code_pair(xb[t] + 4 * c), x_high = code_pair(xb[t] + 4 * c + 2);
          for (int i = 0; i < kTiles; ++i) {
            even[i][t] = _mm512_dpwssd_epi32(even[i][t], low[i], x_low);
            odd[i][t] = _mm512_dpwssd_epi32(odd[i][t], high[i], x_high);
          }
        }
      }
    } else {
      for (int c = 0; c < 16; c += 2) {
        __m512i w_even[kTiles], w_odd[kTiles];
        for (int i = 0; i < kTiles; ++i) {
          w_even[i] = byte_pairs(block[i], c);
          w_odd[i] = byte_pairs(block[i], c + 1);
        }
        for (int t = 0; t < kTokens; ++t) {
          const __m512i x_even = code_pair(xb[t] + 2 * c), x_odd = code_pair(xb[t] + 2 * c + 2);
          for (int i = 0; i < kTiles; ++i) {
            even[i][t] = _mm512_dpwssd_epi32(even[i][t], w_even[i], x_even);
            odd[i][t] = _mm512_dpwssd_epi32(odd[i][t], w_odd[i], x_odd);
          }
        }
      }
    }
    for (int i = 0; i < kTiles; ++i) {
      __m512 d, m;
      block_scales<kType>(block[i], d, m);
      for (int t = 0; t < kTokens; ++t)
        acc[i][t] = add_block<kType>(_mm512_add_epi32(even[i][t], odd[i][t]), d, m, scales[t][b],
                                     code_sums[t][b], scaled_sums[t][b], acc[i][t]);
    }
  }
  for (int i = 0; i < kTiles; ++i)
    for (int t = 0; t < kTokens; ++t)
      store_rows(y + t * y_stride + 16 * i, acc[i][t], w.rows - (tile0 + i) * 16);
}

// Palette 1 for blocks of 32: tiles 0-3 two blocks' sums with the activations' high and low
// bytes (16 tokens x 16 rows of int32), 4-5 those bytes (16 tokens x 32), 6-7 the two blocks'
// weights (8 groups of 4 values x 16 rows).
constexpr TileConfig kBlockTiles =
    with_tiles(with_tiles(with_tiles(TileConfig{}, 0, 4, kTile, kTileBytes), 4, 6, kTile, 32), 6, 8,
               8, kTileBytes);

VISIKV_AMX_ATTR void configure_block_tiles() { load_tile_config(kBlockTiles); }

// A packed block in the tile layout (VNNI): row j of the 512 bytes holds values 4j .. 4j + 3 of
// each of the 16 rows (bytes 4r .. 4r + 3).
// Units r of 16 bits (bytes 2r and 2r + 1) of `low` and `high` as bytes 4r .. 4r + 3.
VISIKV_AMX_ATTR inline __m512i interleave_pairs(__m256i low, __m256i high) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(low),
                         _mm512_slli_epi32(_mm512_cvtepu16_epi32(high), 16));
}

template <DType kType>
VISIKV_AMX_ATTR void weight_tile(const uint8_t* block, uint8_t* out) {
  if constexpr (kLayout<kType>.code_bytes == 256) {
    for (int c = 0; c < 8; ++c) {
      __m512i low, high;
      code_pairs<kType>(block, c, low, high);
      _mm512_store_si512(out + 64 * c,
                         interleave_pairs(_mm512_cvtepi16_epi8(low), _mm512_cvtepi16_epi8(high)));
    }
  } else {
    for (int j = 0; j < 8; ++j)
      _mm512_store_si512(out + 64 * j,
                         interleave_pairs(load_256(block + 64 * j), load_256(block + 64 * j + 32)));
  }
}

// Prefill: one tile of 16 rows times every token, 16 tokens at a time; the block's weight tile is
// unpacked once per call, and each (token, row) meets the blocks in order.
template <DType kType>
VISIKV_AMX_ATTR void tile_products(const PackedRows& w, int64_t tile, const Int16Activations& x,
                                   int64_t first, int64_t tokens, float* y, int64_t y_stride) {
  constexpr PackedLayout layout = kLayout<kType>;
  constexpr int kWeightTileBytes = 512;
  const int64_t n = x.elements, blocks = n / 32;
  thread_local std::vector<uint8_t, CacheAlignedAllocator<uint8_t>> weight_buffer;
  if (weight_buffer.size() < static_cast<size_t>(blocks * kWeightTileBytes))
    weight_buffer.resize(static_cast<size_t>(blocks * kWeightTileBytes));
  uint8_t* weights = weight_buffer.data();
  const uint8_t* packed = w.data.data() + tile * w.tile_bytes();
  for (int64_t b = 0; b < blocks; ++b)
    weight_tile<kType>(packed + b * layout.block_bytes(), weights + b * kWeightTileBytes);
  const int64_t rows = w.rows - tile * 16;
  alignas(64) int32_t sums[4][kTile][kTile];  // (high, low bytes) x 2 blocks; token, row
  // A tile of tokens from t0: whole ones with a constant count, so that the 16 outputs stay in
  // registers.
  const auto token_tile = [&](auto whole, int64_t t0) VISIKV_AMX_ATTR {
    const int64_t count = decltype(whole)::value ? kTile : std::min<int64_t>(kTile, tokens - t0);
    const int8_t* high = x.tile_high.data() + (first + t0) * n;
    const uint8_t* low = x.tile_low.data() + (first + t0) * n;
    const float* scales = x.scales.data() + (first + t0) * blocks;
    const int32_t* code_sums = x.block_sums.data() + (first + t0) * blocks;
    const float* scaled_sums = x.scaled_block_sums.data() + (first + t0) * blocks;
    __m512 acc[kTile];
    for (__m512& a : acc) a = _mm512_setzero_ps();
    // Block b's sums onto the outputs.
    const auto add = [&](int64_t b, const int32_t(*high_sums)[kTile],
                         const int32_t(*low_sums)[kTile]) VISIKV_AMX_ATTR {
      __m512 d, m;
      block_scales<kType>(packed + b * layout.block_bytes(), d, m);
#pragma GCC unroll 16
      for (int64_t t = 0; t < count; ++t) {
        const __m512i total = _mm512_add_epi32(
            _mm512_slli_epi32(_mm512_load_si512(high_sums[t]), 8), _mm512_load_si512(low_sums[t]));
        acc[t] = add_block<kType>(total, d, m, scales[t * blocks + b], code_sums[t * blocks + b],
                                  scaled_sums[t * blocks + b], acc[t]);
      }
    };
    // Blocks in pairs, each with sums tiles of its own (0-1, 2-3), so that the second block's
    // products run while the first's sums are scaled.
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(4, high + 32 * b, n);
      _tile_loadd(5, low + 32 * b, n);
      _tile_loadd(6, weights + b * kWeightTileBytes, kTileBytes);
      _tile_loadd(7, weights + (b + 1) * kWeightTileBytes, kTileBytes);
      _tile_dpbssd(0, 4, 6);  // xh · q (q below 128: signed as well)
      _tile_dpbusd(1, 5, 6);  // xl · q
      _tile_loadd(4, high + 32 * (b + 1), n);
      _tile_loadd(5, low + 32 * (b + 1), n);
      _tile_dpbssd(2, 4, 7);
      _tile_dpbusd(3, 5, 7);
      _tile_stored(0, sums[0], kTileBytes);
      _tile_stored(1, sums[1], kTileBytes);
      _tile_stored(2, sums[2], kTileBytes);
      _tile_stored(3, sums[3], kTileBytes);
      add(b, sums[0], sums[1]);
      add(b + 1, sums[2], sums[3]);
    }
    if (b < blocks) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_loadd(4, high + 32 * b, n);
      _tile_loadd(5, low + 32 * b, n);
      _tile_loadd(6, weights + b * kWeightTileBytes, kTileBytes);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbusd(1, 5, 6);
      _tile_stored(0, sums[0], kTileBytes);
      _tile_stored(1, sums[1], kTileBytes);
      add(b, sums[0], sums[1]);
    }
    for (int64_t t = 0; t < count; ++t) store_rows(y + (t0 + t) * y_stride, acc[t], rows);
  };
  for (int64_t t0 = 0; t0 < tokens; t0 += kTile) {
    if (t0 + kTile <= tokens)
      token_tile(std::true_type{}, t0);
    else
      token_tile(std::false_type{}, t0);
  }
}

// --- Q4_K and Q6_K -------------------------------------------------------------------------------

template <DType kType>
constexpr SuperLayout kSuper = super_layout(kType);

// Lane r: the lane of row r in the lane order (a permutation's indices from lanes to rows).
alignas(64) constexpr auto kLaneOfRow = [] {
  std::array<int32_t, 16> lanes{};
  for (int r = 0; r < 16; ++r) lanes[r] = lane_of_row(r);
  return lanes;
}();

// Chunk c of a packed super-block's codes as 16-bit lanes 2r + k (`low`: values 4c + k, `high`:
// values 4c + 2 + k of row r): Q4_K's q, Q6_K's q - 32.
template <DType kType>
VISIKV_AMX_ATTR inline void super_code_pairs(const uint8_t* block, int c, __m512i& low,
                                             __m512i& high) {
  nibble_pairs(block, c, low, high);
  if constexpr (kType == DType::Q6_K) {
    uint32_t masks[4];
    std::memcpy(masks, block + kSuper<kType>.masks_at + 16 * c, 16);
    const __m512i sixteen = _mm512_set1_epi16(16), thirty_two = _mm512_set1_epi16(32);
    low = _mm512_mask_add_epi16(low, masks[0], low, sixteen);
    high = _mm512_mask_add_epi16(high, masks[1], high, sixteen);
    low = _mm512_mask_sub_epi16(low, masks[2], low, thirty_two);
    high = _mm512_mask_sub_epi16(high, masks[3], high, thirty_two);
  }
}

// The 16 rows' sums of a group (lane r: row r) times its scales (8 bytes for the even rows, then
// 8 for the odd ones, at `scales`), exact in 64 bits, onto the even and odd rows' totals.
template <DType kType>
VISIKV_AMX_ATTR inline void add_scaled_sums(__m512i sums, const uint8_t* scales, __m512i& even,
                                            __m512i& odd) {
  const __m128i even_bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales));
  const __m128i odd_bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + 8));
  const bool is_signed = kType == DType::Q6_K;
  const __m512i even_scales =
      is_signed ? _mm512_cvtepi8_epi64(even_bytes) : _mm512_cvtepu8_epi64(even_bytes);
  const __m512i odd_scales =
      is_signed ? _mm512_cvtepi8_epi64(odd_bytes) : _mm512_cvtepu8_epi64(odd_bytes);
  even = _mm512_add_epi64(even, _mm512_mul_epi32(sums, even_scales));
  odd = _mm512_add_epi64(odd,
                         _mm512_mul_epi32(_mm512_shuffle_epi32(sums, _MM_PERM_CDAB), odd_scales));
}

// A group's scales (lane order, at `scales`) as row r's scale in 16-bit lanes 2r and 2r + 1.
template <DType kType>
VISIKV_AMX_ATTR inline __m512i row_scale_pairs(const uint8_t* scales) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales));
  const __m512i lanes =
      kType == DType::Q6_K ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
  const __m512i rows = _mm512_permutexvar_epi32(_mm512_load_si512(kLaneOfRow.data()), lanes);
  return _mm512_or_si512(_mm512_and_si512(rows, _mm512_set1_epi32(0xFFFF)),
                         _mm512_slli_epi32(rows, 16));
}

// A Q4_K block's -dmin of the 16 rows (lane order).
VISIKV_AMX_ATTR inline __m512 negated_dmin(const uint8_t* block) {
  return _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtph_ps(load_256(block + kQ4KLayout.dmin_at)));
}

// Q4_K's sub-block j offsets -dmin m_j of the 16 rows, exact in float (lane order).
VISIKV_AMX_ATTR inline __m512 sub_block_offsets(const uint8_t* block, __m512 neg_dmin, int j) {
  const __m512i mins = _mm512_cvtepu8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + kQ4KLayout.mins_at + 16 * j)));
  return _mm512_mul_ps(neg_dmin, _mm512_cvtepi32_ps(mins));
}

// The 16 groups' offsets sums (lane order) added by halves, as the stored rows' kernels add their
// lanes (weight_kernels.cpp HalvingSum): group g with g + 8, then + 4, + 2, + 1.
VISIKV_AMX_ATTR inline __m512 halving_sum(const __m512 (&groups)[16]) {
  __m512 half[8];
  for (int g = 0; g < 8; ++g) half[g] = _mm512_add_ps(groups[g], groups[g + 8]);
  for (int g = 0; g < 4; ++g) half[g] = _mm512_add_ps(half[g], half[g + 4]);
  for (int g = 0; g < 2; ++g) half[g] = _mm512_add_ps(half[g], half[g + 2]);
  return _mm512_add_ps(half[0], half[1]);
}

// The outputs of 16 rows from their products terms P (rows 0-7 and 8-15, in double): float(P),
// or with Q4_K's offsets (lane order) float(P + offsets).
VISIKV_AMX_ATTR inline __m512 super_outputs(__m512d rows_low, __m512d rows_high) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(rows_low)),
                            _mm512_cvtpd_ps(rows_high), 1);
}
VISIKV_AMX_ATTR inline __m512 super_outputs(__m512d rows_low, __m512d rows_high, __m512 offsets) {
  const __m512 o = _mm512_permutexvar_ps(_mm512_load_si512(kLaneOfRow.data()), offsets);
  return super_outputs(_mm512_add_pd(rows_low, _mm512_cvtps_pd(_mm512_castps512_ps256(o))),
                       _mm512_add_pd(rows_high, _mm512_cvtps_pd(_mm512_extractf32x8_ps(o, 1))));
}

// Decode: kTiles tiles of 16 rows times kTokens tokens. Each group's sums of codes times
// activation codes (in two chains, as for the blocks of 32) are scaled into the rows' 64-bit totals
// T; each super-block adds T (d s) to the rows' products terms in double, and Q4_K's offsets to
// its 16 groups' sums.
template <DType kType, int kTiles, int kTokens>
VISIKV_AMX_ATTR void super_vector_products(const PackedRows& w, int64_t tile0,
                                           const Int16Activations& x, int64_t first, float* y,
                                           int64_t y_stride) {
  constexpr SuperLayout layout = kSuper<kType>;
  constexpr bool kOffsets = layout.mins_at != 0;
  constexpr int kGroups = 256 / layout.group_values, kGroupChunks = layout.group_values / 4;
  constexpr int64_t kPrefetchBytes = 32768;
  const int64_t n = x.elements, blocks = n / 256;
  const uint8_t* tiles[kTiles];
  for (int i = 0; i < kTiles; ++i) tiles[i] = w.data.data() + (tile0 + i) * w.tile_bytes();
  const int16_t* codes[kTokens];
  const float* group_sums[kTokens];
  for (int t = 0; t < kTokens; ++t) {
    codes[t] = x.codes.data() + (first + t) * n;
    group_sums[t] = x.sums16.data() + (first + t) * (n / 16);
  }
  __m512d even_products[kTiles][kTokens], odd_products[kTiles][kTokens];
  __m512 offsets[kTiles][kTokens][kOffsets ? 16 : 1];
  for (int i = 0; i < kTiles; ++i)
    for (int t = 0; t < kTokens; ++t) {
      even_products[i][t] = odd_products[i][t] = _mm512_setzero_pd();
      for (__m512& o : offsets[i][t]) o = _mm512_setzero_ps();
    }
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block[kTiles];
    __m512i even_totals[kTiles][kTokens], odd_totals[kTiles][kTokens];
    for (int i = 0; i < kTiles; ++i) {
      block[i] = tiles[i] + b * layout.bytes;
      for (int t = 0; t < kTokens; ++t)
        even_totals[i][t] = odd_totals[i][t] = _mm512_setzero_si512();
    }
    for (int j = 0; j < kGroups; ++j) {
      __m512i even[kTiles][kTokens], odd[kTiles][kTokens];
      for (int i = 0; i < kTiles; ++i)
        for (int t = 0; t < kTokens; ++t) even[i][t] = odd[i][t] = _mm512_setzero_si512();
      for (int c = kGroupChunks * j; c < kGroupChunks * (j + 1); ++c) {
        __m512i low[kTiles], high[kTiles];
        for (int i = 0; i < kTiles; ++i) {
          // One line ahead per chunk: a burst of the whole block's prefetches at its start fills
          // the core's line fill buffers and stalls (measured on the 1.5B model's decode).
          if (64 * c < layout.bytes)
            _mm_prefetch(reinterpret_cast<const char*>(block[i] + kPrefetchBytes + 64 * c),
                         _MM_HINT_T1);
          super_code_pairs<kType>(block[i], c, low[i], high[i]);
        }
        for (int t = 0; t < kTokens; ++t) {
          const int16_t* xc = codes[t] + 256 * b + 4 * c;
          const __m512i x_low = code_pair(xc), x_high = code_pair(xc + 2);
          for (int i = 0; i < kTiles; ++i) {
            even[i][t] = _mm512_dpwssd_epi32(even[i][t], low[i], x_low);
            odd[i][t] = _mm512_dpwssd_epi32(odd[i][t], high[i], x_high);
          }
        }
      }
      for (int i = 0; i < kTiles; ++i)
        for (int t = 0; t < kTokens; ++t)
          add_scaled_sums<kType>(_mm512_add_epi32(even[i][t], odd[i][t]),
                                 block[i] + layout.scales_at + 16 * j, even_totals[i][t],
                                 odd_totals[i][t]);
    }
    for (int i = 0; i < kTiles; ++i) {
      const __m512 d = _mm512_cvtph_ps(load_256(block[i] + layout.d_at));
      const __m512d even_d = _mm512_cvtps_pd(_mm512_castps512_ps256(d));
      const __m512d odd_d = _mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1));
      for (int t = 0; t < kTokens; ++t) {
        const __m512d scale = _mm512_set1_pd(x.scales[(first + t) * blocks + b]);
        even_products[i][t] = _mm512_fmadd_pd(_mm512_cvtepi64_pd(even_totals[i][t]),
                                              _mm512_mul_pd(even_d, scale), even_products[i][t]);
        odd_products[i][t] = _mm512_fmadd_pd(_mm512_cvtepi64_pd(odd_totals[i][t]),
                                             _mm512_mul_pd(odd_d, scale), odd_products[i][t]);
      }
      if constexpr (kOffsets) {
        const __m512 neg_dmin = negated_dmin(block[i]);
        for (int j = 0; j < 8; ++j) {
          const __m512 offset = sub_block_offsets(block[i], neg_dmin, j);
          for (int t = 0; t < kTokens; ++t) {
            const float* sums = group_sums[t] + 16 * b + 2 * j;
            offsets[i][t][2 * j] =
                _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[0]), offsets[i][t][2 * j]);
            offsets[i][t][2 * j + 1] =
                _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[1]), offsets[i][t][2 * j + 1]);
          }
        }
      }
    }
  }
  // Rows 0-7 and 8-15 from the even and odd rows' lanes.
  alignas(64) static constexpr int64_t kLowRows[8] = {0, 8, 1, 9, 2, 10, 3, 11};
  alignas(64) static constexpr int64_t kHighRows[8] = {4, 12, 5, 13, 6, 14, 7, 15};
  for (int i = 0; i < kTiles; ++i)
    for (int t = 0; t < kTokens; ++t) {
      const __m512d low = _mm512_permutex2var_pd(even_products[i][t], _mm512_load_si512(kLowRows),
                                                 odd_products[i][t]);
      const __m512d high = _mm512_permutex2var_pd(even_products[i][t], _mm512_load_si512(kHighRows),
                                                  odd_products[i][t]);
      __m512 out;
      if constexpr (kOffsets)
        out = super_outputs(low, high, halving_sum(offsets[i][t]));
      else
        out = super_outputs(low, high);
      store_rows(y + t * y_stride + 16 * i, out, w.rows - (tile0 + i) * 16);
    }
}

// Prefill: `tiles` tiles of 16 rows times every token. The blocks go in slices whose activation
// bytes of every token stay in L2 while each row tile passes over them (a 1536 x 8960 matrix's
// 256 tokens take 4.6 MB, which the row tiles would otherwise each read again from L3). Block by
// block, a row tile's weight tiles (scale times code, split into high and low bytes, in the VNNI
// layout) are made once and every tile of 16 tokens passes over them, its totals added to the
// products terms in memory; then each token's Q4_K offsets meet the blocks in order, in registers.
// Each (token, row) pair meets the blocks in order.
template <DType kType>
VISIKV_AMX_ATTR void super_tile_products(const PackedRows& w, int64_t tile0, int64_t tiles,
                                         const Int16Activations& x, int64_t first, int64_t tokens,
                                         float* y, int64_t y_stride) {
  constexpr SuperLayout layout = kSuper<kType>;
  constexpr bool kOffsets = layout.mins_at != 0;
  constexpr int kGroups = 256 / layout.group_values, kGroupChunks = layout.group_values / 4;
  constexpr int64_t kSliceActivationBytes = 512 << 10;
  const int64_t n = x.elements, blocks = n / 256;
  // Two bytes (high and low) a value.
  const int64_t slice_blocks =
      std::clamp<int64_t>(kSliceActivationBytes / (tokens * 2 * 256), 1, blocks);
  thread_local std::vector<double, CacheAlignedAllocator<double>> products_buffer;
  thread_local std::vector<float, CacheAlignedAllocator<float>> offsets_buffer;
  const auto product_values = static_cast<size_t>(tiles * tokens * 16);
  const auto offset_values = static_cast<size_t>(tiles * blocks * 8 * 16);
  if (products_buffer.size() < product_values) products_buffer.resize(product_values);
  if (kOffsets && offsets_buffer.size() < offset_values) offsets_buffer.resize(offset_values);
  // Row tile i: token t, row r at products[(i tokens + t) 16 + r]; block b, sub-block j: 16 lanes
  // at block_offsets[((i blocks + b) 8 + j) 16].
  double* products = products_buffer.data();
  float* block_offsets = offsets_buffer.data();
  std::fill(products, products + product_values, 0.0);
  alignas(64) uint8_t weight_tiles[kStepsPerBlock][2][kTileSize];  // step; high, low bytes
  alignas(64) int32_t sums[4][kTile][kTile];
  alignas(64) float row_d[16];
  const uint8_t* packed = w.data.data() + tile0 * w.tile_bytes();
  const int64_t token_tiles = (tokens + kTile - 1) / kTile;
  constexpr int kBlockLines = (layout.bytes + 63) / 64;
  for (int64_t slice = 0; slice < blocks; slice += slice_blocks) {
    const int64_t slice_end = std::min(blocks, slice + slice_blocks);
    for (int64_t i = 0; i < tiles; ++i) {
      const int64_t rows = std::min<int64_t>(16, w.rows - (tile0 + i) * 16);
      double* tile_products = products + i * tokens * 16;
      for (int64_t b = slice; b < slice_end; ++b) {
        const uint8_t* block = packed + i * w.tile_bytes() + b * layout.bytes;
        // The (row tile, block) run after this one: the slice's next block, else the next row
        // tile's first of the slice, else the first row tile's first of the next slice (none
        // after the last).
        int64_t next_i = i, next_b = b + 1;
        if (next_b == slice_end) {
          next_i = i + 1 < tiles ? i + 1 : 0;
          next_b = i + 1 < tiles ? slice : slice_end;
        }
        const uint8_t* next_block =
            next_b < blocks ? packed + next_i * w.tile_bytes() + next_b * layout.bytes : nullptr;
        for (int j = 0; j < kGroups; ++j) {
          const __m512i scale = row_scale_pairs<kType>(block + layout.scales_at + 16 * j);
          for (int c = kGroupChunks * j; c < kGroupChunks * (j + 1); ++c) {
            __m512i low, high;
            super_code_pairs<kType>(block, c, low, high);
            low = _mm512_mullo_epi16(low, scale);
            high = _mm512_mullo_epi16(high, scale);
            uint8_t* tile_row = weight_tiles[c / 16][0] + (c % 16) * kTileBytes;
            _mm512_store_si512(tile_row,
                               interleave_pairs(_mm512_cvtepi16_epi8(_mm512_srai_epi16(low, 8)),
                                                _mm512_cvtepi16_epi8(_mm512_srai_epi16(high, 8))));
            _mm512_store_si512(tile_row + kTileSize, interleave_pairs(_mm512_cvtepi16_epi8(low),
                                                                      _mm512_cvtepi16_epi8(high)));
          }
        }
        if constexpr (kOffsets) {
          const __m512 neg_dmin = negated_dmin(block);
          for (int j = 0; j < 8; ++j)
            _mm512_store_ps(block_offsets + ((i * blocks + b) * 8 + j) * 16,
                            sub_block_offsets(block, neg_dmin, j));
        }
        _mm512_store_ps(row_d,
                        _mm512_permutexvar_ps(_mm512_load_si512(kLaneOfRow.data()),
                                              _mm512_cvtph_ps(load_256(block + layout.d_at))));
        for (int64_t t0 = 0; t0 < tokens; t0 += kTile) {
          // The next block's packed bytes into L2, a share per tile of tokens.
          if (next_block != nullptr)
            for (int64_t line = t0 / kTile * kBlockLines / token_tiles;
                 line < (t0 / kTile + 1) * kBlockLines / token_tiles; ++line)
              _mm_prefetch(reinterpret_cast<const char*>(next_block + 64 * line), _MM_HINT_T1);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int q = 0; q < kStepsPerBlock; ++q) {
            const int64_t at = (first + t0) * n + 256 * b + 64 * q;
            _tile_loadd(4, x.tile_high.data() + at, n);
            _tile_loadd(5, x.tile_low.data() + at, n);
            _tile_loadd(6, weight_tiles[q][0], kTileBytes);
            _tile_loadd(7, weight_tiles[q][1], kTileBytes);
            // The next tile of tokens' bytes of this step (after the last, the first tile's of
            // the next block) into L1 while these products run: a tile load of 16 lines from L2
            // otherwise waits on them (as in run()).
            const int64_t next = t0 + kTile < tokens     ? at + kTile * n
                                 : next_block != nullptr ? first * n + 256 * next_b + 64 * q
                                                         : -1;
            if (next >= 0)
              for (int k = 0; k < kTile; ++k) {
                _mm_prefetch(reinterpret_cast<const char*>(x.tile_high.data() + next + k * n),
                             _MM_HINT_T0);
                _mm_prefetch(reinterpret_cast<const char*>(x.tile_low.data() + next + k * n),
                             _MM_HINT_T0);
              }
            _tile_dpbssd(0, 4, 6);  // xh · wh
            _tile_dpbsud(1, 4, 7);  // xh · wl
            _tile_dpbusd(2, 5, 6);  // xl · wh
            _tile_dpbuud(3, 5, 7);  // xl · wl
          }
          store_sums(sums);
          add_tile_totals(sums, std::min<int64_t>(kTile, tokens - t0),
                          x.scales.data() + (first + t0) * blocks + b, blocks, row_d, rows,
                          tile_products + 16 * t0, 16);
        }
      }
    }
  }
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t rows = std::min<int64_t>(16, w.rows - (tile0 + i) * 16);
    const double* tile_products = products + i * tokens * 16;
    // (Q6_K has no offsets buffer.)
    const float* tile_offsets = kOffsets ? block_offsets + i * blocks * 8 * 16 : nullptr;
    for (int64_t t = 0; t < tokens; ++t) {
      const __m512d low = _mm512_load_pd(tile_products + 16 * t),
                    high = _mm512_load_pd(tile_products + 16 * t + 8);
      float* out = y + t * y_stride + 16 * i;
      if constexpr (!kOffsets) {
        store_rows(out, super_outputs(low, high), rows);
        continue;
      }
      const float* sums16 = x.sums16.data() + (first + t) * (n / 16);
      __m512 offsets[16];
      for (__m512& o : offsets) o = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b)
        for (int j = 0; j < 8; ++j) {
          const __m512 offset = _mm512_load_ps(tile_offsets + (8 * b + j) * 16);
          offsets[2 * j] =
              _mm512_fmadd_ps(offset, _mm512_set1_ps(sums16[16 * b + 2 * j]), offsets[2 * j]);
          offsets[2 * j + 1] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sums16[16 * b + 2 * j + 1]),
                                               offsets[2 * j + 1]);
        }
      store_rows(out, super_outputs(low, high, halving_sum(offsets)), rows);
    }
  }
}

// kTiles tiles of 16 rows times `tokens` tokens (at most 4) on vectors.
template <DType kType, int kTiles>
VISIKV_AMX_ATTR void vector_tokens(const PackedRows& w, int64_t tile0, const Int16Activations& x,
                                   int64_t first, int64_t tokens, float* y, int64_t y_stride) {
  const auto run = [&](auto token_count) VISIKV_AMX_ATTR {
    constexpr int kTokens = decltype(token_count)::value;
    if constexpr (is_super_type(kType))
      super_vector_products<kType, kTiles, kTokens>(w, tile0, x, first, y, y_stride);
    else
      vector_products<kType, kTiles, kTokens>(w, tile0, x, first, y, y_stride);
  };
  switch (tokens) {
    case 1:
      return run(std::integral_constant<int, 1>{});
    case 2:
      return run(std::integral_constant<int, 2>{});
    case 3:
      return run(std::integral_constant<int, 3>{});
    default:
      return run(std::integral_constant<int, 4>{});
  }
}

template <DType kType>
void packed_products_of(const PackedRows& w, int64_t first_tile, int64_t tiles,
                        const Int16Activations& x, int64_t first, int64_t tokens, float* y,
                        int64_t y_stride) {
  if (tokens > kVectorTokens) {
    if constexpr (is_super_type(kType))
      configure_tiles();
    else
      configure_block_tiles();
    if constexpr (is_super_type(kType))
      super_tile_products<kType>(w, first_tile, tiles, x, first, tokens, y, y_stride);
    else
      for (int64_t i = 0; i < tiles; ++i)
        tile_products<kType>(w, first_tile + i, x, first, tokens, y + 16 * i, y_stride);
    release_tiles();
    return;
  }
  int64_t i = 0;
  for (; i + 2 <= tiles; i += 2)
    vector_tokens<kType, 2>(w, first_tile + i, x, first, tokens, y + 16 * i, y_stride);
  if (i < tiles) vector_tokens<kType, 1>(w, first_tile + i, x, first, tokens, y + 16 * i, y_stride);
}

}  // namespace

void super_block_products(const SuperBlockStep& step) {
  run(step);
  // Tile data in use is saved and restored (8 KB) at every context switch of the thread until it
  // is released: each call leaves the tiles clean.
  release_tiles();
}

void packed_products(const PackedRows& w, int64_t first_tile, int64_t tiles,
                     const Int16Activations& x, int64_t first_token, int64_t tokens, float* y,
                     int64_t y_stride) {
  require(available(), "AMX tile products are not available on this CPU");
  if (is_super_type(w.type))
    require(x.block == 256 && x.elements == w.elements && x.has_tile_bytes() &&
                static_cast<int64_t>(x.sums16.size()) == x.tokens * x.elements / 16,
            "packed products need 16-bit activations of ", w.elements,
            " values in blocks of 256 with their tile bytes and group sums");
  else
    require(x.block == 32 && x.elements == w.elements && x.has_tile_bytes() &&
                static_cast<int64_t>(x.block_sums.size()) == x.tokens * x.elements / 32 &&
                x.scaled_block_sums.size() == x.block_sums.size(),
            "packed products need 16-bit activations of ", w.elements,
            " values in blocks of 32 with their tile bytes and block sums");
  require(first_tile >= 0 && tiles >= 0 && first_tile + tiles <= w.tiles() && first_token >= 0 &&
              tokens >= 0 && first_token + tokens <= x.tokens,
          "packed products: tiles or tokens out of range");
  const auto run_type = [&](auto type) {
    packed_products_of<decltype(type)::value>(w, first_tile, tiles, x, first_token, tokens, y,
                                              y_stride);
  };
  switch (w.type) {
    case DType::Q4_0:
      return run_type(std::integral_constant<DType, DType::Q4_0>{});
    case DType::Q4_1:
      return run_type(std::integral_constant<DType, DType::Q4_1>{});
    case DType::Q5_0:
      return run_type(std::integral_constant<DType, DType::Q5_0>{});
    case DType::Q5_1:
      return run_type(std::integral_constant<DType, DType::Q5_1>{});
    case DType::Q8_0:
      return run_type(std::integral_constant<DType, DType::Q8_0>{});
    case DType::Q4_K:
      return run_type(std::integral_constant<DType, DType::Q4_K>{});
    case DType::Q6_K:
      return run_type(std::integral_constant<DType, DType::Q6_K>{});
    default:
      fail("no packed products for ", dtype_name(w.type), " weights");
  }
}
#else
void super_block_products(const SuperBlockStep&) {
  fail("AMX tile products are not compiled for this platform");
}
void packed_products(const PackedRows&, int64_t, int64_t, const Int16Activations&, int64_t, int64_t,
                     float*, int64_t) {
  fail("AMX tile products are not compiled for this platform");
}
#endif

}  // namespace visikv::amx

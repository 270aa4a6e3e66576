#include "visikv/model/amx_products.h"

#include <algorithm>
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

}  // namespace

bool packs_rows(DType type) {
  return type == DType::Q4_0 || type == DType::Q4_1 || type == DType::Q5_0 || type == DType::Q5_1 ||
         type == DType::Q8_0;
}

PackedRows pack_rows(DType type, const std::byte* first_row, int64_t row_bytes, int64_t rows,
                     int64_t elements, const std::function<void(int64_t, int64_t)>& packed_slice) {
  constexpr int64_t kSliceTiles = 64;  // 1024 rows
  require(packs_rows(type), "no packed rows for ", dtype_name(type), " weights");
  require(elements % 32 == 0 && elements > 0 && rows > 0, "packed rows of ", rows, " x ", elements,
          " values (whole blocks of 32 needed)");
  const PackedLayout layout = packed_layout(type);
  PackedRows packed;
  packed.type = type;
  packed.rows = rows;
  packed.elements = elements;
  packed.block_bytes = layout.block_bytes();
  const int64_t blocks = elements / 32, stored_bytes = dtype_info(type).block_bytes;
  packed.data.assign(static_cast<size_t>(packed.tiles() * packed.tile_bytes()), 0);
  for (int64_t tile = 0; tile < packed.tiles(); ++tile) {
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* out = packed.data.data() + (tile * blocks + b) * packed.block_bytes;
      for (int r = 0; r < 16 && tile * 16 + r < rows; ++r) {
        const StoredBlock s =
            read_stored_block(type, reinterpret_cast<const uint8_t*>(first_row) +
                                        (tile * 16 + r) * row_bytes + b * stored_bytes);
        for (int k = 0; k < 2; ++k) {
          if (layout.code_bytes == 512) {
            for (int c = 0; c < 16; ++c)
              out[c * 32 + 2 * r + k] = static_cast<uint8_t>(s.q[2 * c + k]);
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
        _tile_stored(0, sums[0], kTileBytes);
        _tile_stored(1, sums[1], kTileBytes);
        _tile_stored(2, sums[2], kTileBytes);
        _tile_stored(3, sums[3], kTileBytes);
        // T = 65536 hh + 256 (hl + lh) + ll, exact in double; products += T * (d * s).
        for (int64_t t = 0; t < tile_tokens; ++t) {
          const __m512d activation_scale = _mm512_set1_pd(s.scales[(t0 + t) * s.scale_stride + b]);
          double* out = s.products + (t0 + t) * s.rows + r0;
          for (int h = 0; h < 2; ++h) {
            const int64_t count = std::clamp<int64_t>(s.rows - r0 - 8 * h, 0, 8);
            if (count == 0) break;
            const __mmask8 mask = static_cast<__mmask8>((1u << count) - 1);
            const __m512d cross =
                _mm512_add_pd(to_double(&sums[1][t][8 * h]), to_double(&sums[2][t][8 * h]));
            const __m512d total = _mm512_fmadd_pd(
                to_double(&sums[0][t][8 * h]), _mm512_set1_pd(65536.0),
                _mm512_fmadd_pd(cross, _mm512_set1_pd(256.0), to_double(&sums[3][t][8 * h])));
            const __m512d d = _mm512_cvtps_pd(_mm256_loadu_ps(s.d + b * padded + r0 + 8 * h));
            const __m512d p = _mm512_maskz_loadu_pd(mask, out + 8 * h);
            _mm512_mask_storeu_pd(out + 8 * h, mask,
                                  _mm512_fmadd_pd(total, _mm512_mul_pd(d, activation_scale), p));
          }
        }
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

// Chunk c of a packed block of 4- or 5-bit codes as 16-bit lanes 2r + k: `low` values 4c + k,
// `high` values 4c + 2 + k of row r.
template <DType kType>
VISIKV_AMX_ATTR inline void code_pairs(const uint8_t* block, int c, __m512i& low, __m512i& high) {
  const __m512i bytes = _mm512_cvtepu8_epi16(load_256(block + 32 * c));
  low = _mm512_and_si512(bytes, _mm512_set1_epi16(0x0F));
  high = _mm512_srli_epi16(bytes, 4);
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

template <DType kType, int kTiles>
VISIKV_AMX_ATTR void vector_tokens(const PackedRows& w, int64_t tile0, const Int16Activations& x,
                                   int64_t first, int64_t tokens, float* y, int64_t y_stride) {
  switch (tokens) {
    case 1:
      return vector_products<kType, kTiles, 1>(w, tile0, x, first, y, y_stride);
    case 2:
      return vector_products<kType, kTiles, 2>(w, tile0, x, first, y, y_stride);
    case 3:
      return vector_products<kType, kTiles, 3>(w, tile0, x, first, y, y_stride);
    default:
      return vector_products<kType, kTiles, 4>(w, tile0, x, first, y, y_stride);
  }
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

template <DType kType>
void packed_products_of(const PackedRows& w, int64_t first_tile, int64_t tiles,
                        const Int16Activations& x, int64_t first, int64_t tokens, float* y,
                        int64_t y_stride) {
  if (tokens > 4) {
    configure_block_tiles();
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

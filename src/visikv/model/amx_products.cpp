#include "visikv/model/amx_products.h"

#include <atomic>
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
                      (b & (1u << 31)) != 0;                          // F, DQ, BW, VL
  const bool tiles = (d & (1u << 24)) != 0 && (d & (1u << 25)) != 0;  // AMX-TILE, AMX-INT8
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

#if VISIKV_AMX_COMPILED
namespace {

#define VISIKV_AMX_ATTR \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,amx-tile,amx-int8")))

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

VISIKV_AMX_ATTR void configure_tiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.bytes_per_row[i] = kTileBytes;
    config.rows[i] = kTile;
  }
  _tile_loadconfig(&config);
}

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

}  // namespace

void super_block_products(const SuperBlockStep& step) {
  run(step);
  // Tile data in use is saved and restored (8 KB) at every context switch of the thread until it
  // is released: each call leaves the tiles clean.
  release_tiles();
}
#else
void super_block_products(const SuperBlockStep&) {
  fail("AMX tile products are not compiled for this platform");
}
#endif

}  // namespace visikv::amx

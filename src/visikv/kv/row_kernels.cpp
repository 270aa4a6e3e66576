// The kernels of row_kernels.h (and int_rows::decode_row), compiled once per instruction set by
// Highway's foreach_target and chosen at run time by HWY_DYNAMIC_DISPATCH.
//
// One body per operation, written against a *reader* (a small struct: where row p is, and how
// Lanes(d) consecutive elements of it read as floats): dense float32 / half / bfloat16 rows, and
// integer codes with per-channel or per-group parameters. With few queries (decode) a row is read
// in place, once per block of up to four queries; with many (a prefill tile of tokens) each block
// of rows is read once into floats and every query meets those.
#include "visikv/core/simd_targets.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "visikv/kv/row_kernels.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
// Highway's own headers must follow foreach_target.h.
#include <hwy/highway.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "visikv/core/half.h"
#include "visikv/core/vec-inl.h"
#include "visikv/core/vec.h"
#include "visikv/kv/int_row_codec.h"
#include "visikv/kv/row_kernels.h"

HWY_BEFORE_NAMESPACE();
namespace visikv::row_kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using vec::HWY_NAMESPACE::Fma;
using vec::HWY_NAMESPACE::kMaxFloatLanes;

using DF = hn::ScalableTag<float>;
using DF8 = hn::CappedTag<float, 8>;  // rows whose length is a multiple of 8 but not of Lanes(DF)

constexpr int kQueryBlock = 4;  // queries whose sums a row's pass keeps in registers

// ---- Unpacking codes ---------------------------------------------------------------------------

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
// Lane k of a run of N codes of kBits bits sits at bit k·kBits of the run's N·kBits / 8 bytes:
// its low byte at k·kBits / 8, the next byte too when the code straddles a byte boundary, then a
// right shift by k·kBits mod 8. The bytes are broadcast to every 128-bit block, so one in-block
// byte shuffle gathers each lane's (up to) two bytes.
template <int kBits, size_t N>
struct UnpackTable {
  alignas(64) uint8_t bytes[4 * N] = {};
  alignas(64) uint32_t shifts[N] = {};
  constexpr UnpackTable() {
    for (size_t k = 0; k < N; ++k) {
      const size_t bit = k * kBits, byte = bit / 8, shift = bit % 8;
      bytes[4 * k] = static_cast<uint8_t>(byte);
      bytes[4 * k + 1] = shift + kBits > 8 ? static_cast<uint8_t>(byte + 1) : uint8_t{0x80};
      bytes[4 * k + 2] = bytes[4 * k + 3] = 0x80;  // zeroed by the shuffle
      shifts[k] = static_cast<uint32_t>(shift);
    }
  }
};
template <int kBits, size_t N>
constexpr UnpackTable<kBits, N> kUnpackTable{};

// Codes [c, c + Lanes(d)) of the row whose codes start at `codes` (c a multiple of 8 here, where
// vectors hold 8 or 16 lanes), as floats. Reads exactly the run's bytes.
template <int kBits, class D>
HWY_INLINE hn::Vec<D> UnpackCodes(D d, const uint8_t* codes, int64_t c) {
  const uint8_t* packed = codes + c / 8 * kBits;
  constexpr size_t N = hn::MaxLanes(D());
  constexpr size_t kBytes = N * kBits / 8;
  static_assert(kBytes <= 16, "a run of codes fits one 128-bit block");
  const hn::RebindToUnsigned<D> du;
  const hn::RebindToSigned<D> di;
  const hn::Repartition<uint8_t, D> d8;
  const hn::Repartition<uint64_t, D> d64;
  hn::Vec<decltype(d8)> raw;
  if constexpr (kBytes == 16) {
    raw = hn::LoadDup128(d8, packed);
  } else {
    uint64_t word = 0;
    std::memcpy(&word, packed, kBytes);
    raw = hn::BitCast(d8, hn::Set(d64, word));
  }
  const UnpackTable<kBits, N>& table = kUnpackTable<kBits, N>;
  const auto gathered = hn::BitCast(du, hn::TableLookupBytesOr0(raw, hn::Load(d8, table.bytes)));
  const auto values =
      hn::And(gathered >> hn::Load(du, table.shifts), hn::Set(du, (1u << kBits) - 1));
  return hn::ConvertTo(d, hn::BitCast(di, values));
}
#else
// Portable targets (vectors of 1 or 4 lanes): one code at a time into an aligned block.
template <int kBits, class D>
HWY_INLINE hn::Vec<D> UnpackCodes(D d, const uint8_t* codes, int64_t c) {
  const int64_t n = static_cast<int64_t>(hn::Lanes(d));
  const std::span<const uint8_t> stream(codes,
                                        static_cast<size_t>(int_rows::packed_bytes(c + n, kBits)));
  HWY_ALIGN float lanes[kMaxFloatLanes];
  for (int64_t k = 0; k < n; ++k)
    lanes[k] = static_cast<float>(int_rows::code_at(stream, kBits, c + k));
  return hn::Load(d, lanes);
}
#endif

// ---- Readers ---------------------------------------------------------------------------------

// Every cache line of the `bytes` bytes at `p`, loaded ahead of their use.
HWY_INLINE void PrefetchBytes(const void* p, int64_t bytes) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + bytes;
  for (uintptr_t line = begin & ~uintptr_t{63}; line < end; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line), /*read*/ 0, /*all levels*/ 3);
}

// Dense rows of float32 (T = float) or of half / bfloat16 bits (T = uint16_t).
template <typename T, bool kBf16>
struct DenseReader {
  static constexpr bool kPairs = false;
  using RowRef = const T*;
  const T* data;
  int64_t dim;

  bool reads(size_t) const { return true; }
  RowRef row(int64_t position) const { return data + position * dim; }
  HWY_INLINE void prefetch(int64_t position) const {
    PrefetchBytes(data + position * dim, dim * static_cast<int64_t>(sizeof(T)));
  }
  template <class D>
  HWY_INLINE hn::Vec<D> chunk(D d, RowRef row, int64_t c) const {
    if constexpr (std::is_same_v<T, float>)
      return hn::LoadU(d, row + c);
    else
      return kBf16 ? vec::HWY_NAMESPACE::LoadBf16s(d, row + c)
                   : vec::HWY_NAMESPACE::LoadHalfs(d, row + c);
  }
};

// log2(x) for a power of two, else -1: divisions by the group sizes become shifts (a 64-bit
// division per row would sit on the path to every load of the row's parameters).
inline int ShiftFor(int64_t x) {
  return x > 0 && std::has_single_bit(static_cast<uint64_t>(x))
             ? std::countr_zero(static_cast<uint64_t>(x))
             : -1;
}
inline int64_t Divide(int64_t a, int64_t b, int shift) { return shift >= 0 ? a >> shift : a / b; }

// Integer rows: per-channel parameters (one fp16 scale and zero per channel, stride 1) or groups
// of channels sharing them, a group spanning whole vectors. A row's group parameters are widened
// to float once, when the row is fetched, not once per vector.
//
// kPairs (4-bit codes in groups of 2·Lanes(d) channels or more): a vector's worth of bytes holds
// two vectors of codes, which one zero-extension and a mask / shift split into the even and the
// odd channels of the run, half the work of unpacking each vector on its own. The bodies then
// read queries and outputs in that order (ToPairOrder), so the numbers are the same
// fma(code, scale, zero) and each output's sum still runs over the rows in order.
constexpr int64_t kMaxGroups = 32;      // groups per row the grouped reader takes
constexpr int64_t kMaxPairedDim = 512;  // row length the paired reader takes

template <int kBits, bool kPerChannel, bool kPairedCodes = false>
struct IntReader {
  static constexpr bool kPairs = kPairedCodes;
  static_assert(!kPairs || (kBits == 4 && !kPerChannel));
  struct RowRef {
    const uint8_t* codes;
    const uint16_t* scales;  // per-channel reader: fp16 runs of dim scales, then of zeros
    const uint16_t* zeros;
    float scale[kPerChannel ? 1 : kMaxGroups];  // grouped reader: group g's scale and zero
    float zero[kPerChannel ? 1 : kMaxGroups];
  };
  IntRows rows;
  int64_t groups;  // per row
  int group_shift, token_shift;

  explicit IntReader(const IntRows& r)
      : rows(r),
        groups(r.shape.groups()),
        group_shift(ShiftFor(r.shape.group)),
        token_shift(ShiftFor(r.token_group)) {}

  bool reads(size_t lanes) const {
    if constexpr (kPairs)
      return rows.shape.group % (2 * static_cast<int64_t>(lanes)) == 0 &&
             rows.shape.dim <= kMaxPairedDim;
    return kPerChannel || rows.shape.group % static_cast<int64_t>(lanes) == 0;
  }
  HWY_INLINE int_rows::Row stored(int64_t position) const {
    return rows.row_in_group(position, Divide(position, rows.token_group, token_shift));
  }
  HWY_INLINE RowRef row(int64_t position) const { return ref(stored(position)); }
  // The codes and the first line of the row's scales and zeros (per-token parameters are a
  // row's own; per-channel ones are shared by every row and stay in cache).
  HWY_INLINE void prefetch(int64_t position) const {
    const int_rows::Row row = stored(position);
    PrefetchBytes(row.codes, rows.row_bytes);
    __builtin_prefetch(row.scales, 0, 3);
    __builtin_prefetch(row.zeros, 0, 3);
  }
  HWY_INLINE RowRef ref(const int_rows::Row& row) const {
    RowRef r;
    r.codes = row.codes;
    r.scales = row.scales;
    r.zeros = row.zeros;
    if constexpr (!kPerChannel) {
      for (int64_t g = 0; g < groups; ++g) {
        r.scale[g] = fp16_to_float(r.scales[g * rows.param_stride]);
        r.zero[g] = fp16_to_float(r.zeros[g * rows.param_stride]);
      }
    }
    return r;
  }
  template <class D>
  HWY_INLINE hn::Vec<D> chunk(D d, const RowRef& row, int64_t c) const {
    const hn::Vec<D> codes = UnpackCodes<kBits>(d, row.codes, c);
    if constexpr (kPerChannel) {
      return Fma(d, codes, vec::HWY_NAMESPACE::LoadHalfs(d, row.scales + c),
                 vec::HWY_NAMESPACE::LoadHalfs(d, row.zeros + c));
    } else {
      const int64_t g = Divide(c, rows.shape.group, group_shift);
      return Fma(d, codes, hn::Set(d, row.scale[g]), hn::Set(d, row.zero[g]));
    }
  }
  // Paired reader: the even channels of [c, c + 2·Lanes(d)) in `even`, the odd ones in `odd`.
  template <class D>
  HWY_INLINE void pair(D d, const RowRef& row, int64_t c, hn::Vec<D>& even, hn::Vec<D>& odd) const {
    const hn::Rebind<uint8_t, D> d8;
    const hn::RebindToUnsigned<D> du;
    const hn::RebindToSigned<D> di;
    const auto bytes = hn::PromoteTo(du, hn::LoadU(d8, row.codes + c / 2));
    const int64_t g = Divide(c, rows.shape.group, group_shift);
    const hn::Vec<D> scale = hn::Set(d, row.scale[g]), zero = hn::Set(d, row.zero[g]);
    even =
        Fma(d, hn::ConvertTo(d, hn::BitCast(di, hn::And(bytes, hn::Set(du, 0xFu)))), scale, zero);
    odd = Fma(d, hn::ConvertTo(d, hn::BitCast(di, hn::ShiftRight<4>(bytes))), scale, zero);
  }
};

// Channels of `rows` rows of `dim` floats into the paired reader's order and back: in each run of
// 2·lanes channels, the even ones first, then the odd ones.
inline void ToPairOrder(const float* in, float* out, int64_t rows, int64_t dim, int64_t lanes) {
  for (int64_t r = 0; r < rows; ++r, in += dim, out += dim)
    for (int64_t c0 = 0; c0 < dim; c0 += 2 * lanes)
      for (int64_t i = 0; i < lanes; ++i) {
        out[c0 + i] = in[c0 + 2 * i];
        out[c0 + lanes + i] = in[c0 + 2 * i + 1];
      }
}
inline void FromPairOrder(const float* in, float* out, int64_t rows, int64_t dim, int64_t lanes) {
  for (int64_t r = 0; r < rows; ++r, in += dim, out += dim)
    for (int64_t c0 = 0; c0 < dim; c0 += 2 * lanes)
      for (int64_t i = 0; i < lanes; ++i) {
        out[c0 + 2 * i] = in[c0 + i];
        out[c0 + 2 * i + 1] = in[c0 + lanes + i];
      }
}

// ---- Bodies ------------------------------------------------------------------------------------

// Calls f(std::integral_constant<int, count>{}) for count in 1 .. kQueryBlock: the queries a
// body keeps in registers at once.
template <class F>
HWY_INLINE void WithQueryCount(int64_t count, const F& f) {
  switch (count) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, 4>{});
  }
}

// Rows picked by a list of positions follow no stride the hardware prefetcher could learn, and a
// row's few products leave too few rows' loads in flight to hide memory latency: rows are
// prefetched this many rows ahead of their use (a 24% list of f16 keys of 64 channels, cold,
// scored 51 -> 22 ns per row; whole ranges gain too, 20 -> 18).
constexpr int64_t kPrefetchRows = 32;

// Row `first + k` of `positions` as row_at(k), where the bodies read rows in place;
// row_at.prefetch(k) starts loading row k.
template <class Reader>
struct RowsAt {
  const Reader& reader;
  const PositionSet& positions;
  int64_t first;
  HWY_INLINE auto operator()(int64_t k) const { return reader.row(positions[first + k]); }
  HWY_INLINE void prefetch(int64_t k) const {
    if (first + k < positions.size()) reader.prefetch(positions[first + k]);
  }
};
// Row accessors without a prefetch (rows already read into a tile).
template <class RowAt>
HWY_INLINE void PrefetchRow(const RowAt& row_at, int64_t k) {
  if constexpr (requires { row_at.prefetch(k); }) row_at.prefetch(k);
}

// Scores of kQueries queries against the `here` rows row_at(0), .. (here <= Lanes(d)) into
// scores[j · score_stride + k]: each row one chain of fused multiply-adds per lane, then one
// transposed reduction for the block (vec-inl.h), so a row's score does not depend on its lane.
template <int kQueries, class D, class Reader, class RowAt>
HWY_INLINE void DotBlock(D d, const Reader& reader, const RowAt& row_at, int64_t dim, int64_t here,
                         const float* queries, float* scores, int64_t score_stride) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  hn::Vec<D> partial[kQueries][kMaxFloatLanes];
  for (int64_t k = 0; k < here; ++k) PrefetchRow(row_at, k + kPrefetchRows);
  for (int64_t k = 0; k < lanes; ++k) {
    hn::Vec<D> acc[kQueries];
    for (int j = 0; j < kQueries; ++j) acc[j] = hn::Zero(d);
    if (k < here) {
      const auto row = row_at(k);
      if constexpr (Reader::kPairs) {
        for (int64_t c = 0; c < dim; c += 2 * lanes) {
          hn::Vec<D> even, odd;
          reader.pair(d, row, c, even, odd);
          for (int j = 0; j < kQueries; ++j) {
            acc[j] = Fma(d, even, hn::LoadU(d, queries + j * dim + c), acc[j]);
            acc[j] = Fma(d, odd, hn::LoadU(d, queries + j * dim + c + lanes), acc[j]);
          }
        }
      } else {
        for (int64_t c = 0; c < dim; c += lanes) {
          const hn::Vec<D> x = reader.chunk(d, row, c);
          for (int j = 0; j < kQueries; ++j)
            acc[j] = Fma(d, x, hn::LoadU(d, queries + j * dim + c), acc[j]);
        }
      }
    }
    for (int j = 0; j < kQueries; ++j) partial[j][k] = acc[j];
  }
  for (int j = 0; j < kQueries; ++j) {
    const hn::Vec<D> sums = vec::HWY_NAMESPACE::TransposedSums(d, partial[j]);
    float* out = scores + j * score_stride;
    if (here == lanes) {
      hn::StoreU(sums, d, out);
    } else {
      HWY_ALIGN float block[kMaxFloatLanes];
      hn::Store(sums, d, block);
      std::copy_n(block, here, out);
    }
  }
}

// Rows row_at(0) .. row_at(count - 1) as the floats `reader` gives, in its order (the paired
// reader's even then odd channels of each run), `dim` apart from `tile` on.
template <class D, class Reader, class RowAt>
HWY_INLINE void ReadRows(D d, const Reader& reader, const RowAt& row_at, int64_t dim, int64_t count,
                         float* tile) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  for (int64_t k = 0; k < count; ++k) {
    const auto row = row_at(k);
    float* out = tile + k * dim;
    if constexpr (Reader::kPairs) {
      for (int64_t c = 0; c < dim; c += 2 * lanes) {
        hn::Vec<D> even, odd;
        reader.pair(d, row, c, even, odd);
        hn::StoreU(even, d, out + c);
        hn::StoreU(odd, d, out + c + lanes);
      }
    } else {
      for (int64_t c = 0; c < dim; c += lanes) hn::StoreU(reader.chunk(d, row, c), d, out + c);
    }
  }
}

// Float32 rows are read in place even in tiles; every other reader's rows are read into floats
// once per tile.
template <class Reader>
constexpr bool kReadsInPlace = std::is_same_v<Reader, DenseReader<float, false>>;

// What a thread keeps between calls for tiles: the rows read into floats, and queries or outputs
// in the paired reader's order (grown, never shrunk: nothing allocated once a prefill is under
// way).
struct TileScratch {
  std::vector<float> rows, transposed, ordered, zeros;
  float* Rows(int64_t floats) { return Grown(rows, floats); }
  float* Transposed(int64_t floats) { return Grown(transposed, floats); }
  const float* Zeros(int64_t floats) { return Grown(zeros, floats); }  // only ever zeros
  float* Ordered(int64_t floats) { return Grown(ordered, floats); }
  static float* Grown(std::vector<float>& v, int64_t floats) {
    if (static_cast<int64_t>(v.size()) < floats) v.resize(static_cast<size_t>(floats));
    return v.data();
  }
};
inline TileScratch& ThreadTileScratch() {
  thread_local TileScratch scratch;
  return scratch;
}

// Rows per tile of weighted sums: about 16 KB of floats, so that a tile stays in L1 while every
// query block passes over it.
constexpr int64_t kTileFloats = 4096;

// ---- Scores of many queries: transposed blocks ------------------------------------------------
// DotBlock keeps, per query and row, one vector of partial sums (lane l: the chain of fused
// multiply-adds over channels l, l + Lanes, ..) and then adds each row's lanes in a fixed tree
// (TransposedSums), which costs about as much as the products. With a block of rows transposed
// (channel c of row k at c · Lanes + k), lane l's partials of every row of the block build up in
// one vector (lane k: row k), by the same chain; the tree then adds whole vectors, the same
// additions in the same order. Transposing costs about a row's products per block, so this pays
// from kTransposeQueries queries on (the tiles of prefill).
constexpr int64_t kTransposeQueries = 16;

// Rows row_of[0 .. Lanes(d)) of `dim` floats transposed: channel c of row k at c · Lanes(d) + k.
// Four rows by four channels at a time with 128-bit interleaves where vectors have four lanes or
// more (dim is then a multiple of 4).
template <class D>
HWY_INLINE void Transpose(D d, const float* const* row_of, int64_t dim, float* transposed) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
#if HWY_TARGET != HWY_SCALAR
  if constexpr (hn::MaxLanes(D()) >= 4) {
    const hn::Full128<float> d4;
    const hn::Full128<uint64_t> d64;
    for (int64_t k = 0; k < lanes; k += 4)
      for (int64_t c = 0; c < dim; c += 4) {
        const auto r0 = hn::LoadU(d4, row_of[k] + c), r1 = hn::LoadU(d4, row_of[k + 1] + c);
        const auto r2 = hn::LoadU(d4, row_of[k + 2] + c), r3 = hn::LoadU(d4, row_of[k + 3] + c);
        // [r0.0 r1.0 r0.1 r1.1], [r2.0 r3.0 r2.1 r3.1], then the upper halves' likewise.
        const auto low01 = hn::BitCast(d64, hn::InterleaveLower(d4, r0, r1));
        const auto low23 = hn::BitCast(d64, hn::InterleaveLower(d4, r2, r3));
        const auto high01 = hn::BitCast(d64, hn::InterleaveUpper(d4, r0, r1));
        const auto high23 = hn::BitCast(d64, hn::InterleaveUpper(d4, r2, r3));
        float* out = transposed + c * lanes + k;
        hn::StoreU(hn::BitCast(d4, hn::InterleaveLower(d64, low01, low23)), d4, out);
        hn::StoreU(hn::BitCast(d4, hn::InterleaveUpper(d64, low01, low23)), d4, out + lanes);
        hn::StoreU(hn::BitCast(d4, hn::InterleaveLower(d64, high01, high23)), d4, out + 2 * lanes);
        hn::StoreU(hn::BitCast(d4, hn::InterleaveUpper(d64, high01, high23)), d4, out + 3 * lanes);
      }
    return;
  }
#endif
  for (int64_t c = 0; c < dim; ++c)
    for (int64_t k = 0; k < lanes; ++k) transposed[c * lanes + k] = row_of[k][c];
}

// Lane l's partial sums for kQ queries over every row of a transposed block.
template <int kQ, class D>
HWY_INLINE void LanePartials(D d, const float* transposed, int64_t chunks, int64_t l,
                             const float* const* queries, hn::Vec<D> (&acc)[kQ]) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  for (int j = 0; j < kQ; ++j) acc[j] = hn::Zero(d);
  for (int64_t m = 0; m < chunks; ++m) {
    const int64_t c = m * lanes + l;
    const hn::Vec<D> x = hn::LoadU(d, transposed + c * lanes);
    for (int j = 0; j < kQ; ++j) acc[j] = Fma(d, x, hn::Set(d, queries[j][c]), acc[j]);
  }
}

// The sums of lanes [l0, l0 + kCount) of every row, added in TransposedSums' tree (pairs of
// neighbouring lanes, then pairs of pairs, ..): a row's score in lane k at kCount == Lanes.
template <int kCount, int kQ, class D>
HWY_INLINE void LaneTree(D d, const float* transposed, int64_t chunks, int64_t l0,
                         const float* const* queries, hn::Vec<D> (&sum)[kQ]) {
  if constexpr (kCount == 1) {
    LanePartials<kQ>(d, transposed, chunks, l0, queries, sum);
  } else {
    hn::Vec<D> right[kQ];
    LaneTree<kCount / 2, kQ>(d, transposed, chunks, l0, queries, sum);
    LaneTree<kCount / 2, kQ>(d, transposed, chunks, l0 + kCount / 2, queries, right);
    for (int j = 0; j < kQ; ++j) sum[j] = hn::Add(sum[j], right[j]);
  }
}

// Queries per pass over a transposed block: the tree's pending sums and the chains of four fit
// AVX-512's 32 registers, of two the 16 of narrower targets.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr int kTransposedQueries = 4;
#else
constexpr int kTransposedQueries = 2;
#endif

template <class D, class Reader>
void DotTransposed(D d, const Reader& reader, int64_t dim, const PositionSet& positions,
                   int64_t row_count, const float* queries, int64_t query_count, float* scores,
                   int64_t score_stride) {
  constexpr size_t kLanes = hn::MaxLanes(D());
  const int64_t lanes = static_cast<int64_t>(kLanes), chunks = dim / lanes;
  TileScratch& scratch = ThreadTileScratch();
  float* rows = scratch.Rows(lanes * dim);
  float* transposed = scratch.Transposed(lanes * dim);
  const float* zeros = scratch.Zeros(dim);  // the rows past the last of a short block
  for (int64_t first = 0; first < row_count; first += lanes) {
    const int64_t here = std::min(lanes, row_count - first);
    const float* row_of[kMaxFloatLanes];
    if constexpr (kReadsInPlace<Reader>) {
      for (int64_t k = 0; k < here; ++k) row_of[k] = reader.row(positions[first + k]);
    } else {
      ReadRows(d, reader, RowsAt<Reader>{reader, positions, first}, dim, here, rows);
      for (int64_t k = 0; k < here; ++k) row_of[k] = rows + k * dim;
    }
    for (int64_t k = here; k < lanes; ++k) row_of[k] = zeros;
    Transpose(d, row_of, dim, transposed);
    for (int64_t q0 = 0; q0 < query_count; q0 += kTransposedQueries) {
      const auto pass = [&](auto queries_here) HWY_ATTR {
        constexpr int kQ = decltype(queries_here)::value;
        const float* query[kQ];
        for (int j = 0; j < kQ; ++j) query[j] = queries + (q0 + j) * dim;
        hn::Vec<D> sums[kQ];
        LaneTree<static_cast<int>(kLanes), kQ>(d, transposed, chunks, 0, query, sums);
        for (int j = 0; j < kQ; ++j) {
          float* out = scores + (q0 + j) * score_stride + first;
          if (here == lanes) {
            hn::StoreU(sums[j], d, out);
          } else {
            HWY_ALIGN float block[kMaxFloatLanes];
            hn::Store(sums[j], d, block);
            std::copy_n(block, here, out);
          }
        }
      };
      if (query_count - q0 >= kTransposedQueries)
        pass(std::integral_constant<int, kTransposedQueries>{});
      else
        WithQueryCount(query_count - q0, pass);
    }
  }
}

template <class D, class Reader>
void DotAll(D d, const Reader& reader, int64_t dim, const PositionSet& positions, int64_t row_count,
            const float* queries, int64_t query_count, float* scores, int64_t score_stride) {
  if (query_count <= 0) return;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const float* ordered = queries;
  if constexpr (Reader::kPairs) {
    float* buffer = ThreadTileScratch().Ordered(query_count * dim);
    ToPairOrder(queries, buffer, query_count, dim, lanes);
    ordered = buffer;
  }
  if (query_count >= kTransposeQueries)
    return DotTransposed(d, reader, dim, positions, row_count, ordered, query_count, scores,
                         score_stride);
  for (int64_t q0 = 0; q0 < query_count; q0 += kQueryBlock)
    WithQueryCount(std::min<int64_t>(kQueryBlock, query_count - q0), [&](auto kq) HWY_ATTR {
      for (int64_t first = 0; first < row_count; first += lanes)
        DotBlock<decltype(kq)::value>(d, reader, RowsAt<Reader>{reader, positions, first}, dim,
                                      std::min(lanes, row_count - first), ordered + q0 * dim,
                                      scores + q0 * score_stride + first, score_stride);
    });
}

// Channels [c, c + kChunks · Lanes(d)) of kQueries outputs, held in registers over all rows.
template <int kQueries, int kChunks, class D, class Reader, class RowAt>
HWY_INLINE void AccumulatePass(D d, const Reader& reader, const RowAt& row_at, int64_t dim,
                               int64_t row_count, const float* weights, int64_t weight_stride,
                               int64_t c, float* out) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  hn::Vec<D> acc[kQueries][kChunks];
  for (int j = 0; j < kQueries; ++j)
    for (int k = 0; k < kChunks; ++k) acc[j][k] = hn::LoadU(d, out + j * dim + c + k * lanes);
  for (int64_t i = 0; i < row_count; ++i) {
    if (i + kPrefetchRows < row_count) PrefetchRow(row_at, i + kPrefetchRows);
    const auto row = row_at(i);
    hn::Vec<D> x[kChunks];
    if constexpr (Reader::kPairs) {
      static_assert(kChunks % 2 == 0);
      for (int k = 0; k < kChunks; k += 2) reader.pair(d, row, c + k * lanes, x[k], x[k + 1]);
    } else {
      for (int k = 0; k < kChunks; ++k) x[k] = reader.chunk(d, row, c + k * lanes);
    }
    for (int j = 0; j < kQueries; ++j) {
      const hn::Vec<D> w = hn::Set(d, weights[j * weight_stride + i]);
      for (int k = 0; k < kChunks; ++k) acc[j][k] = Fma(d, w, x[k], acc[j][k]);
    }
  }
  for (int j = 0; j < kQueries; ++j)
    for (int k = 0; k < kChunks; ++k) hn::StoreU(acc[j][k], d, out + j * dim + c + k * lanes);
}

// Registers allow four chunks by four queries with 32 vector registers, two with 16.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr int kChunksPerPass = 4;
#else
constexpr int kChunksPerPass = 2;
#endif

// Every pass over the channels of kQueries outputs (`out`, `dim` apart, in the reader's order)
// for rows row_at(0) .. row_at(row_count - 1).
template <int kQueries, class D, class Reader, class RowAt>
HWY_INLINE void AccumulatePasses(D d, const Reader& reader, const RowAt& row_at, int64_t dim,
                                 int64_t row_count, const float* weights, int64_t weight_stride,
                                 float* out) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  int64_t c = 0;
  for (; c + kChunksPerPass * lanes <= dim; c += kChunksPerPass * lanes)
    AccumulatePass<kQueries, kChunksPerPass>(d, reader, row_at, dim, row_count, weights,
                                             weight_stride, c, out);
  if constexpr (kChunksPerPass > 2)
    for (; c + 2 * lanes <= dim; c += 2 * lanes)
      AccumulatePass<kQueries, 2>(d, reader, row_at, dim, row_count, weights, weight_stride, c,
                                  out);
  if constexpr (!Reader::kPairs)  // paired rows are a whole number of pairs of vectors
    for (; c < dim; c += lanes)
      AccumulatePass<kQueries, 1>(d, reader, row_at, dim, row_count, weights, weight_stride, c,
                                  out);
}

template <class D, class Reader>
void AccumulateAll(D d, const Reader& reader, int64_t dim, const PositionSet& positions,
                   int64_t row_count, const float* weights, int64_t weight_stride,
                   int64_t query_count, float* out) {
  if (query_count <= 0) return;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  TileScratch& scratch = ThreadTileScratch();
  float* ordered = out;
  if constexpr (Reader::kPairs) {
    ordered = scratch.Ordered(query_count * dim);
    ToPairOrder(out, ordered, query_count, dim, lanes);
  }
  // With more queries than one block, tiles of rows are read once (into floats, but for float32
  // rows) and every block of queries passes over each tile; with one block (decode) the rows are
  // read in place in one pass. Either way each output takes one fused multiply-add per row, in
  // row order, of the reader's numbers.
  const bool read_once = !kReadsInPlace<Reader> && query_count > kQueryBlock;
  const int64_t tile_rows =
      query_count > kQueryBlock ? std::max<int64_t>(lanes, kTileFloats / dim) : row_count;
  float* tile = read_once ? scratch.Rows(tile_rows * dim) : nullptr;
  const DenseReader<float, false> tile_reader{tile, dim};
  for (int64_t first = 0; first < row_count; first += tile_rows) {
    const int64_t here = std::min(tile_rows, row_count - first);
    if (read_once) ReadRows(d, reader, RowsAt<Reader>{reader, positions, first}, dim, here, tile);
    for (int64_t q0 = 0; q0 < query_count; q0 += kQueryBlock)
      WithQueryCount(
          std::min<int64_t>(kQueryBlock, query_count - q0), [&](auto queries_here) HWY_ATTR {
            constexpr int kQ = decltype(queries_here)::value;
            const float* w = weights + q0 * weight_stride + first;
            if (read_once)
              AccumulatePasses<kQ>(
                  d, tile_reader, [tile, dim](int64_t k) HWY_ATTR { return tile + k * dim; }, dim,
                  here, w, weight_stride, ordered + q0 * dim);
            else
              AccumulatePasses<kQ>(d, reader, RowsAt<Reader>{reader, positions, first}, dim, here,
                                   w, weight_stride, ordered + q0 * dim);
          });
  }
  if constexpr (Reader::kPairs) FromPairOrder(ordered, out, query_count, dim, lanes);
}

// Calls f(d) with the widest tag whose lanes divide `dim` and that `reader` can read (rows are a
// multiple of 8 long); false when neither the full nor an 8-lane vector fits.
template <class Reader, class F>
HWY_INLINE bool WithTag(const Reader& reader, int64_t dim, const F& f) {
  const DF d;
  const DF8 d8;
  const size_t full = hn::Lanes(d), eight = hn::Lanes(d8);
  if (dim % static_cast<int64_t>(full) == 0 && reader.reads(full)) {
    f(d);
    return true;
  }
  if (dim % static_cast<int64_t>(eight) == 0 && reader.reads(eight)) {
    f(d8);
    return true;
  }
  return false;
}

// Calls f(reader) with the reader for `rows`; false for layouts the vector readers do not take
// (groups narrower than a vector, interleaved per-channel parameters, other bit widths).
template <class F>
HWY_INLINE bool WithReader(const IntRows& rows, const F& f) {
  const bool per_channel = rows.shape.group == 1;
  if (per_channel && rows.param_stride != 1) return false;
  if (!per_channel && (rows.shape.group % 8 != 0 || rows.shape.groups() > kMaxGroups)) return false;
  if (rows.bits != 2 && rows.bits != 3 && rows.bits != 4 && rows.bits != 8) return false;
  return int_rows::with_bits(rows.bits, [&](auto bits) HWY_ATTR {
    constexpr int kBits = decltype(bits)::value;
    if (per_channel) return f(IntReader<kBits, true>(rows));
    if constexpr (kBits == 4)
      if (f(IntReader<4, false, true>(rows))) return true;
    return f(IntReader<kBits, false>(rows));
  });
}

template <class F>
HWY_INLINE bool WithReader(const DenseRows& rows, const F& f) {
  switch (rows.format) {
    case DenseFormat::F32:
      return f(DenseReader<float, false>{static_cast<const float*>(rows.data), rows.dim});
    case DenseFormat::F16:
      return f(DenseReader<uint16_t, false>{static_cast<const uint16_t*>(rows.data), rows.dim});
    case DenseFormat::BF16:
      return f(DenseReader<uint16_t, true>{static_cast<const uint16_t*>(rows.data), rows.dim});
  }
  return false;
}

inline int64_t DimOf(const DenseRows& rows) { return rows.dim; }
inline int64_t DimOf(const IntRows& rows) { return rows.shape.dim; }

// The layouts no vector reader takes (rows not a multiple of 8 long, narrow groups): calls
// visit(i, x) with row positions[i] as floats, one row at a time.
template <class Visit>
void ForEachRowAsFloats(const DenseRows& rows, const PositionSet& positions, int64_t row_count,
                        const Visit& visit) {
  std::vector<float> widened(static_cast<size_t>(rows.dim));
  for (int64_t i = 0; i < row_count; ++i) {
    const int64_t first = positions[i] * rows.dim;
    if (rows.format == DenseFormat::F32) {
      visit(i, static_cast<const float*>(rows.data) + first);
      continue;
    }
    const uint16_t* row = static_cast<const uint16_t*>(rows.data) + first;
    for (int64_t c = 0; c < rows.dim; ++c)
      widened[c] = rows.format == DenseFormat::BF16 ? bf16_to_float(row[c]) : fp16_to_float(row[c]);
    visit(i, widened.data());
  }
}
template <class Visit>
void ForEachRowAsFloats(const IntRows& rows, const PositionSet& positions, int64_t row_count,
                        const Visit& visit) {
  std::vector<float> decoded(static_cast<size_t>(rows.shape.dim));
  for (int64_t i = 0; i < row_count; ++i) {
    int_rows::decode_row_scalar(rows.row(positions[i]), rows.bits, rows.shape, decoded.data());
    visit(i, decoded.data());
  }
}

// ---- Entry points ------------------------------------------------------------------------------

template <class Rows>
void DotRows(const Rows& rows, const PositionSet& positions, int64_t row_count,
             const float* queries, int64_t query_count, float* scores, int64_t score_stride) {
  const int64_t dim = DimOf(rows);
  const bool vectors = WithReader(rows, [&](const auto& reader) HWY_ATTR {
    return WithTag(reader, dim, [&](auto d) HWY_ATTR {
      DotAll(d, reader, dim, positions, row_count, queries, query_count, scores, score_stride);
    });
  });
  if (vectors) return;
  ForEachRowAsFloats(rows, positions, row_count, [&](int64_t i, const float* x) {
    for (int64_t q = 0; q < query_count; ++q)
      scores[q * score_stride + i] = vec::dot(x, queries + q * dim, dim);
  });
}

template <class Rows>
void AccumulateRows(const Rows& rows, const PositionSet& positions, int64_t row_count,
                    const float* weights, int64_t weight_stride, int64_t query_count, float* out) {
  const int64_t dim = DimOf(rows);
  const bool vectors = WithReader(rows, [&](const auto& reader) HWY_ATTR {
    return WithTag(reader, dim, [&](auto d) HWY_ATTR {
      AccumulateAll(d, reader, dim, positions, row_count, weights, weight_stride, query_count, out);
    });
  });
  if (vectors) return;
  ForEachRowAsFloats(rows, positions, row_count, [&](int64_t i, const float* x) {
    for (int64_t q = 0; q < query_count; ++q)
      vec::axpy(weights[q * weight_stride + i], x, out + q * dim, dim);
  });
}

void DotDense(const DenseRows& rows, const PositionSet& positions, int64_t row_count,
              const float* queries, int64_t query_count, float* scores, int64_t score_stride) {
  DotRows(rows, positions, row_count, queries, query_count, scores, score_stride);
}
void DotInt(const IntRows& rows, const PositionSet& positions, int64_t row_count,
            const float* queries, int64_t query_count, float* scores, int64_t score_stride) {
  DotRows(rows, positions, row_count, queries, query_count, scores, score_stride);
}
void AccumulateDense(const DenseRows& rows, const PositionSet& positions, int64_t row_count,
                     const float* weights, int64_t weight_stride, int64_t query_count, float* out) {
  AccumulateRows(rows, positions, row_count, weights, weight_stride, query_count, out);
}
void AccumulateInt(const IntRows& rows, const PositionSet& positions, int64_t row_count,
                   const float* weights, int64_t weight_stride, int64_t query_count, float* out) {
  AccumulateRows(rows, positions, row_count, weights, weight_stride, query_count, out);
}

void DecodeRow(const int_rows::Row& row, int bits, const int_rows::RowShape& shape, float* out) {
  IntRows rows;  // the layout only: the reader is handed `row` itself
  rows.bits = bits;
  rows.shape = shape;
  rows.param_stride = row.param_stride;
  const bool vectors = WithReader(rows, [&](const auto& reader) HWY_ATTR {
    return WithTag(reader, shape.dim, [&](auto d) HWY_ATTR {
      const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
      const auto ref = reader.ref(row);
      for (int64_t c = 0; c < shape.dim; c += lanes)
        hn::StoreU(reader.chunk(d, ref, c), d, out + c);
    });
  });
  if (!vectors) int_rows::decode_row_scalar(row, bits, shape, out);
}

}  // namespace HWY_NAMESPACE
}  // namespace visikv::row_kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace visikv {
namespace row_kernels {

HWY_EXPORT(DotDense);
HWY_EXPORT(DotInt);
HWY_EXPORT(AccumulateDense);
HWY_EXPORT(AccumulateInt);
HWY_EXPORT(DecodeRow);

void dot(const DenseRows& rows, const PositionSet& positions, int64_t row_count,
         const float* queries, int64_t query_count, float* scores, int64_t score_stride) {
  HWY_DYNAMIC_DISPATCH(DotDense)
  (rows, positions, row_count, queries, query_count, scores, score_stride);
}

void dot(const IntRows& rows, const PositionSet& positions, int64_t row_count, const float* queries,
         int64_t query_count, float* scores, int64_t score_stride) {
  HWY_DYNAMIC_DISPATCH(DotInt)
  (rows, positions, row_count, queries, query_count, scores, score_stride);
}

void accumulate(const DenseRows& rows, const PositionSet& positions, int64_t row_count,
                const float* weights, int64_t weight_stride, int64_t query_count, float* out) {
  HWY_DYNAMIC_DISPATCH(AccumulateDense)
  (rows, positions, row_count, weights, weight_stride, query_count, out);
}

void accumulate(const IntRows& rows, const PositionSet& positions, int64_t row_count,
                const float* weights, int64_t weight_stride, int64_t query_count, float* out) {
  HWY_DYNAMIC_DISPATCH(AccumulateInt)
  (rows, positions, row_count, weights, weight_stride, query_count, out);
}

namespace {
void decode(const int_rows::Row& row, int bits, const int_rows::RowShape& shape, float* out) {
  HWY_DYNAMIC_DISPATCH(DecodeRow)(row, bits, shape, out);
}
}  // namespace

}  // namespace row_kernels

namespace int_rows {

void decode_row(const Row& row, int bits, const RowShape& shape, float* out) {
  row_kernels::decode(row, bits, shape, out);
}

}  // namespace int_rows
}  // namespace visikv
#endif  // HWY_ONCE

// Query-basis key quantization (docs/KEY_QUANTIZATION.md has the derivation; spec
// `qbasis:b<B>:g<G>:tok|chan[:r<R>][:random|:keypca][:iid]`, kv/codec_spec.h).
//
// The score error of a key error e is Δs = q·e. In the eigenbasis U of the head's query second
// moment E[q qᵀ] = U diag(λ) Uᵀ, the expected squared score error separates exactly:
// E_q[(q·e)²] = Σ_i λ_i (u_i·e)², with no cross terms whatever the errors' correlations. So each
// key is rotated, c = U k, and coordinate i is quantized on its own at b_i bits. A uniform
// quantizer over a range R_i ≈ κ σ_i leaves error variance ≈ R_i² / (12 (2^b - 1)²), so the
// bits are chosen to minimise Σ_i λ_i σ_i² f(b_i) under the bit budget (reverse water-filling
// with integer bits, scale and zero bits counted): f(0) = 1 (nothing stored, the coordinate is
// read as its calibration mean), f(b) = κ / (2^b - 1)². Directions the queries never see get no
// bits.
//
// What is free: softmax ignores a constant added to every score of one query, so replacing
// coordinate i of every key by one constant m_i costs (u_i·q)(c̄_i - m_i) per query, the same
// for all keys: only the variance of c_i across keys matters, whatever m_i is, when every key
// is stored that way. Keys kept exact in an fp16 window break that (they are not shifted), so
// m_i is the calibration mean E[u_i·k], the best constant then.
//
// Stored per key: x_i = (c_i - m_i) / σ_i (calibration mean and standard deviation of the
// direction, per-head constants that cost no stored bits) for the directions with b_i > 0, as
// b_i-bit codes with fp16 ranges: per token (`tok`: runs of up to G stored directions share one
// fp16 range [zero, top], each direction coding it on its own 2^b_i-level grid) or per channel
// (`chan`: G consecutive tokens of one direction share one pair, KIVI-style, with the newest R
// tokens in fp16). Scores are q·k̂ = (U q)·m + Σ_i (u_i·q) σ_i x̂_i: one d×d rotation per query per
// call, then one multiply-add per stored direction per key.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "visikv/kv/codec_spec.h"
#include "visikv/kv/vector_store.h"

namespace visikv {

struct HeadqBasisVectors;

// Widest code a direction may get.
inline constexpr int kQBasisMaxBits = 8;
// Widths 0..kQBasisMaxBits: the row length of a per-direction distortion table.
inline constexpr int kQBasisWidths = kQBasisMaxBits + 1;

// Squared-error of one direction at `bits` bits relative to its variance: 1 at 0 bits (read as
// its mean), κ / (2^b - 1)² otherwise, κ = max(1/3, (2/3) ln G): the squared range over a group of
// G unit-variance numbers (about 2 sqrt(2 ln G) standard deviations) over 12.
double qbasis_relative_distortion(int bits, int64_t group);

// Bits one token group costs (one token for `tok`, G tokens for `chan`): the codes, plus 32 bits
// (an fp16 pair) per group of numbers sharing them: per `tok` token, ceil(a / G) for the a
// directions with bits > 0; per `chan` token group, one per direction with bits > 0.
int64_t qbasis_group_cost(std::span<const int> bits, CodecSpec::Axis axis, int64_t group);

// Bits per direction (0..kQBasisMaxBits) minimising Σ_i weights[i] · f_i(b_i) with a token
// group's cost (qbasis_group_cost) at most `budget_bits`: reverse water-filling with integer
// widths and the scale bits counted, solved exactly (a multiple-choice knapsack by dynamic
// programming; for `tok`, one per number of scale pairs). weights[i] = λ_i σ_i²; a direction of
// weight 0 gets 0 bits. `distortion` (`chan` only; empty: every f_i is
// qbasis_relative_distortion): per direction its own f_i(b) for b = 0..kQBasisMaxBits, row-major
// {d, kQBasisWidths} (qbasis_distortion_table).
std::vector<int> qbasis_allocate(std::span<const double> weights, int64_t budget_bits,
                                 CodecSpec::Axis axis, int64_t group,
                                 std::span<const double> distortion = {});

// The i.i.d. model scaled by each direction's within-group spread s_i = w_i² / σ_i² in [0, 1]
// ({d, kQBasisWidths}): f_i(0) = 1 (at 0 bits the error is still σ_i²), f_i(b) = s_i ·
// qbasis_relative_distortion(b, group) (a group's range follows the spread inside it).
std::vector<double> qbasis_spread_distortion(std::span<const double> spread, int64_t group);

// The per-head constants of a query-basis store.
struct QBasisHead {
  int64_t dim = 0;
  std::vector<double> rows;  // {d, d}: row i = u_i, the coordinate c_i = u_i·k
  // {d, d}: row i = s_i with s_i·u_j = δ_ij, so k = Σ_i c_i s_i and q·k = Σ_i (s_i·q) c_i; empty
  // when the rows are orthonormal (s_i = u_i; every kind but the query-weighted key PCA).
  std::vector<double> dual_rows;
  std::vector<double> query_energy;  // λ_i = s_iᵀ E[q qᵀ] s_i
  // λ_i σ_i²: what the allocation weighs direction i by.
  double weight(int64_t i) const { return query_energy[i] * key_std[i] * key_std[i]; }
  const double* dual(int64_t i) const {
    return (dual_rows.empty() ? rows : dual_rows).data() + i * dim;
  }
  std::vector<double> key_mean;  // m_i = u_i·E[k]
  std::vector<double> key_std;   // σ_i = sqrt(u_iᵀ Cov(k) u_i)
  // `chan` groups of the calibrated size: w_i² / σ_i², w_i² = u_iᵀ W u_i the variance about the
  // group means (HeadqBasisVectors::key_group_*); empty: not calibrated, not asked for, or
  // superseded by group_distortion.
  std::vector<double> group_spread;
  // `chan` groups of the calibrated size: f_i(b), b = 1..kQBasisMaxBits ({d, kQBasisMaxBits}), the
  // squared error of direction i coded in groups of the calibration keys, over σ_i²
  // (HeadqBasisVectors::key_group_distortion); empty: not measured, or not asked for.
  std::vector<double> group_distortion;
  // `:fisher`: D_i(b), b = 0..kQBasisMaxBits ({d, kQBasisWidths}), the attention-weighted score
  // error of coding direction i at b bits (HeadqBasisVectors::key_fisher).
  std::vector<double> fisher;
};

// The table the allocation of a head uses ({d, kQBasisWidths}, qbasis_allocate, whose weights are
// λ_i σ_i²): the Fisher table over λ_i σ_i² (`:fisher`), else the measured group_distortion (with
// f_i(0) = 1), else the group_spread model, else empty (the i.i.d. model).
std::vector<double> qbasis_distortion_table(const QBasisHead& head, int64_t group);

// f_i(b) for b = 1..kQBasisMaxBits ({d, kQBasisMaxBits}) of head `head` measured on `keys`
// ({tokens, d}, tokens a positive multiple of `group`): each run of `group` consecutive keys coded
// as a per-channel (`chan`) query-basis store codes a token group (rotated, x_i = (c_i - m_i) /
// σ_i, one fp16 scale and zero per direction at b bits), the mean squared error of x_i. A
// direction with σ_i = 0 gets zeros (its weight is 0: never stored).
std::vector<double> qbasis_measure_group_distortion(const QBasisHead& head,
                                                    std::span<const float> keys, int64_t group);

// One query the calibration watched: its vector (post-RoPE, as scores use it), the positions of its
// window it read (ascending) and its attention weights over them.
struct ObservedQuery {
  int64_t position = 0;
  std::span<const float> query;
  std::span<const int32_t> positions;
  std::span<const float> weights;
};

// Adds to `fisher` ({d, kQBasisWidths}), for each of `queries` and each direction i and width b,
// the attention-weighted score error of coding direction i at b bits: (s_i·q)² Var_a(e_i), the
// variance under the query's weights of e_i, the error of coordinate c_i of each key it read.
// `keys`: the window's keys from its first position, whole groups of `group` ({n, d}, fp16-rounded
// as a cache quantizes them). A key is coded (per-channel groups of `group`; b = 0 reads it as the
// mean m_i) when a store keeping `window` tokens in fp16 holds it quantized at the query; the
// others are exact (e_i = 0).
void qbasis_accumulate_fisher(const QBasisHead& head, std::span<const float> keys, int64_t group,
                              int64_t window, std::span<const ObservedQuery> queries,
                              std::span<double> fisher);

// The constants of head (layer, kv_head) in basis `kind` from a calibrated basis, without the
// group models (group_spread, group_distortion). Throws visikv::Error naming the problem when the
// basis is not full rank, has no eigenvalues or no key means, or has no such head.
QBasisHead qbasis_head(QBasisSpec::Basis kind, const HeadqBasisVectors& basis, int64_t layer,
                       int64_t kv_head);

// The constants of head (layer, kv_head) for `spec` from a calibrated basis: the query
// eigenbasis (its eigenvalues are the λ), or the control's basis (seeded random, or the key
// eigenbasis) with λ and σ of its directions from the same calibration, and for `chan` groups of
// the calibrated size (unless `:iid`) the group models the basis holds. Throws visikv::Error
// naming the problem when `basis` is null, does not fit, is not full rank, or has no key means.
QBasisHead qbasis_head(const CodecSpec& spec, const HeadqBasisVectors* basis, int64_t layers,
                       int64_t kv_heads, int64_t head_dim, int64_t layer, int64_t kv_head);

// The seed of the random-basis control for one head.
uint64_t qbasis_random_seed(int64_t layer, int64_t kv_head);

// What a store decided, for reports and tests.
struct QBasisLayout {
  std::vector<int> bits;          // per direction, in basis order
  int64_t budget_bits = 0;        // per token group: T · B · d
  int64_t used_bits = 0;          // qbasis_group_cost: codes, scales and zeros
  int64_t parameter_pairs = 0;    // fp16 (scale, zero) pairs per token group
  int64_t stored_directions = 0;  // directions with bits > 0
};

class QBasisKeyStore : public KeyStore {
 public:
  virtual const QBasisLayout& layout() const = 0;
  virtual const QBasisHead& head() const = 0;
};

// Throws visikv::Error unless `spec` is a query-basis codec that fits head.dim.
std::unique_ptr<QBasisKeyStore> make_qbasis_key_store(const CodecSpec& spec, QBasisHead head,
                                                      int64_t reserve_tokens = 0);

}  // namespace visikv

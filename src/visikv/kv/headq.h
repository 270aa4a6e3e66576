// HeadQ side codes for quantized keys (METHODS.md, HeadQ; docs/CACHE_SPECS.md).
//
// A key k enters the cache as k̂ = Q_b(k) with the base quantizer; the residual e = k - k̂ is
// projected on r orthonormal basis vectors (rows of U_rᵀ) and stored as c = Q_side(U_rᵀ e), r
// numbers with their own fp16 scale and zero. Scores read q·k̂ + sign · (U_rᵀ q)·ĉ: the query is
// projected once per score call (r·d multiply-adds), then each key costs r more. With an exact
// side code and e in span(U_r) the correction cancels the residual (q·k̂ + q·e = q·k); what is
// left in general is q·(I - U_r U_rᵀ) e + (U_rᵀ q)·(U_rᵀ e - ĉ).
//
// The basis comes from calibration (`visikv calibrate`, calibration/calibrate.h): per (layer, KV
// head) the top-r eigenvectors of the query second moment E[q qᵀ] (or, for the key-PCA control,
// of E[k kᵀ]). The random-basis control needs no file. A cache gets the basis vectors through
// make_cache's optional `headq_basis` argument (kv/cache_factory.h).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "visikv/kv/codec_spec.h"
#include "visikv/kv/qbasis.h"
#include "visikv/kv/vector_store.h"

namespace visikv {

// The basis vectors of every (layer, KV head) of one model: what a HeadQ key codec reads. Where
// they came from (the calibration text, the model's fingerprint, the eigenvalues) is the
// calibration's business (calibration/headq_basis.h: HeadqBasis extends this with it).
struct HeadqBasisVectors {
  int64_t layers = 0, kv_heads = 0, head_dim = 0;
  int64_t rank = 0;  // basis vectors kept per head (any spec rank up to this works)
  // Per head, index layer * kv_heads + kv_head: orthonormal rows ({heads, rank, head_dim}, row j
  // the j-th basis vector) of the query basis (the top eigenvectors of E[q qᵀ] over the head's
  // query group, post-RoPE, the coordinates scores use) and of the key-PCA control (E[k kᵀ]).
  std::vector<double> query_vectors, key_vectors;
  // Per head ({heads, head_dim}): all head_dim eigenvalues in descending order of E[q qᵀ] and of
  // E[k kᵀ] (the vectors above belong to the `rank` largest), and the key mean E[k]. A
  // query-basis key codec (kv/qbasis.h) needs all three and a full-rank basis (rank ==
  // head_dim); key_means is empty in files written before it was recorded.
  std::vector<double> query_eigenvalues, key_eigenvalues, key_means;
  // The within-group spread of the keys (format version 3; empty before): per head the
  // eigenvalues ({heads, head_dim}) and top-`rank` eigenvectors ({heads, rank, head_dim}) of
  // W = E[(k - k̄_g)(k - k̄_g)ᵀ], k̄_g the mean of the key's group of `key_group` consecutive
  // positions (whole groups of each calibration window). A query-basis codec with per-channel
  // groups of that many tokens allocates its bits by it (kv/qbasis.h).
  int64_t key_group = 0;
  std::vector<double> key_group_eigenvalues, key_group_vectors;
  // The query-weighted key PCA (format version 4; empty before, and in bases below full rank): per
  // head, rows t_i ({heads, head_dim, head_dim}) with t_i = Σ_q^{1/2} v_i, v_i the eigenvectors of
  // Σ_q^{1/2} Cov(k) Σ_q^{1/2} (the coordinates y_i = t_i·k are uncorrelated and each costs the
  // score error on its own), and their dual rows s_i = Σ_q^{-1/2} v_i (s_i·t_j = δ_ij: a key is
  // k = Σ_i y_i s_i, a score q·k = Σ_i (s_i·q) y_i). Σ_q^{±1/2} with its eigenvalues floored at
  // kWeightedBasisFloor of the largest.
  std::vector<double> weighted_rows, weighted_dual_rows;
  // What coding costs (format version 4; empty before, and in bases below full rank): per head and
  // query-basis kind (QBasisSpec::Basis order: query, random, key PCA, weighted), f_i(b) for b =
  // 1..kQBasisMaxBits of each direction i ({heads, 4, head_dim, kQBasisMaxBits}): the mean squared
  // error of the direction's coordinate, over its variance, with the calibration keys coded in
  // per-channel groups of `key_group` consecutive positions as a query-basis store codes them
  // (qbasis_measure_group_distortion). Such codecs allocate by it.
  std::vector<double> key_group_distortion;
  // The attention-weighted score error (format version 4, full rank): per head and query-basis
  // kind, D_i(b) for b = 0..kQBasisMaxBits ({heads, 4, head_dim, kQBasisWidths}), the mean over
  // watched queries of (s_i·q)² Var_a(e_i) with the calibration's keys coded in per-channel groups
  // of `key_group` and the newest `key_window` positions exact (qbasis_accumulate_fisher).
  int64_t key_window = 0;
  std::vector<double> key_fisher;

  int64_t heads() const { return layers * kv_heads; }
  // Throws visikv::Error unless the shape is valid and the arrays have the sizes it says.
  void check_vector_sizes() const;
  // Row j: the j-th basis vector of head (layer, kv_head), j < rank.
  std::span<const double> query_rows(int64_t layer, int64_t kv_head) const;
  std::span<const double> key_rows(int64_t layer, int64_t kv_head) const;
  // Row j: the j-th eigenvector of the head's within-group spread W (empty spans without it).
  std::span<const double> key_group_rows(int64_t layer, int64_t kv_head) const;
  // The {head_dim, head_dim} rows t_i and dual rows s_i of head (layer, kv_head)'s query-weighted
  // key PCA (empty spans without it).
  std::span<const double> weighted_key_rows(int64_t layer, int64_t kv_head) const;
  std::span<const double> weighted_key_dual_rows(int64_t layer, int64_t kv_head) const;
  // The {head_dim, kQBasisMaxBits} measured distortions of head (layer, kv_head) in basis `kind`
  // (an empty span without them).
  std::span<const double> key_group_distortion_rows(QBasisSpec::Basis kind, int64_t layer,
                                                    int64_t kv_head) const;
  // The {head_dim, kQBasisWidths} Fisher table of head (layer, kv_head) in basis `kind` (an empty
  // span without it).
  std::span<const double> key_fisher_rows(QBasisSpec::Basis kind, int64_t layer,
                                          int64_t kv_head) const;

 private:
  // Head (layer, kv_head)'s `per_head` numbers of a {heads, per_head} array (an empty span when
  // the array is empty); throws visikv::Error for a head out of range.
  std::span<const double> head_block(const std::vector<double>& all, int64_t layer, int64_t kv_head,
                                     int64_t per_head) const;
  // Head (layer, kv_head)'s block of kind `kind` in a {heads, kinds, head_dim, per_direction}
  // array (an empty span when the array is empty).
  std::span<const double> kind_block(const std::vector<double>& all, int64_t per_direction,
                                     QBasisSpec::Basis kind, int64_t layer, int64_t kv_head) const;
};

// Query eigenvalues below this share of the head's largest count as this share in Σ_q^{±1/2} of the
// query-weighted key PCA (directions the queries never see, which get no bits anyway).
inline constexpr double kWeightedBasisFloor = 1e-9;

// `rows` orthonormal vectors of `dim` numbers ({rows, dim}), Gaussian then Gram-Schmidt (twice),
// from SplitMix64 seeded with `seed`: the same on every run. rows <= dim.
std::vector<double> random_orthonormal_rows(int64_t rows, int64_t dim, uint64_t seed);

// Orthonormalizes the first `count` rows of `dim` numbers of `rows` in place, in order
// (Gram-Schmidt: each row projected off the earlier ones twice, then normalized). Returns the
// index of the first row whose norm before normalizing is not above `min_norm` (it and the rows
// after it are left unnormalized), or -1 when every row was normalized.
int64_t orthonormalize_rows(std::span<double> rows, int64_t count, int64_t dim, double min_norm);

// The seed of the random-basis control for one head: a fixed seed mixed with the head index.
uint64_t headq_random_seed(int64_t layer, int64_t kv_head);

// The r basis rows ({r, head_dim} float) a key store of head (layer, kv_head) uses for
// `spec.headq`: from `basis` (query or key PCA) or random. Throws visikv::Error when the spec
// needs a basis and `basis` is null, or when the basis does not fit (head_dim, layers, kv
// heads, or a rank below the spec's).
std::vector<float> headq_basis_rows(const CodecSpec& spec, const HeadqBasisVectors* basis,
                                    int64_t layers, int64_t kv_heads, int64_t head_dim,
                                    int64_t layer, int64_t kv_head);

// The numbers a side code stores for one key: `stored` holds k̂ (d numbers) on entry and the
// residual e = key - k̂ on return; projected[j] = rows[j] · e for the r = projected.size() rows
// ({r, d}). Every user of HeadQ codes (the CPU store, the GPU layout packer) calls this, so the
// side codes agree to the bit.
void headq_project_residual(std::span<const float> rows, std::span<const float> key,
                            std::span<float> stored, std::span<float> projected);

// Wraps `base` (an integer store made for `spec`) with the side code of `spec.headq` in the
// basis `rows` ({r, head_dim}, orthonormal, in the coordinates the store sees). Appends go to
// the base; when the base quantizes a key, its residual against the value the base quantized
// (the float key, or its fp16 form for windowed codecs) is side-coded. Keys still in the base's
// fp16 window have no side code and score as stored. reconstruct() returns the key as scores
// see it: k̂ + sign · U_r ĉ.
std::unique_ptr<KeyStore> make_headq_key_store(std::unique_ptr<KeyStore> base,
                                               const CodecSpec& spec, std::vector<float> rows);

}  // namespace visikv

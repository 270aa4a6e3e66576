// HeadQ basis files: the calibrated bases of one model (calibration/headq_basis.h: HeadqBasis),
// written by `visikv calibrate` and read by `visikv ppl --basis` and the evaluations.
//
// Layout (all integers and floats little-endian):
//
//   offset 0   8 bytes   magic "VKVHEADQ"
//   offset 8   uint32    format version (kBasisFormatVersion)
//   offset 12  uint64    H, length of the JSON header
//   offset 20  H bytes   JSON header: {"format": "visikv-headq-basis", "version", "fingerprint",
//                        "model", "text", "tokens", "window", "layers", "kv_heads", "head_dim",
//                        "rank", "dtype": "f64", "arrays": [{"name", "shape"}...],
//                        "key_group" (version 3), "key_window" (version 4)}
//   then       float64   the arrays, in the header's order, each row-major:
//                        query_eigenvalues {layers·kv_heads, head_dim}   (descending)
//                        query_vectors     {layers·kv_heads, rank, head_dim} (row j: the
//                                          eigenvector of eigenvalue j)
//                        key_eigenvalues   {layers·kv_heads, head_dim}
//                        key_vectors       {layers·kv_heads, rank, head_dim}
//                        key_means         {layers·kv_heads, head_dim}  (version 2 and up)
//                        key_group_eigenvalues {layers·kv_heads, head_dim}  (version 3)
//                        key_group_vectors {layers·kv_heads, rank, head_dim} (version 3): the
//                                          within-group key spread (kv/headq.h)
//                        weighted_rows     {layers·kv_heads, head_dim, head_dim} (version 4)
//                        weighted_dual_rows {layers·kv_heads, head_dim, head_dim} (version 4):
//                                          the query-weighted key PCA (kv/headq.h)
//                        key_group_distortion {layers·kv_heads, 4, head_dim, 8} (version 4):
//                                          the measured cost of coding each direction of the
//                                          four query-basis kinds (kv/headq.h)
//                        key_fisher        {layers·kv_heads, 4, head_dim, 9} (version 4): the
//                                          attention-weighted score error of the same, with
//                                          the newest "key_window" positions exact
//
// The file ends exactly after the arrays. Head index = layer·kv_heads + kv_head.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "visikv/calibration/headq_basis.h"

namespace visikv {

class Model;

// Version 2 adds the key means (a basis without them is still written as version 1), version 3
// the within-group key spread (a basis without it is written as version 2), version 4 the
// query-weighted key PCA and the measured group distortions, at full rank (a basis without them is
// written as version 3).
inline constexpr uint32_t kBasisFormatVersion = 4;

// Identifies a model's weights: "<hash of the config>-<hash of some weight bytes>", two 64-bit
// FNV-1a hashes in hex. The config part covers the shape, positions, norms and attention
// (Config::describe and the numbers it leaves out); the weight part the bytes of the first
// layer's query and key projections, the last layer's key projection, and the first MiB of the
// token embedding. The same checkpoint gives the same fingerprint in any format copy whose
// tensors are stored the same way; another checkpoint, or the same one requantized, differs.
std::string model_fingerprint(const Model& model);

void save_headq_basis(const HeadqBasis& basis, const std::filesystem::path& path);

// Reads and checks a basis file (magic, version, header, array sizes bounded by the file).
// Throws visikv::Error naming the file and the problem.
HeadqBasis load_headq_basis(const std::filesystem::path& path);

// As above, and also checks that the file was calibrated on `model` (same fingerprint, same
// layers, KV heads and head_dim) and holds at least `min_rank` vectors per head.
HeadqBasis load_headq_basis(const std::filesystem::path& path, const Model& model,
                            int64_t min_rank = 1);

// The checks of the second overload, for a basis already in memory.
void check_basis_for_model(const HeadqBasis& basis, const Model& model, int64_t min_rank,
                           const std::string& where);

}  // namespace visikv

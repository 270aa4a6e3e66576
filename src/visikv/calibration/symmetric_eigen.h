// Eigendecomposition of a small real symmetric matrix (the d x d second moments HeadQ
// calibrates, d <= a few hundred) by the cyclic Jacobi method in double precision: slow in
// O(d³) per sweep but unconditionally convergent and accurate to rounding, with orthonormal
// eigenvectors even for clustered or repeated eigenvalues.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace visikv {

struct SymmetricEigen {
  int64_t n = 0;
  std::vector<double> values;   // descending
  std::vector<double> vectors;  // {n, n} row-major, row i the unit eigenvector of values[i]
};

// `matrix`: {n, n} row-major; only its symmetric part is used ((A + Aᵀ) / 2). Throws
// visikv::Error for a wrong size or non-finite entries. A = Σ_i values[i] v_i v_iᵀ.
SymmetricEigen symmetric_eigen(std::span<const double> matrix, int64_t n);

}  // namespace visikv

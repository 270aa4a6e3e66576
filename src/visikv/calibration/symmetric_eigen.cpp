#include "visikv/calibration/symmetric_eigen.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "visikv/core/error.h"

namespace visikv {

SymmetricEigen symmetric_eigen(std::span<const double> matrix, int64_t n) {
  require(n > 0 && static_cast<int64_t>(matrix.size()) == n * n, "symmetric eigen: expected ", n,
          " x ", n, " numbers, got ", matrix.size());
  require(std::all_of(matrix.begin(), matrix.end(), [](double x) { return std::isfinite(x); }),
          "symmetric eigen: the matrix has non-finite entries");
  std::vector<double> a(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) a[i * n + j] = 0.5 * (matrix[i * n + j] + matrix[j * n + i]);
  // v accumulates the rotations: A = V D Vᵀ with V's columns the eigenvectors.
  std::vector<double> v(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) v[i * n + i] = 1.0;

  const auto off_diagonal = [&] {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (i != j) sum += a[i * n + j] * a[i * n + j];
    return sum;
  };
  double scale = 0;
  for (double x : a) scale += x * x;
  constexpr int kMaxSweeps = 100;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    if (off_diagonal() <= 1e-30 * scale || scale == 0) break;
    for (int64_t p = 0; p < n - 1; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (apq == 0.0) continue;
        // Rotation that zeroes a[p][q] (Golub & Van Loan, symmetric Schur decomposition).
        const double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
        const double t =
            (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1.0 / std::sqrt(t * t + 1), s = t * c;
        for (int64_t k = 0; k < n; ++k) {  // A <- A J (columns p, q)
          const double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {  // A <- Jᵀ A (rows p, q)
          const double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (int64_t k = 0; k < n; ++k) {  // V <- V J
          const double vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t i, int64_t j) { return a[i * n + i] > a[j * n + j]; });
  SymmetricEigen out;
  out.n = n;
  out.values.resize(static_cast<size_t>(n));
  out.vectors.resize(static_cast<size_t>(n * n));
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = order[r];
    out.values[r] = a[i * n + i];
    for (int64_t k = 0; k < n; ++k) out.vectors[r * n + k] = v[k * n + i];
  }
  return out;
}

}  // namespace visikv

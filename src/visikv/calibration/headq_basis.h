// What a HeadQ calibration produces for one model: the basis vectors a HeadQ key codec reads
// (kv/headq.h: HeadqBasisVectors), every eigenvalue they were chosen by, and where they came
// from. Written by calibrate_headq (calibration/calibrate.h), saved and loaded by
// calibration/basis_file.h, which also checks that a file belongs to the model it is used with.
//
// It extends HeadqBasisVectors, so a calibrated basis is handed to a cache (make_cache) as it is,
// while the cache and its codecs see only the vectors.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/kv/headq.h"

namespace visikv {

struct HeadqBasis : HeadqBasisVectors {
  std::string fingerprint;  // of the model it came from (calibration/basis_file.h)
  std::string model;        // where that model was loaded from, for display
  std::string text;         // calibration text
  int64_t tokens = 0;       // positions run through the model (queries per query head)
  int64_t window = 0;       // positions per prefill window
  // (The eigenvalues and key means are in HeadqBasisVectors: a query-basis codec reads them.)

  // Throws visikv::Error unless the arrays have the sizes the shape says.
  void check_sizes() const {
    check_vector_sizes();
    const size_t values = static_cast<size_t>(heads() * head_dim);
    require(query_eigenvalues.size() == values && key_eigenvalues.size() == values,
            "HeadQ basis: eigenvalues do not match ", layers, " layers x ", kv_heads,
            " kv heads, head_dim ", head_dim);
    require(key_means.empty() || key_means.size() == values, "HeadQ basis: key means do not match ",
            layers, " layers x ", kv_heads, " kv heads, head_dim ", head_dim);
  }
};

}  // namespace visikv

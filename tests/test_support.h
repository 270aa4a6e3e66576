// Small helpers shared by the test suites: seeded random data, fixture files, error messages.
#pragma once

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/core/mapped_file.h"

namespace visikv::test_support {

// n samples of N(0, scale²).
inline std::vector<float> random_vector(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// A little-endian binary fixture of T values.
template <typename T>
std::vector<T> read_raw(const std::filesystem::path& path) {
  MappedFile file(path);
  std::vector<T> values(file.size() / sizeof(T));
  if (!values.empty()) std::memcpy(values.data(), file.bytes().data(), values.size() * sizeof(T));
  return values;
}

inline nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  require(in.good(), "missing fixture ", path);
  return nlohmann::json::parse(in);
}

// The message of the visikv::Error that `action` throws, or "<no error>".
inline std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace visikv::test_support

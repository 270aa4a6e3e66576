// Shared by the fuzz targets: inputs handed to the loaders as files (the loaders read files, as
// users' inputs arrive), a scratch directory per process, and the one rule every target checks:
// a bad input may only end in a visikv::Error. Any other exception escapes the target, std::
// terminate aborts, and libFuzzer reports the input as a crash.
#pragma once

#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "visikv/core/error.h"
#include "visikv/formats/dequantize.h"
#include "visikv/formats/tensor.h"

namespace visikv::fuzz {

// A file in memory (memfd) with a path the loaders can open like any regular file.
class MemoryFile {
 public:
  MemoryFile() : fd_(::memfd_create("visikv-fuzz", MFD_CLOEXEC)) {
    if (fd_ < 0) std::abort();
  }
  ~MemoryFile() { ::close(fd_); }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;

  // Replaces the contents and returns the path to open.
  std::filesystem::path write(std::string_view bytes) {
    if (::ftruncate(fd_, 0) != 0 ||
        ::pwrite(fd_, bytes.data(), bytes.size(), 0) != static_cast<ssize_t>(bytes.size()))
      std::abort();
    return "/proc/self/fd/" + std::to_string(fd_);
  }

 private:
  int fd_;
};

// The input as a file the loaders open by path (one per process, rewritten for each input).
inline std::filesystem::path input_file(const uint8_t* data, size_t size) {
  static MemoryFile file;
  return file.write({reinterpret_cast<const char*>(data), size});
}

// A directory that lives as long as the fuzzing process (removed at exit); in memory where the
// system has /dev/shm, since every input rewrites its files.
class ScratchDir {
 public:
  ScratchDir() {
    const std::filesystem::path base = std::filesystem::is_directory("/dev/shm")
                                           ? std::filesystem::path("/dev/shm")
                                           : std::filesystem::temp_directory_path();
    std::string pattern = (base / "visikv-fuzz-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::filesystem::path& path() const { return path_; }

  void write(const std::string& name, std::string_view bytes) const {
    std::ofstream out(path_ / name, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) std::abort();
  }
  void remove(const std::string& name) const {
    std::error_code ignored;
    std::filesystem::remove(path_ / name, ignored);
  }

 private:
  std::filesystem::path path_;
};

// Several files in one input: the parts between lines that read exactly "@@file". Seeds are
// written this way (fuzz/seeds/hf_dir), so the fuzzer mutates each file's bytes in place.
inline std::vector<std::string_view> split_parts(std::string_view input, size_t max_parts) {
  constexpr std::string_view kSeparator = "\n@@file\n";
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < max_parts) {
    const size_t at = input.find(kSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(input.substr(0, at));
    input.remove_prefix(at + kSeparator.size());
  }
  parts.push_back(input);
  return parts;
}

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs `body`; a visikv::Error is the expected outcome of a bad input.
template <typename Body>
void expect_clean(Body&& body) {
  try {
    body();
  } catch (const visikv::Error&) {
  }
}

// Dequantizes every tensor of up to 2^16 elements a parser accepted: its bytes must lie inside
// the file (AddressSanitizer sees any that do not).
inline void read_small_tensors(const std::vector<TensorRef>& tensors) {
  for (const TensorRef& tensor : tensors)
    if (tensor.elements() <= (int64_t{1} << 16)) (void)to_float(tensor);
}

// The directory of the committed test fixtures (set by fuzz/CMakeLists.txt).
inline std::filesystem::path fixtures() { return VISIKV_FIXTURES; }

}  // namespace visikv::fuzz

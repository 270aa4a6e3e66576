#include "visikv/eval/logit_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <vector>

#include "visikv/core/error.h"

namespace visikv {

namespace {

std::string temporary_directory() {
  std::error_code error;
  const std::filesystem::path path = std::filesystem::temp_directory_path(error);
  return error ? std::string("/tmp") : path.string();
}

// Every byte of `bytes` bytes at `offset`, through short transfers and signals: `call(done, at)`
// moves the bytes from `done` on at file offset `at` and returns pwrite's or pread's result.
template <typename Call>
bool transfer_all(size_t bytes, off_t offset, Call call) {
  size_t done = 0;
  while (done < bytes) {
    const ssize_t moved = call(done, offset + static_cast<off_t>(done));
    if (moved < 0 && errno == EINTR) continue;
    if (moved <= 0) return false;
    done += static_cast<size_t>(moved);
  }
  return true;
}

}  // namespace

LogitStore::LogitStore(int64_t vocab) : vocab_(vocab), directory_(temporary_directory()) {
  require(vocab > 0, "logit store: vocabulary size must be positive, got ", vocab);
  std::string name = directory_ + "/visikv-logits-XXXXXX";
  std::vector<char> path(name.begin(), name.end());
  path.push_back('\0');
  fd_ = mkstemp(path.data());
  require(fd_ >= 0, "logit store: cannot create a temporary file in ", directory_, ": ",
          std::strerror(errno), " (set TMPDIR to a writable directory)");
  unlink(path.data());  // gone when closed, even after a crash
}

LogitStore::~LogitStore() {
  if (fd_ >= 0) close(fd_);
}

void LogitStore::append(std::span<const float> logits) {
  const int64_t n = static_cast<int64_t>(logits.size()) / vocab_;
  require(n * vocab_ == static_cast<int64_t>(logits.size()), "logit store: ", logits.size(),
          " floats are not whole rows of ", vocab_);
  const off_t offset = static_cast<off_t>(rows_ * vocab_ * static_cast<int64_t>(sizeof(float)));
  const auto* bytes = reinterpret_cast<const char*>(logits.data());
  const bool written = transfer_all(logits.size_bytes(), offset, [&](size_t done, off_t at) {
    return pwrite(fd_, bytes + done, logits.size_bytes() - done, at);
  });
  require(written, "logit store: writing ", logits.size_bytes(), " bytes at offset ", offset,
          " of a temporary file in ", directory_, " failed: ", std::strerror(errno),
          " (the store needs tokens x vocabulary x 4 bytes; set TMPDIR to a larger disk)");
  rows_ += n;
}

void LogitStore::read(int64_t first, int64_t n, std::span<float> out) const {
  require(first >= 0 && n >= 0 && first + n <= rows_, "logit store: rows [", first, ", ", first + n,
          ") asked for, ", rows_, " stored");
  require(static_cast<int64_t>(out.size()) >= n * vocab_, "logit store: ", out.size(),
          " floats for ", n, " rows of ", vocab_);
  const off_t offset = static_cast<off_t>(first * vocab_ * static_cast<int64_t>(sizeof(float)));
  const size_t total = static_cast<size_t>(n * vocab_) * sizeof(float);
  auto* bytes = reinterpret_cast<char*>(out.data());
  const bool done = transfer_all(total, offset, [&](size_t moved, off_t at) {
    return pread(fd_, bytes + moved, total - moved, at);
  });
  require(done, "logit store: reading ", n, " rows at row ", first,
          " failed: ", std::strerror(errno));
}

}  // namespace visikv

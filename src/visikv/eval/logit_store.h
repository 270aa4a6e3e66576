// The logits of one run kept on disk, so that later runs over the same positions compare with
// them instead of recomputing them beside every run.
//
// A grid of cache codecs compares every row with the same dense run (eval/perplexity.h,
// PerplexityOptions::reference). Run beside each row, the reference doubles the row's model
// time; held in memory for a whole text it would take tokens x vocab x 4 bytes (1.6 GB for the
// default model at 8192 tokens, 5 GB for a 152K-token vocabulary). Here the rows go to an unnamed
// temporary file (created in std::filesystem::temp_directory_path(), which follows TMPDIR, and
// unlinked at once, so nothing is left behind even by a crash), written once and read back in
// order by each later run: the operating system's page cache keeps what fits in memory.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace visikv {

class LogitStore {
 public:
  // Throws visikv::Error naming the directory when the file cannot be created.
  explicit LogitStore(int64_t vocab);
  ~LogitStore();
  LogitStore(const LogitStore&) = delete;
  LogitStore& operator=(const LogitStore&) = delete;

  int64_t vocab() const { return vocab_; }
  int64_t rows() const { return rows_; }

  // Appends whole rows ({n, vocab} floats). Throws visikv::Error when the write fails (e.g. the
  // disk is full), naming the bytes written so far.
  void append(std::span<const float> logits);

  // Rows [first, first + n) into out ({n, vocab} floats). Throws visikv::Error for rows past the
  // stored ones or a failed read.
  void read(int64_t first, int64_t n, std::span<float> out) const;

 private:
  int fd_ = -1;
  int64_t vocab_ = 0, rows_ = 0;
  std::string directory_;
};

}  // namespace visikv

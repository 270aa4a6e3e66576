// MappedFile and release_resident_pages (core/mapped_file.h): a mapped file's pages let go of come
// back unchanged and stay in the page cache; memory that is not a mapped file is left alone.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "visikv/core/mapped_file.h"

namespace visikv {
namespace {

// This process's resident pages of file mappings (RssFile in /proc/self/status), in KiB.
int64_t resident_file_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.starts_with("RssFile:")) return std::stoll(line.substr(8));
  return -1;
}

TEST(MappedFile, ReleasedPagesComeBackUnchangedAndStayCached) {
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("visikv_mapped_" + std::to_string(::getpid()));
  constexpr size_t kBytes = 16 << 20;
  std::vector<char> contents(kBytes);
  std::mt19937 rng(5);
  for (char& c : contents) c = static_cast<char>(rng());
  std::ofstream(path, std::ios::binary).write(contents.data(), kBytes);
  // Written back, so that its cached pages are clean (a reclaim would take those at once).
  const int fd = ::open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::fsync(fd), 0);
  ::close(fd);
  {
    const MappedFile file(path);
    ASSERT_EQ(file.size(), kBytes);
    const std::span<const std::byte> bytes = file.bytes();
    volatile int sum = 0;  // every page read in, resident in this process
    for (size_t i = 0; i < kBytes; i += 4096) sum = sum + static_cast<int>(bytes[i]);
    const int64_t before = resident_file_kib();
    ASSERT_GE(before, 0) << "no RssFile in /proc/self/status";
    release_resident_pages(bytes);
    const int64_t after = resident_file_kib();
    EXPECT_LT(after, before - static_cast<int64_t>(kBytes / 1024 / 2))
        << "the mapping's pages stayed resident in this process";
    // Still in the page cache: every page of the file.
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    std::vector<unsigned char> cached((kBytes + page - 1) / page);
    ASSERT_EQ(::mincore(const_cast<std::byte*>(bytes.data()), kBytes, cached.data()), 0);
    size_t in_cache = 0;
    for (unsigned char c : cached) in_cache += c & 1;
    EXPECT_EQ(in_cache, cached.size()) << "the file's pages left the page cache";
    // The same bytes on the next read.
    EXPECT_EQ(std::memcmp(bytes.data(), contents.data(), kBytes), 0);
  }
  std::filesystem::remove(path);
}

TEST(MappedFile, OtherMemoryIsLeftAlone) {
  // A heap buffer (anonymous memory, which MADV_DONTNEED would zero) keeps its contents.
  std::vector<std::byte> heap(1 << 20);
  for (size_t i = 0; i < heap.size(); ++i) heap[i] = static_cast<std::byte>(i * 7 + 1);
  release_resident_pages(heap);
  for (size_t i = 0; i < heap.size(); ++i)
    ASSERT_EQ(heap[i], static_cast<std::byte>(i * 7 + 1)) << "byte " << i;
}

}  // namespace
}  // namespace visikv

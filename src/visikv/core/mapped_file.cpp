#include "visikv/core/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "visikv/core/error.h"

namespace visikv {

namespace {

// The address ranges of the live file mappings, so that release_resident_pages acts on them alone.
struct LiveMappings {
  std::mutex mutex;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // [begin, end)
};
LiveMappings& live_mappings() {
  static LiveMappings mappings;
  return mappings;
}

void add_mapping(const std::byte* data, std::size_t size) {
  LiveMappings& live = live_mappings();
  const std::lock_guard lock(live.mutex);
  const auto begin = reinterpret_cast<uintptr_t>(data);
  live.ranges.emplace_back(begin, begin + size);
}

void unmap(const std::byte* data, std::size_t size) {
  {
    LiveMappings& live = live_mappings();
    const std::lock_guard lock(live.mutex);
    std::erase_if(live.ranges, [&](const auto& range) {
      return range.first == reinterpret_cast<uintptr_t>(data);
    });
  }
  ::munmap(const_cast<std::byte*>(data), size);
}

}  // namespace

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  require(fd >= 0, "cannot open ", path, ": ", std::strerror(errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    fail("cannot read ", path, ": not a regular file");
  }
  size_ = static_cast<std::size_t>(info.st_size);
  if (size_ > 0) {
    void* mapped = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int mmap_errno = errno;
    ::close(fd);
    require(mapped != MAP_FAILED, "cannot map ", path, ": ", std::strerror(mmap_errno));
    data_ = static_cast<const std::byte*>(mapped);
    add_mapping(data_, size_);
  } else {
    ::close(fd);
  }
}

void release_resident_pages(std::span<const std::byte> bytes) {
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = (reinterpret_cast<uintptr_t>(bytes.data()) + page - 1) / page * page;
  const auto end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size()) / page * page;
  if (end <= begin) return;
  LiveMappings& live = live_mappings();
  const std::lock_guard lock(live.mutex);
  const bool mapped_file = std::any_of(live.ranges.begin(), live.ranges.end(), [&](const auto& r) {
    return r.first <= begin && end <= r.second;
  });
  // MADV_DONTNEED on a read-only private file mapping drops this process's pages only: the file's
  // pages stay in the page cache (MADV_PAGEOUT would evict them, and every later start would read
  // the model from disk again), and the next read maps them back unchanged.
  if (mapped_file) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) unmap(data_, size_);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) unmap(data_, size_);
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

}  // namespace visikv

// A read-only memory mapping of a whole file, released when the object dies.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>

namespace visikv {

class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;

  std::span<const std::byte> bytes() const { return {data_, size_}; }
  std::size_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// Asks the kernel to reclaim the resident pages wholly inside `bytes` (madvise MADV_PAGEOUT), for
// data read once into another form: a read-only file mapping's pages come back from the file on
// the next read, and no memory ever changes its contents. A hint: where the kernel does not take it
// (before Linux 5.4, other systems, anonymous memory without swap) nothing happens.
void release_resident_pages(std::span<const std::byte> bytes);

}  // namespace visikv

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

// Lets go of this process's resident pages wholly inside `bytes` where they belong to a live
// MappedFile (madvise MADV_DONTNEED), for data read once into another form: they come back from
// the file, unchanged, on the next read, and the file stays in the page cache. Other memory is left
// alone (dropping an anonymous page would zero it).
void release_resident_pages(std::span<const std::byte> bytes);

}  // namespace visikv

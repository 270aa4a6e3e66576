// What a path names, looked up without throwing std::filesystem_error: a path the system cannot
// look up at all (a name too long, a loop of links, no permission) is a visikv::Error naming it.
#pragma once

#include <filesystem>
#include <system_error>

#include "visikv/core/error.h"

namespace visikv {

enum class FileKind { Missing, Regular, Directory, Other };

inline FileKind file_kind(const std::filesystem::path& path) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  if (error == std::errc::no_such_file_or_directory || error == std::errc::not_a_directory)
    return FileKind::Missing;
  require(!error, "cannot look up ", path, ": ", error.message());
  if (std::filesystem::is_regular_file(status)) return FileKind::Regular;
  if (std::filesystem::is_directory(status)) return FileKind::Directory;
  return std::filesystem::exists(status) ? FileKind::Other : FileKind::Missing;
}

}  // namespace visikv

// Token text <-> id tables shared by the tokenizer parts.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

namespace visikv {

// Hash that lets the maps below be searched with a std::string_view without a copy.
struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view text) const noexcept {
    return std::hash<std::string_view>{}(text);
  }
};

using TokenIndex = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

inline std::optional<int32_t> find_token(const TokenIndex& index, std::string_view text) {
  const auto it = index.find(text);
  if (it == index.end()) return std::nullopt;
  return it->second;
}

}  // namespace visikv

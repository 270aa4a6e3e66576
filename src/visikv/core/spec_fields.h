// Spec strings ("int2:g64:tok", "sparse:a1:w64:k32") are colon-separated fields.
#pragma once

#include <string_view>
#include <vector>

namespace visikv {

inline std::vector<std::string_view> split_fields(std::string_view text) {
  std::vector<std::string_view> fields;
  size_t start = 0;
  while (true) {
    const size_t colon = text.find(':', start);
    fields.push_back(text.substr(start, colon == std::string_view::npos ? colon : colon - start));
    if (colon == std::string_view::npos) return fields;
    start = colon + 1;
  }
}

// What follows `prefix` in `field` ("g64", "g" -> "64"); empty when the field does not start with
// it, so that a short or foreign field reads as "no number" instead of indexing past its end.
inline std::string_view after_prefix(std::string_view field, std::string_view prefix) {
  return field.starts_with(prefix) ? field.substr(prefix.size()) : std::string_view();
}

}  // namespace visikv

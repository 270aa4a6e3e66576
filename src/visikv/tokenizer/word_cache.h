// A thread-safe cache of the ids of words already encoded: running text repeats a small set of
// words, so most BPE work is skipped. Bounded: cleared when it grows past its capacity.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "visikv/tokenizer/vocab.h"

namespace visikv {

class WordCache {
 public:
  static constexpr std::size_t kMaxWordBytes = 256;  // longer words are not worth keeping
  static constexpr std::size_t kMaxEntries = std::size_t{1} << 17;

  // Appends the cached ids of `word` to `ids` and returns true, or returns false.
  bool append(std::string_view word, std::vector<int32_t>& ids) const {
    if (word.size() > kMaxWordBytes) return false;
    std::lock_guard lock(mutex_);
    const auto it = entries_.find(word);
    if (it == entries_.end()) return false;
    ids.insert(ids.end(), it->second.begin(), it->second.end());
    return true;
  }

  void store(std::string_view word, std::vector<int32_t> word_ids) const {
    if (word.size() > kMaxWordBytes) return;
    std::lock_guard lock(mutex_);
    if (entries_.size() >= kMaxEntries) entries_.clear();
    entries_.emplace(std::string(word), std::move(word_ids));
  }

 private:
  mutable std::mutex mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>>
      entries_;
};

}  // namespace visikv

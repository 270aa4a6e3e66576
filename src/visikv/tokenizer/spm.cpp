#include "visikv/tokenizer/spm.h"

#include <queue>
#include <string>

#include "visikv/core/error.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {

namespace {

constexpr std::string_view kMetaSpace = "\u2581";

// Whether `token` has a "▁" that directly follows a character other than "▁".
bool joins_words(std::string_view token) {
  for (std::size_t at = token.find(kMetaSpace, 1); at != std::string_view::npos;
       at = token.find(kMetaSpace, at + 1)) {
    if (at < kMetaSpace.size() ||
        token.substr(at - kMetaSpace.size(), kMetaSpace.size()) != kMetaSpace)
      return true;
  }
  return false;
}

}  // namespace

SpmModel::SpmModel(TokenIndex vocab, std::vector<float> scores, std::array<int32_t, 256> byte_ids,
                   std::optional<int32_t> unk_id)
    : vocab_(std::move(vocab)), scores_(std::move(scores)), byte_ids_(byte_ids), unk_id_(unk_id) {
  split_at_word_starts_ = true;
  for (const auto& [text, id] : vocab_) {
    if (joins_words(text)) split_at_word_starts_ = false;
    require(id >= 0 && static_cast<std::size_t>(id) < scores_.size(), "SentencePiece token '", text,
            "' has id ", id, " but there are only ", scores_.size(), " scores");
  }
}

void SpmModel::encode(std::string_view text, std::vector<int32_t>& ids) const {
  if (!split_at_word_starts_) {
    encode_word(text, ids);
    return;
  }
  // Cut before every "▁" that follows another character.
  std::size_t word_start = 0;
  const auto flush = [&](std::size_t end) {
    const std::string_view word = text.substr(word_start, end - word_start);
    word_start = end;
    if (word.empty() || cache_.append(word, ids)) return;
    const std::size_t first = ids.size();
    encode_word(word, ids);
    cache_.store(word,
                 std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(first), ids.end()));
  };
  for (std::size_t at = text.find(kMetaSpace, 1); at != std::string_view::npos;
       at = text.find(kMetaSpace, at + kMetaSpace.size())) {
    const bool after_meta_space =
        at >= kMetaSpace.size() &&
        text.substr(at - kMetaSpace.size(), kMetaSpace.size()) == kMetaSpace;
    if (!after_meta_space) flush(at);
  }
  flush(text.size());
}

void SpmModel::encode_word(std::string_view text, std::vector<int32_t>& ids) const {
  struct Symbol {
    std::size_t begin;
    std::size_t length;  // 0 once merged into its left neighbour
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(text.size());
  for (std::size_t pos = 0; pos < text.size();) {
    const std::size_t length = next_utf8_char(text, pos).length;
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({pos, length, index - 1, index + 1});
    pos += length;
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;

  struct Bigram {
    float score;
    int32_t left;
    int32_t right;
    std::size_t length;
    bool operator<(const Bigram& other) const {  // highest score first, then leftmost
      return score != other.score ? score < other.score : left > other.left;
    }
  };
  std::priority_queue<Bigram> queue;
  const auto try_add = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const std::size_t length = symbols[left].length + symbols[right].length;
    const std::optional<int32_t> id = find_token(vocab_, text.substr(symbols[left].begin, length));
    if (!id) return;
    queue.push({scores_[static_cast<std::size_t>(*id)], left, right, length});
  };
  for (int32_t i = 1; i < static_cast<int32_t>(symbols.size()); ++i) try_add(i - 1, i);

  while (!queue.empty()) {
    const Bigram bigram = queue.top();
    queue.pop();
    Symbol& left = symbols[bigram.left];
    Symbol& right = symbols[bigram.right];
    // A stale entry: one side has been merged since it was queued.
    if (left.length == 0 || right.length == 0 || left.length + right.length != bigram.length ||
        left.next != bigram.right) {
      continue;
    }
    left.length += right.length;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = bigram.left;
    try_add(left.prev, bigram.left);
    try_add(bigram.left, left.next);
  }

  for (int32_t i = 0; i >= 0; i = symbols[i].next) {
    const std::string_view piece = text.substr(symbols[i].begin, symbols[i].length);
    if (const std::optional<int32_t> id = find_token(vocab_, piece)) {
      ids.push_back(*id);
      continue;
    }
    // Only single characters can be unknown here (every merge makes a token): byte fallback.
    for (const char byte : piece) {
      const int32_t byte_id = byte_ids_[static_cast<unsigned char>(byte)];
      if (byte_id >= 0) {
        ids.push_back(byte_id);
      } else {
        require(unk_id_.has_value(), "SentencePiece vocabulary has neither the byte token for 0x",
                std::hex, static_cast<int>(static_cast<unsigned char>(byte)),
                " nor an unknown token, needed for a character of the input");
        ids.push_back(*unk_id_);
      }
    }
  }
}

}  // namespace visikv

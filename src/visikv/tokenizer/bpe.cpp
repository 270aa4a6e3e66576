#include "visikv/tokenizer/bpe.h"

#include <cstdio>
#include <queue>

#include "visikv/core/error.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {

namespace {

std::string byte_token_text(unsigned char byte) {
  char text[8];
  std::snprintf(text, sizeof text, "<0x%02X>", byte);
  return text;
}

}  // namespace

BpeModel::BpeModel(TokenIndex vocab, const std::vector<std::pair<std::string, std::string>>& merges,
                   BpeOptions options)
    : vocab_(std::move(vocab)), options_(std::move(options)) {
  merges_.reserve(merges.size() * 2);
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const std::string& left = merges[rank].first;  // named: lambdas below refer to them
    const std::string& right = merges[rank].second;
    const auto id_of = [&](const std::string& text, const char* what) {
      const std::optional<int32_t> id = find_token(vocab_, text);
      require(id.has_value(), "BPE merge ", rank, " ('", left, "' + '", right, "'): ", what, " '",
              text, "' is not in the vocabulary");
      return *id;
    };
    const int32_t left_id = id_of(left, "token");
    const int32_t right_id = id_of(right, "token");
    const int32_t new_id = id_of(left + right, "merged token");
    // The first occurrence of a pair wins, as in Hugging Face.
    merges_.try_emplace(pair_key(left_id, right_id), Merge{static_cast<int32_t>(rank), new_id});
  }
  for (int b = 0; b < 256; ++b) {
    byte_ids_[b] = find_token(vocab_, byte_token_text(static_cast<unsigned char>(b))).value_or(-1);
  }
}

void BpeModel::encode(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty() || cache_.append(word, ids)) return;
  const std::size_t start = ids.size();
  encode_uncached(word, ids);
  cache_.store(word,
               std::vector<int32_t>(ids.begin() + static_cast<std::ptrdiff_t>(start), ids.end()));
}

void BpeModel::encode_uncached(std::string_view word, std::vector<int32_t>& ids) const {
  if (options_.ignore_merges) {
    if (const std::optional<int32_t> id = find_token(vocab_, word)) {
      ids.push_back(*id);
      return;
    }
  }

  // Initial symbols: one per character, following Hugging Face's BPE::merge_word, including
  // its handling of unknown characters (byte fallback first, else <unk>, fused if asked).
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add = [&](int32_t id) {
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, index + 1, true});
  };
  bool pending_unk = false;
  std::string piece;
  for (std::size_t pos = 0; pos < word.size();) {
    const std::size_t length = next_utf8_char(word, pos).length;
    const bool is_first = pos == 0;
    const bool is_last = pos + length == word.size();
    piece.clear();
    if (!is_first) piece += options_.continuing_subword_prefix;
    piece.append(word.substr(pos, length));
    if (is_last) piece += options_.end_of_word_suffix;
    pos += length;

    if (const std::optional<int32_t> id = find_token(vocab_, piece)) {
      if (pending_unk) add(*options_.unk_id);
      pending_unk = false;
      add(*id);
      continue;
    }
    if (options_.byte_fallback) {
      bool all_bytes = true;
      for (const char byte : piece)
        all_bytes = all_bytes && byte_ids_[static_cast<unsigned char>(byte)] >= 0;
      if (all_bytes) {
        for (const char byte : piece) add(byte_ids_[static_cast<unsigned char>(byte)]);
        continue;
      }
    }
    if (options_.unk_id) {
      if (pending_unk && !options_.fuse_unk) add(*options_.unk_id);
      pending_unk = true;
    }
  }
  if (pending_unk) add(*options_.unk_id);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator<(const Candidate& other) const {  // std::priority_queue pops the largest
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  std::priority_queue<Candidate> queue;
  const auto push_pair = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    const auto it = merges_.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) push_pair(i);

  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    const int32_t right_pos = left.next;
    // Skip entries made stale by an earlier merge of either symbol.
    const auto it = merges_.find(pair_key(left.id, symbols[right_pos].id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;

    Symbol& right = symbols[right_pos];
    left.id = top.new_id;
    left.next = right.next;
    right.alive = false;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    push_pair(left.prev);
    push_pair(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
}

}  // namespace visikv

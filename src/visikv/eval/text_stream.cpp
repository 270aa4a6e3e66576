#include "visikv/eval/text_stream.h"

#include <algorithm>

#include "visikv/tokenizer/utf8.h"

namespace visikv {

TextStream::TextStream(std::vector<std::string> stops) : stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
}

std::string TextStream::push(std::string_view bytes) {
  if (stopped_) return {};
  pending_ += bytes;
  // The earliest stop string ends the text.
  size_t stop_at = std::string::npos;
  for (const std::string& stop : stops_) stop_at = std::min(stop_at, pending_.find(stop));
  if (stop_at != std::string::npos) {
    stopped_ = true;
    std::string out = utf8_lossy(std::string_view(pending_).substr(0, stop_at));
    pending_.clear();
    return out;
  }
  // Hold back the longest tail that a stop string starts with, and an unfinished character.
  size_t held = 0;
  for (const std::string& stop : stops_)
    for (size_t n = std::min(stop.size() - 1, pending_.size()); n > held; --n)
      if (std::string_view(pending_).substr(pending_.size() - n) ==
          std::string_view(stop).substr(0, n)) {
        held = n;
        break;
      }
  const size_t ready = std::min(pending_.size() - held, finished_utf8_prefix(pending_));
  std::string out = utf8_lossy(std::string_view(pending_).substr(0, ready));
  pending_.erase(0, ready);
  return out;
}

std::string TextStream::flush() {
  std::string out = stopped_ ? std::string() : utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace visikv

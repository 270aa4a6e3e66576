// Errors: every failure the user can cause (bad files, bad flags, bad shapes) is reported as a
// visikv::Error whose message names the problem and the object it concerns.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace visikv {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Joins the arguments with operator<< into one string.
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(str_cat(std::forward<Args>(args)...));
}

// Throws visikv::Error with the joined message when the condition does not hold.
template <typename... Args>
void require(bool condition, Args&&... args) {
  if (!condition) fail(std::forward<Args>(args)...);
}

}  // namespace visikv

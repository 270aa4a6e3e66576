// The spec parsers of the command line: key codecs, value codecs and selectors. A spec that
// parses has a canonical text that parses again to the same canonical text.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "fuzz_support.h"
#include "visikv/attention/selector_spec.h"
#include "visikv/kv/codec_spec.h"

using namespace visikv;
using namespace visikv::fuzz;

namespace {

void check_same(const std::string& first, const std::string& again) {
  if (first != again) {
    std::fprintf(stderr, "canonical text '%s' parses to '%s'\n", first.c_str(), again.c_str());
    std::abort();
  }
}

// One side's codec spec: round trip of the canonical text, then the checks a cache runs.
template <typename Spec>
void check_codec_spec(std::string_view text, Spec (*parse)(std::string_view)) {
  expect_clean([&] {
    const Spec spec = parse(text);
    check_same(spec.text(), parse(spec.text()).text());
    expect_clean([&] {
      check_codec_fits(spec.codec, 64);
      (void)codec_bits(spec.codec, 64);
    });
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text = as_text(data, size);
  check_codec_spec(text, parse_key_codec_spec);
  check_codec_spec(text, parse_value_codec_spec);
  expect_clean([&] {
    const SelectorSpec selector = parse_selector_spec(text);
    check_same(describe(selector), describe(parse_selector_spec(describe(selector))));
  });
  return 0;
}

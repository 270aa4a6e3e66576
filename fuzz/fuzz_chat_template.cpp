// A chat template (the whole input): parsing, then rendering over a fixed conversation with
// tools, as the server would. The limits are lowered so that one input stays fast; a template
// over them must end in the limit's visikv::Error like any other bad template.
#include <cstddef>
#include <cstdint>

#include "fuzz_support.h"
#include "visikv/formats/jinja.h"

using namespace visikv;
using namespace visikv::fuzz;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const nlohmann::ordered_json variables = nlohmann::ordered_json::parse(R"({
    "bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": true, "documents": null,
    "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "naïve 日本語 🙂 \"q\" \\ \n"},
      {"role": "assistant", "content": "",
       "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": [1, 2.5, null]}}}]},
      {"role": "tool", "content": "{\"ok\": true}"},
      {"role": "user", "content": ""}],
    "tools": [{"type": "function", "function": {"name": "f", "description": "d",
               "parameters": {"type": "object", "properties": {"x": {"type": "array"}}}}}]})");
  jinja::Limits limits;
  limits.max_template_bytes = 64 << 10;
  limits.max_iterations = 20'000;
  limits.max_output_bytes = 1 << 20;
  expect_clean(
      [&] { (void)jinja::Template::parse(as_text(data, size), limits).render(variables); });
  return 0;
}

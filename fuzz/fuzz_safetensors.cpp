// safetensors files: the header parser and the bounds of every tensor it accepted.
#include <cstddef>
#include <cstdint>

#include "fuzz_support.h"
#include "visikv/formats/safetensors.h"

using namespace visikv;
using namespace visikv::fuzz;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path path = input_file(data, size);
  expect_clean([&] {
    const SafetensorsFile safetensors(path);
    read_small_tensors(safetensors.tensors());
  });
  return 0;
}

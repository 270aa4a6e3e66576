// safetensors files: the header parser and the bounds of every tensor it accepted.
#include <cstddef>
#include <cstdint>

#include "fuzz_support.h"
#include "visikv/formats/dequantize.h"
#include "visikv/formats/safetensors.h"

using namespace visikv;
using namespace visikv::fuzz;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static MemoryFile file;
  const std::filesystem::path path = file.write(as_text(data, size));
  expect_clean([&] {
    const SafetensorsFile safetensors(path);
    for (const TensorRef& tensor : safetensors.tensors())
      if (tensor.elements() <= (int64_t{1} << 16)) (void)to_float(tensor);
  });
  return 0;
}

// GGUF files: the container parser, the model config read from its metadata, the tokenizer built
// from tokenizer.ggml.*, the whole model load (tensor binding and shapes), and dequantization of
// every tensor the parser accepted (its bytes must lie inside the file).
#include <cstddef>
#include <cstdint>

#include "fuzz_support.h"
#include "visikv/formats/gguf.h"
#include "visikv/model/config.h"
#include "visikv/model/model.h"
#include "visikv/tokenizer/tokenizer.h"

using namespace visikv;
using namespace visikv::fuzz;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path path = input_file(data, size);
  expect_clean([&] {
    const GgufFile gguf(path);
    read_small_tensors(gguf.tensors());
    expect_clean([&] { (void)config_from_gguf(gguf.metadata()); });
    expect_clean([&] {
      const Tokenizer tokenizer = Tokenizer::from_gguf_metadata(gguf.metadata());
      const std::vector<int32_t> ids = tokenizer.encode("Hello world, 12345 <s> ünïcode\n", true);
      (void)tokenizer.decode(ids);
    });
  });
  expect_clean([&] { (void)Model::load(path.string()); });
  return 0;
}

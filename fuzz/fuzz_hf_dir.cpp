// Hugging Face model directories: config.json, generation_config.json,
// model.safetensors.index.json and tokenizer_config.json come from the input (four parts, see
// split_parts); the weights (one shard) and tokenizer.json are the tiny llama fixture's, so an
// input that describes them correctly loads a whole model.
#include <cstddef>
#include <cstdint>

#include "fuzz_support.h"
#include "visikv/model/model.h"

using namespace visikv;
using namespace visikv::fuzz;

namespace {

const ScratchDir& model_dir() {
  static const ScratchDir dir = [] {
    ScratchDir made;
    const std::filesystem::path llama = fixtures() / "models" / "llama";
    std::filesystem::create_symlink(llama / "model.safetensors",
                                    made.path() / "model-00001-of-00001.safetensors");
    std::filesystem::create_symlink(llama / "tokenizer.json", made.path() / "tokenizer.json");
    return made;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const ScratchDir& dir = model_dir();
  const std::vector<std::string_view> parts = split_parts(as_text(data, size), 4);
  const char* names[] = {"config.json", "generation_config.json", "model.safetensors.index.json",
                         "tokenizer_config.json"};
  for (size_t i = 0; i < 4; ++i) {
    if (i < parts.size())
      dir.write(names[i], parts[i]);
    else
      dir.remove(names[i]);
  }
  expect_clean([&] { (void)Model::load(dir.path().string()); });
  return 0;
}

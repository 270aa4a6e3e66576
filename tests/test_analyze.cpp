// `visikv analyze` (eval/analyze.h) on the tiny Llama fixture: the library's per-cell figures
// against a direct computation from the stored keys, dense f32 keys giving exactly zero, the
// CLI's JSON, CSV and PNG, and clear errors for bad flags, specs and bases. Also the PNG writer
// (core/png_image.h) against zlib's own decoder.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "test_support.h"
#include "visikv/core/png_image.h"
#include "visikv/eval/analyze.h"
#include "visikv/eval/attention_metrics.h"
#include "visikv/kv/codec_cache.h"
#include "visikv/model/model.h"

namespace visikv {
namespace {

using namespace visikv::test_support;
namespace fs = std::filesystem;

const std::string kModels = std::string(VISIKV_FIXTURES) + "/models";
const std::string& kText = test_support::kEnglishText;

fs::path text_file() {
  const fs::path path = temp_path("analyze_text.txt");
  std::ofstream(path) << kText;
  return path;
}

ProgramRun run_cli(const std::string& args) { return run_visikv("-t 1 " + args); }

std::vector<uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

// Checks signature, chunk CRCs and the IHDR, and returns the inflated scanlines with the size.
struct DecodedPng {
  uint32_t width = 0, height = 0;
  std::vector<uint8_t> scanlines;
};
DecodedPng decode_png(const std::vector<uint8_t>& bytes) {
  DecodedPng out;
  const uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  EXPECT_GE(bytes.size(), 8u);
  EXPECT_EQ(std::memcmp(bytes.data(), signature, 8), 0) << "PNG signature";
  std::vector<uint8_t> idat;
  size_t at = 8;
  bool ended = false;
  while (at + 12 <= bytes.size()) {
    const uint32_t length = be32(&bytes[at]);
    const std::string type(reinterpret_cast<const char*>(&bytes[at + 4]), 4);
    EXPECT_LE(at + 12 + length, bytes.size());
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), &bytes[at + 4], 4 + length);
    EXPECT_EQ(be32(&bytes[at + 8 + length]), static_cast<uint32_t>(crc)) << type << " CRC";
    if (type == "IHDR") {
      EXPECT_EQ(length, 13u);
      out.width = be32(&bytes[at + 8]);
      out.height = be32(&bytes[at + 12]);
      EXPECT_EQ(bytes[at + 16], 8) << "bit depth";
      EXPECT_EQ(bytes[at + 17], 2) << "RGB";
    } else if (type == "IDAT") {
      idat.insert(idat.end(), bytes.begin() + at + 8, bytes.begin() + at + 8 + length);
    } else if (type == "IEND") {
      ended = true;
      EXPECT_EQ(at + 12, bytes.size()) << "IEND ends the file";
    }
    at += 12 + length;
  }
  EXPECT_TRUE(ended);
  uLongf size = static_cast<uLongf>(out.height) * (1 + 3 * static_cast<uLongf>(out.width));
  out.scanlines.resize(size);
  EXPECT_EQ(uncompress(out.scanlines.data(), &size, idat.data(), idat.size()), Z_OK);
  EXPECT_EQ(size, out.scanlines.size()) << "the inflated data has the declared size";
  return out;
}

TEST(PngImage, EncodesPixelsThatZlibDecodesBack) {
  PngImage image(7, 5, {10, 20, 30});
  image.set(3, 2, {200, 100, 50});
  image.set(100, 100, {1, 2, 3});  // clipped
  image.fill_rect(0, 4, 1, 4, {0, 255, 0});
  const DecodedPng png = decode_png(image.encode());
  ASSERT_EQ(png.width, 7u);
  ASSERT_EQ(png.height, 5u);
  auto pixel = [&](int x, int y) {
    const size_t at = static_cast<size_t>(y) * (1 + 3 * 7) + 1 + 3 * x;
    return std::vector<int>{png.scanlines[at], png.scanlines[at + 1], png.scanlines[at + 2]};
  };
  for (int y = 0; y < 5; ++y) EXPECT_EQ(png.scanlines[static_cast<size_t>(y) * 22], 0) << "filter";
  EXPECT_EQ(pixel(3, 2), (std::vector<int>{200, 100, 50}));
  EXPECT_EQ(pixel(0, 0), (std::vector<int>{10, 20, 30}));
  EXPECT_EQ(pixel(1, 4), (std::vector<int>{0, 255, 0}));
  EXPECT_EQ(pixel(2, 4), (std::vector<int>{10, 20, 30}));
  // Text draws the glyph's pixels: '1' has its stem in column 2 of the 5x7 cell.
  PngImage text(12, 7);
  text.text(0, 0, "1", {0, 0, 0});
  EXPECT_EQ(text.pixel(2, 3).r, 0);
  EXPECT_EQ(text.pixel(0, 3).r, 255);
  EXPECT_EQ(PngImage::text_width("ab", 2), 22);
  EXPECT_NE(error_of([] { PngImage(0, 3); }).find("image size"), std::string::npos);
}

const Model& llama() {
  static const Model model = Model::load(kModels + "/llama");
  return model;
}

std::vector<int32_t> fixture_tokens(int64_t n) {
  std::vector<int32_t> tokens = llama().tokenizer().encode(kText, false);
  tokens.resize(static_cast<size_t>(n));
  return tokens;
}

TEST(Analyze, CellsMatchADirectComputationFromTheStoredKeys) {
  const AttentionTrace trace = trace_attention(llama(), fixture_tokens(40));
  AnalyzeOptions options;
  options.key_specs = {parse_analyze_key_spec("f32"), parse_analyze_key_spec("int2:g16:tok")};
  const AnalyzeResult result = analyze_attention(trace, options);
  ASSERT_EQ(result.cells.size(), 2u * trace.layers * trace.heads);
  for (const AnalyzeCell& c : result.cells)
    if (c.key_codec == "f32") {
      EXPECT_EQ(c.kl, 0);
      EXPECT_EQ(c.fisher, 0);
      EXPECT_EQ(c.key_mse, 0);
      EXPECT_EQ(c.flip_rate, 0);
    }
  // int2 per-token keys are quantized at write and never change: recompute every cell from
  // CodecCache::stored_key and the trace's q/k with attention_metrics.
  const int64_t n = trace.tokens, d = trace.head_dim, kv = trace.kv_heads;
  const CacheShape shape{trace.layers, kv, d};
  for (int64_t l = 0; l < trace.layers; ++l) {
    CodecCache cache(shape, parse_codec_spec("int2:g16:tok"), parse_codec_spec("f32"), 0, 32);
    cache.append(l, trace.layer_keys(l), trace.layer_values(l), n);
    std::vector<float> stored(static_cast<size_t>(n * kv * d));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < kv; ++h)
        cache.stored_key(l, h, t, std::span(stored).subspan((t * kv + h) * d, d));
    for (int64_t head = 0; head < trace.heads; ++head) {
      const int64_t h = head / trace.group();
      double kl = 0, fisher = 0, mse = 0;
      for (int64_t t = 0; t < n; ++t) {
        const std::span<const float> q =
            trace.group_queries(l, t, h).subspan((head % trace.group()) * d, d);
        std::vector<double> s(t + 1), s_hat(t + 1);
        double mse_t = 0;
        for (int64_t j = 0; j <= t; ++j) {
          double exact = 0, seen = 0;
          for (int64_t c = 0; c < d; ++c) {
            exact += double(q[c]) * trace.layer_keys(l)[(j * kv + h) * d + c];
            seen += double(q[c]) * stored[(j * kv + h) * d + c];
          }
          s[j] = trace.scale * exact;
          s_hat[j] = trace.scale * seen;
          mse_t += squared_error(trace.layer_keys(l).subspan((j * kv + h) * d, d),
                                 std::span(stored).subspan((j * kv + h) * d, d)) /
                   d;
        }
        kl += softmax_kl<double>(s, s_hat);
        fisher += compare_attention<double>(s, s_hat).fisher;
        mse += mse_t / (t + 1);
      }
      const AnalyzeCell& cell = result.cells[trace.layers * trace.heads + l * trace.heads + head];
      ASSERT_EQ(cell.key_codec, "int2:g16:tok");
      ASSERT_EQ(cell.layer, l);
      ASSERT_EQ(cell.head, head);
      // The engine scores in float: agreement to float rounding of the logits.
      EXPECT_NEAR(cell.kl, kl / n, 1e-4 * kl / n + 1e-7);
      EXPECT_NEAR(cell.fisher, fisher / n, 1e-4 * fisher / n + 1e-7);
      EXPECT_NEAR(cell.key_mse, mse / n, 1e-9 * mse / n);
      EXPECT_GT(cell.kl, 0);
    }
  }
}

TEST(Analyze, ValueMetricsAndTheA2Surrogate) {
  const AttentionTrace trace = trace_attention(llama(), fixture_tokens(48));
  AnalyzeOptions options;
  options.key_specs = {parse_analyze_key_spec("f32")};
  options.value_codec = parse_value_codec_spec("int2:g16:tok");
  const AnalyzeResult result = analyze_attention(trace, options);
  for (const AnalyzeCell& c : result.cells) {
    ASSERT_TRUE(c.value_error && c.value_only_error && c.a2_surrogate);
    // Exact keys: the readout error is the value-only error.
    EXPECT_NEAR(*c.value_error, *c.value_only_error, 1e-5 * *c.value_error);
    EXPECT_GT(*c.a2_surrogate, 0);
  }
  // Without a value codec there are no value figures.
  options.value_codec.reset();
  for (const AnalyzeCell& c : analyze_attention(trace, options).cells)
    EXPECT_FALSE(c.value_error.has_value());
}

TEST(Analyze, BadOptionsAreClearErrors) {
  const AttentionTrace trace = trace_attention(llama(), fixture_tokens(8));
  AnalyzeOptions options;
  options.key_specs = {parse_analyze_key_spec("null")};
  EXPECT_NE(
      error_of([&] { analyze_attention(trace, options); }).find("needs a calibrated HeadQ basis"),
      std::string::npos);
  options.key_specs = {
      parse_analyze_key_spec("int2:g64:tok")};  // groups of 64 do not divide head_dim 16
  EXPECT_NE(error_of([&] { analyze_attention(trace, options); }).find("int2:g64:tok"),
            std::string::npos);
  options.key_specs = {parse_analyze_key_spec("f32")};
  options.entropy_edges = {2, 1};
  EXPECT_NE(error_of([&] { analyze_attention(trace, options); }).find("--entropy-bins"),
            std::string::npos);
  EXPECT_NE(error_of([&] { trace_attention(llama(), fixture_tokens(1)); }).find("at least 2"),
            std::string::npos);
}

TEST(AnalyzeCli, WritesJsonCsvAndPlot) {
  const fs::path text = text_file(), json_path = temp_path("analyze.json"),
                 csv_path = temp_path("analyze.csv"), png_path = temp_path("analyze.png");
  const ProgramRun run = run_cli(str_cat(
      "analyze ", kModels, "/llama --keys f32,int2:g16:tok,int3:g16:tok --tokens 48 --text ",
      text.string(), " --json ", json_path.string(), " --csv ", csv_path.string(), " --plot ",
      png_path.string()));
  ASSERT_EQ(run.status, 0) << run.output;
  EXPECT_NE(run.output.find("Spearman(F, KL)"), std::string::npos) << run.output;
  const nlohmann::json j = read_json(json_path);
  ASSERT_TRUE(j.contains("cells") && j.contains("codecs") && j.contains("spearman") &&
              j.contains("pearson"));
  EXPECT_EQ(j["tokens"], 48);
  EXPECT_EQ(j["cells"].size(), 3u * 2 * 4);  // 3 specs x 2 layers x 4 heads
  for (const char* measure : {"key_mse", "fisher"}) {
    for (const char* kind : {"spearman", "pearson"}) {
      ASSERT_TRUE(j[kind][measure].is_number()) << kind << " " << measure;
      const double r = j[kind][measure];
      EXPECT_GE(r, -1);
      EXPECT_LE(r, 1);
    }
  }
  ASSERT_EQ(j["codecs"].size(), 3u);
  for (const auto& c : j["codecs"]) {
    ASSERT_TRUE(c.contains("key_codec") && c.contains("kl_mean") && c.contains("fisher_mean") &&
                c.contains("mse_mean"));
  }
  EXPECT_EQ(j["codecs"][0]["key_codec"], "f32");
  EXPECT_EQ(j["codecs"][0]["kl_mean"], 0.0);
  EXPECT_EQ(j["codecs"][0]["fisher_mean"], 0.0);
  EXPECT_GT(j["codecs"][1]["kl_mean"].get<double>(), 0);
  EXPECT_GT(j["codecs"][1]["kl_mean"].get<double>(), j["codecs"][2]["kl_mean"].get<double>())
      << "2-bit keys disturb attention more than 3-bit keys";
  // Flips by entropy bin add up to the flips.
  for (const auto& cell : j["cells"]) {
    int64_t queries = 0, flips = 0;
    for (const auto& b : cell["flips_by_entropy"]) {
      queries += b["queries"].get<int64_t>();
      flips += b["flips"].get<int64_t>();
    }
    EXPECT_EQ(queries, cell["queries"].get<int64_t>());
    EXPECT_NEAR(flips, cell["flip_rate"].get<double>() * queries, 1e-9);
  }
  // CSV: a header and one line per cell.
  std::ifstream csv(csv_path);
  std::string line;
  int lines = 0;
  while (std::getline(csv, line)) ++lines;
  EXPECT_EQ(lines, 1 + 24);
  // PNG: a valid file of the size its header declares.
  const DecodedPng png = decode_png(read_bytes(png_path));
  EXPECT_GT(png.width, 500u);
  EXPECT_GT(png.height, 300u);
  for (const fs::path& p : {text, json_path, csv_path, png_path}) fs::remove(p);
}

TEST(AnalyzeCli, DefaultSetCalibratesAndRunsTheControls) {
  const fs::path text = text_file(), json_path = temp_path("analyze_default.json");
  const ProgramRun run = run_cli(str_cat("analyze ", kModels, "/llama --tokens 32 --text ",
                                         text.string(), " --calibration-text ", text.string(),
                                         " --calibration-tokens 64 --json ", json_path.string()));
  ASSERT_EQ(run.status, 0) << run.output;
  const nlohmann::json j = read_json(json_path);
  EXPECT_EQ(j["basis"]["source"], "calibrated");
  EXPECT_EQ(j["basis"]["rank"], 16);
  auto find = [&](const std::string& name) -> const nlohmann::json* {
    for (const auto& c : j["codecs"])
      if (c["key_codec"] == name) return &c;
    return nullptr;
  };
  for (const char* name : {"f16", "int2:g16:tok", "int2:g16:tok:had", "int2:g16:tok+headq:r8:s4",
                           "null:a1", "span:query:int2:g16:tok", "span:null:int2:g16:tok"})
    EXPECT_NE(find(name), nullptr) << name;
  // The moved error keeps the key MSE of the codec it came from.
  const double base = (*find("int2:g16:tok"))["mse_mean"];
  EXPECT_NEAR((*find("span:query:int2:g16:tok"))["mse_mean"].get<double>(), base, 1e-5 * base);
  fs::remove(text);
  fs::remove(json_path);
}

TEST(AnalyzeCli, BadFlagsSpecsAndBasesAreClearErrors) {
  const fs::path text = text_file();
  const std::string model = kModels + "/llama", with_text = " --text " + text.string();
  auto expect_error = [&](const std::string& args, const std::string& message) {
    const ProgramRun run = run_cli("analyze " + args);
    EXPECT_NE(run.status, 0) << args;
    EXPECT_NE(run.output.find(message), std::string::npos) << args << ": " << run.output;
  };
  expect_error(model + " --tokens 1" + with_text, "--tokens must be at least 2");
  expect_error(model + " --tokens 500 --keys f32" + with_text, "exceeds the model's context");
  expect_error(model + " --keys int2:g16:tok,bogus" + with_text, "bogus");
  expect_error(model + " --keys null:a0" + with_text, "amplitude");
  expect_error(model + " --keys f32 --values int9:g16:tok" + with_text, "int9");
  expect_error(model + " --keys null --basis " + temp_path("missing.basis").string() + with_text,
               "no such file");
  expect_error(model + " --keys f32 --null-energy 1.5" + with_text, "--null-energy");
  expect_error(model + " --keys f32 --entropy-bins 3,1" + with_text, "--entropy-bins");
  // A basis calibrated for another model.
  const fs::path basis = temp_path("analyze_qwen.basis");
  const ProgramRun calibrate =
      run_cli(str_cat("calibrate ", kModels, "/qwen2 --text ", text.string(),
                      " --tokens 32 --rank 4 --out ", basis.string()));
  ASSERT_EQ(calibrate.status, 0) << calibrate.output;
  expect_error(model + " --keys null --basis " + basis.string() + with_text, "another model");
  fs::remove(basis);
  fs::remove(text);
}

}  // namespace
}  // namespace visikv

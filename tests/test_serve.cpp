// The server's pieces without sockets: the text stream (whole characters, stop strings), the
// OpenAI request checks, the batched forward the scheduler runs, and the scheduler itself.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "visikv/eval/generate.h"
#include "visikv/kv/cache_factory.h"
#include "visikv/model/decoder.h"
#include "visikv/model/model.h"
#include "visikv/serve/openai_api.h"
#include "visikv/serve/scheduler.h"
#include "visikv/eval/text_stream.h"
#include "visikv/tokenizer/utf8.h"

namespace visikv {
namespace {

const std::string kLlama = std::string(VISIKV_FIXTURES) + "/models/llama";

TEST(TextStream, SendsWholeCharactersOnly) {
  TextStream stream;
  const std::string cafe = "caf\xC3\xA9!";  // é split over two pushes
  EXPECT_EQ(stream.push(cafe.substr(0, 4)), "caf");
  EXPECT_EQ(stream.push(cafe.substr(4)), "\xC3\xA9!");
  EXPECT_EQ(stream.push("\xF0\x9F"), "");
  EXPECT_EQ(stream.flush(), "\xEF\xBF\xBD");  // an unfinished character at the end: U+FFFD
}

TEST(TextStream, StopStringsEndTheTextAndAreNeverSent) {
  TextStream stream({"\nUser:", "###"});
  EXPECT_EQ(stream.push("Hello"), "Hello");
  EXPECT_EQ(stream.push(" there\nUs"), " there");  // "\nUs" may start "\nUser:"
  EXPECT_EQ(stream.push("ual"), "\nUsual");        // it did not
  EXPECT_FALSE(stream.stopped());
  EXPECT_EQ(stream.push(" end #"), " end ");
  EXPECT_EQ(stream.push("## more"), "");
  EXPECT_TRUE(stream.stopped());
  EXPECT_EQ(stream.push("after"), "");
  EXPECT_EQ(stream.flush(), "");
}

struct ServeTest : ::testing::Test {
  Model model = Model::load(kLlama);
  RequestDefaults defaults{.model_id = "llama", .max_tokens_limit = 64};

  ParsedRequest parse(const std::string& body, Endpoint endpoint = Endpoint::Completions) {
    return parse_request(endpoint, body, model, defaults, {});
  }
  RequestError error(const std::string& body, Endpoint endpoint = Endpoint::Completions) {
    try {
      parse(body, endpoint);
    } catch (const RequestError& e) {
      return e;
    }
    ADD_FAILURE() << "no error for " << body;
    return {};
  }
};

TEST_F(ServeTest, RequestsBecomeSequences) {
  const ParsedRequest p = parse(
      R"({"model": "llama", "prompt": "Hello world", "max_tokens": 7, "temperature": 0,
          "stop": ["x"], "stream": true, "seed": 5, "visikv": {"keys": "int4:g16:tok"}})");
  EXPECT_TRUE(p.stream);
  EXPECT_EQ(p.sequence.prompt, model.tokenizer().encode("Hello world", true));
  EXPECT_EQ(p.sequence.max_tokens, 7);
  EXPECT_EQ(p.sequence.sampling.temperature, 0.0);
  EXPECT_EQ(p.sequence.sampling.seed, 5u);
  EXPECT_EQ(p.sequence.stop, std::vector<std::string>{"x"});
  EXPECT_EQ(p.sequence.keys.text(), "int4:g16:tok");
  EXPECT_EQ(parse(R"({"prompt": [1, 5, 9]})").sequence.prompt, (std::vector<int32_t>{1, 5, 9}));
  EXPECT_EQ(parse(R"({"prompt": "hi"})").sequence.max_tokens, 16);  // OpenAI's default
}

TEST_F(ServeTest, BadRequestsNameTheProblem) {
  EXPECT_EQ(error(R"({"prompt": "x", "max_tokens": "a"})").param, "max_tokens");
  EXPECT_EQ(error(R"({"prompt": "x", "max_tokens": 0})").param, "max_tokens");
  EXPECT_EQ(error(R"({"prompt": "x", "max_tokens": 65})").param, "max_tokens");  // the limit
  EXPECT_EQ(error(R"({"prompt": "x", "temperature": -1})").param, "temperature");
  EXPECT_EQ(error(R"({"prompt": "x", "top_p": 0})").param, "top_p");
  EXPECT_EQ(error(R"({"prompt": "x", "n": 2})").param, "n");
  EXPECT_EQ(error(R"({"prompt": "x", "stop": [1]})").param, "stop");
  EXPECT_EQ(error(R"({"prompt": [1, 99999]})").param, "prompt");
  EXPECT_EQ(error(R"({"max_tokens": 3})").param, "prompt");
  EXPECT_EQ(error(R"({"prompt": "x", "visikv": {"keys": "int5:g1:tok"}})").param, "visikv.keys");
  EXPECT_EQ(error(R"({"prompt": "x", "visikv": {"cache": "f16"}})").param, "visikv.cache");
  EXPECT_EQ(error(R"({"prompt": "x", "visikv": {"selector": "nope"}})").param, "visikv.selector");
  EXPECT_EQ(error(R"([1, 2])").param, "");
  EXPECT_NE(error(R"({"prompt": )").message.find("malformed JSON"), std::string::npos);
  const RequestError unknown = error(R"({"model": "gpt-4", "prompt": "x"})");
  EXPECT_EQ(unknown.status, 404);
  EXPECT_EQ(unknown.code, "model_not_found");
  // The fixture's context is 128 positions.
  const RequestError overflow = error(R"({"prompt": [)" + std::string(120 * 2, ' ') + [] {
    std::string ids;
    for (int i = 0; i < 120; ++i) ids += (i ? ",5" : "5");
    return ids;
  }() + R"(], "max_tokens": 20})");
  EXPECT_EQ(overflow.code, "context_length_exceeded");
  // Without a chat template a chat request is refused clearly.
  EXPECT_NE(error(R"({"messages": [{"role": "user", "content": "hi"}]})", Endpoint::ChatCompletions)
                .message.find("no chat template"),
            std::string::npos);
  EXPECT_EQ(error(R"({"messages": []})", Endpoint::ChatCompletions).param, "messages");
}

// A batched forward of several sequences at different positions computes, per sequence, what
// forwarding it alone computes (bit for bit with per-token rounding).
TEST_F(ServeTest, ForwardBatchEqualsSeparateForwards) {
  Decoder decoder(model);
  decoder.set_product_rounding(ProductRounding::PerToken);
  const std::vector<std::vector<int32_t>> prompts = {{1, 20, 30, 40, 50}, {1, 7}, {1, 9, 9, 9}};
  const std::vector<std::string> key_specs = {"f32", "int4:g16:tok", "f16"};
  const int64_t vocab = model.config().vocab_size;
  std::vector<std::unique_ptr<KVCache>> alone, together;
  std::vector<std::vector<float>> expected(prompts.size()), got(prompts.size());
  for (size_t s = 0; s < prompts.size(); ++s) {
    alone.push_back(make_cache(decoder.cache_shape(), key_specs[s], "f32", 16));
    together.push_back(make_cache(decoder.cache_shape(), key_specs[s], "f32", 16));
    // Prefill all but the last token alone in both, so the batch starts at different positions.
    const std::span<const int32_t> head(prompts[s].data(), prompts[s].size() - 1);
    decoder.next_logits(head, *alone[s]);
    decoder.next_logits(head, *together[s]);
    expected[s] = decoder.next_logits({&prompts[s].back(), 1}, *alone[s]);
  }
  std::vector<DecoderSegment> segments;
  for (size_t s = 0; s < prompts.size(); ++s)
    segments.push_back({.tokens = {&prompts[s].back(), 1},
                        .cache = together[s].get(),
                        .rows = LogitRows::Last,
                        .sink = [&got, s, vocab](int64_t, int64_t, std::span<const float> l) {
                          got[s].assign(l.end() - vocab, l.end());
                        }});
  decoder.forward_batch(segments);
  for (size_t s = 0; s < prompts.size(); ++s) {
    EXPECT_EQ(got[s], expected[s]) << "sequence " << s;
    EXPECT_EQ(together[s]->length(0), alone[s]->length(0));
  }
}

// Sequences run together through the scheduler give what generate() gives each alone (greedy).
TEST_F(ServeTest, SchedulerRunsSequencesTogether) {
  const std::vector<std::string> prompts = {"Hello world", "The cat", "A", "Once upon a time"};
  std::vector<std::string> expected;
  for (const std::string& p : prompts) {
    Decoder decoder(model);
    auto cache = make_cache(decoder.cache_shape(), "f32", "f32", 64);
    GenerationOptions options;
    options.max_new_tokens = 12;
    options.stop_at_eos = true;
    const std::vector<int32_t> prompt = model.tokenizer().encode(p, true);
    const GenerationResult r = generate(decoder, *cache, prompt, options);
    std::string text;
    for (int32_t t : r.tokens)
      if (!model.tokenizer().is_special(t)) text += model.tokenizer().token_bytes(t);
    expected.push_back(utf8_lossy(text));  // the server sends valid UTF-8
  }
  Scheduler scheduler(model, 3);  // four requests, three slots: one waits
  std::vector<std::shared_ptr<SequenceHandle>> handles;
  for (const std::string& p : prompts) {
    SequenceRequest request;
    request.prompt = model.tokenizer().encode(p, true);
    request.max_tokens = 12;
    handles.push_back(scheduler.submit(request));
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::string text;
    SequenceUpdate u;
    do {
      u = handles[i]->next();
      text += u.text;
    } while (!u.finished);
    EXPECT_NE(u.finish_reason, "error") << u.error;
    // Logits agree to float rounding; greedy choices on this fixture are far from ties.
    EXPECT_EQ(text, expected[i]) << prompts[i];
  }
  EXPECT_EQ(scheduler.stats().requests, 4);
}

}  // namespace
}  // namespace visikv

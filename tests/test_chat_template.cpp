// Chat templates (tokenizer/chat_template.h over formats/jinja.h): every case of
// tests/fixtures/chat_templates/cases.json (rendered by transformers' renderer on jinja2, see
// scripts/make_chat_template_fixtures.py) renders byte for byte, or fails with jinja2's message;
// bad templates and hostile ones end in a visikv::Error naming the problem and the place.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "test_support.h"
#include "visikv/core/error.h"
#include "visikv/formats/gguf.h"
#include "visikv/formats/jinja.h"
#include "visikv/model/model.h"
#include "visikv/tokenizer/chat_template.h"
#include "visikv/tokenizer/tokenizer.h"

using namespace visikv;
using namespace visikv::test_support;
using nlohmann::ordered_json;

namespace {

const std::filesystem::path kDir = std::filesystem::path(VISIKV_FIXTURES) / "chat_templates";

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "missing fixture ", path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Renders a bare template over `variables` (a JSON object in text).
std::string render(const std::string& source, const std::string& variables = "{}") {
  return jinja::Template::parse(source).render(ordered_json::parse(variables));
}

std::string render_error(const std::string& source, const std::string& variables = "{}",
                         const jinja::Limits& limits = {}) {
  return error_of(
      [&] { jinja::Template::parse(source, limits).render(ordered_json::parse(variables)); });
}

}  // namespace

TEST(ChatTemplate, OracleCasesRenderByteIdentical) {
  const ordered_json fixture = ordered_json::parse(read_text(kDir / "cases.json"));
  std::map<std::string, ChatTemplate> templates;
  int rendered = 0, failed = 0;
  for (const auto& c : fixture["cases"]) {
    const std::string name = c["template"];
    if (!templates.contains(name))
      templates.emplace(name,
                        ChatTemplate::parse(read_text(kDir / "templates" / (name + ".jinja"))));
    const ChatTemplate& chat = templates.at(name);
    const std::string label =
        name + " / " + c["conversation"].get<std::string>() +
        (c["add_generation_prompt"].get<bool>() ? " + generation prompt" : "");
    const auto run = [&] {
      return chat.render(c["messages"], c["add_generation_prompt"].get<bool>(), c["tools"],
                         c["variables"]);
    };
    if (c.contains("expected")) {
      std::string output;
      EXPECT_NO_THROW(output = run()) << label;
      EXPECT_EQ(output, c["expected"].get<std::string>()) << label;
      ++rendered;
    } else {
      const std::string message = error_of([&] { run(); });
      EXPECT_NE(message.find(c["expected_error"].get<std::string>()), std::string::npos)
          << label << ": " << message;
      ++failed;
    }
  }
  // Every template of the fixture contributed, and both outcomes are covered.
  EXPECT_EQ(templates.size(), 7u);
  EXPECT_GT(rendered, 60);
  EXPECT_GT(failed, 0);
}

TEST(ChatTemplate, SyntaxErrorsNameLineAndColumn) {
  EXPECT_NE(render_error("ab\n  {{ 1 + }}").find("line 2, column 10: expected an expression"),
            std::string::npos)
      << render_error("ab\n  {{ 1 + }}");
  EXPECT_NE(render_error("{% if x %}open")
                .find("line 1, column 1: block is not closed: expected '{% elif %}'"),
            std::string::npos)
      << render_error("{% if x %}open");
  EXPECT_NE(render_error("{{ x").find("unclosed tag"), std::string::npos);
  EXPECT_NE(render_error("{# x").find("unclosed comment"), std::string::npos);
  EXPECT_NE(render_error("{{ 'abc }}").find("unterminated string literal"), std::string::npos);
  EXPECT_NE(render_error("x\n{% include 'a' %}")
                .find("line 2, column 4: unknown or unsupported tag 'include'"),
            std::string::npos);
  EXPECT_NE(render_error("{% break %}").find("'break' outside of a loop"), std::string::npos);
  EXPECT_NE(render_error("{% endfor %}").find("unknown or unsupported tag 'endfor'"),
            std::string::npos);
  EXPECT_NE(render_error(std::string("{{ '\xff' }}")).find("not valid UTF-8"), std::string::npos);
}

TEST(ChatTemplate, UnknownFiltersAndTestsAreSyntaxErrors) {
  EXPECT_NE(
      render_error("{{ x | frobnicate }}").find("line 1, column 8: no filter named 'frobnicate'"),
      std::string::npos)
      << render_error("{{ x | frobnicate }}");
  EXPECT_NE(render_error("{{ x is frob }}").find("no test named 'frob'"), std::string::npos);
  EXPECT_NE(render_error("{{ [1] | map('nope') | list }}").find("no filter named 'nope'"),
            std::string::npos);
}

TEST(ChatTemplate, RaiseExceptionCarriesTheMessage) {
  const std::string message = render_error("\n{{ raise_exception('roles must alternate') }}");
  EXPECT_NE(message.find("line 2"), std::string::npos) << message;
  EXPECT_NE(message.find("roles must alternate"), std::string::npos) << message;
}

TEST(ChatTemplate, UndefinedBehavesLikeJinja2) {
  // Printing, truth, length, default and tests are fine on undefined values...
  EXPECT_EQ(render("[{{ missing }}]{{ missing | length }}{{ missing | default('d') }}{{ missing is "
                   "defined }}"
                   "{% if not missing %}F{% endif %}{% for x in missing %}no{% endfor %}{{ {}.a "
                   "}}{{ none.b }}"),
            "[]0dFalseF");
  // ...their attributes, items, arithmetic, ordering and calls are errors naming them, as in
  // jinja2.
  EXPECT_NE(render_error("{{ missing.attr }}").find("'missing' is undefined"), std::string::npos);
  EXPECT_NE(render_error("{{ m.a.b }}", R"({"m": {}})").find("'dict object' has no attribute 'a'"),
            std::string::npos);
  EXPECT_NE(render_error("{{ missing + 1 }}").find("'missing' is undefined"), std::string::npos);
  EXPECT_NE(render_error("{{ missing < 1 }}").find("'missing' is undefined"), std::string::npos);
  EXPECT_NE(render_error("{{ missing() }}").find("'missing' is undefined"), std::string::npos);
  EXPECT_NE(render_error("{{ missing | tojson }}").find("not JSON serializable"),
            std::string::npos);
}

TEST(ChatTemplate, StrftimeNowFormatsTheLocalTime) {
  // The date changes; its shape does not (the llama fixture passes date_string instead).
  EXPECT_EQ(render("{{ strftime_now('%Y-%m') | length }} {{ strftime_now('%Y')[:2] | int > 19 }}"),
            "7 True");
}

TEST(ChatTemplate, TypeErrorsAreClear) {
  EXPECT_NE(
      render_error("{{ 'a' + 1 }}").find("unsupported operand type(s) for +: 'str' and 'int'"),
      std::string::npos);
  EXPECT_NE(render_error("{{ 1 // 0 }}").find("by zero"), std::string::npos);
  EXPECT_NE(render_error("{% set x = [] %}{{ x.append(1) }}").find("cannot be modified"),
            std::string::npos);
  EXPECT_NE(render_error("{% set x = {} %}{% set x.a = 1 %}").find("only namespace() objects"),
            std::string::npos);
  EXPECT_NE(render_error("{{ 9223372036854775807 + 1 }}").find("integer overflow"),
            std::string::npos);
}

TEST(ChatTemplate, LimitsBoundSizeDepthLoopsAndOutput) {
  jinja::Limits small;
  small.max_template_bytes = 16;
  EXPECT_NE(render_error(std::string(17, 'x'), "{}", small).find("over the limit of 16"),
            std::string::npos);

  EXPECT_NE(render_error("{{ " + std::string(500, '(') + "1" + std::string(500, ')') + " }}")
                .find("nests deeper than 128"),
            std::string::npos);
  std::string blocks;
  for (int i = 0; i < 200; ++i) blocks += "{% if true %}";
  EXPECT_NE(render_error(blocks).find("nests deeper than 128"), std::string::npos);

  EXPECT_NE(render_error("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
                .find("calls nest deeper"),
            std::string::npos);
  EXPECT_NE(
      render_error("{% for i in range(2000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}")
          .find("more than 1000000 loop iterations"),
      std::string::npos);
  jinja::Limits tiny_output;
  tiny_output.max_output_bytes = 1000;
  EXPECT_NE(render_error("{% for i in range(600) %}ab{% endfor %}", "{}", tiny_output)
                .find("output is over"),
            std::string::npos);
  EXPECT_NE(render_error("{{ 'ab' * 100000000 }}").find("over the size limit"), std::string::npos);
  EXPECT_NE(
      render_error(
          "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}"
          "{% endfor %}")
          .find("over the size limit"),
      std::string::npos);
}

TEST(ChatTemplate, WhitespaceControlMatchesJinja2Settings) {
  // trim_blocks, lstrip_blocks, '-' and '+', one trailing newline dropped, \r\n normalized.
  EXPECT_EQ(render("a\n  {% if true %}\n  b\n  {% endif %}\nc\n"), "a\n  b\nc");
  EXPECT_EQ(render("a  {%- if true -%}  b  {%- endif %}"), "ab");
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");
  EXPECT_EQ(render("{{ 'v' }}\n{# c #}\nz\r\n\r\n"), "v\nz\n");
}

TEST(ChatTemplate, RendererArgumentsAreChecked) {
  const ChatTemplate chat = ChatTemplate::parse("{{ messages | length }}{{ tools is none }}");
  EXPECT_EQ(chat.render(ordered_json::parse(R"([{"role": "user", "content": "x"}])"), false),
            "1True");
  EXPECT_NE(error_of([&] { chat.render(ordered_json::array(), false); }).find("empty conversation"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              chat.render(ordered_json::parse("[1]"), false);
            }).find("message 0 is not a JSON object"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              chat.render(ordered_json::parse(R"([{"role": "user"}])"), false, nullptr,
                          ordered_json::parse(R"({"messages": 1})"));
            }).find("'messages' is set by the renderer"),
            std::string::npos);
  EXPECT_NE(
      error_of([] { ChatTemplate::parse("{% if %}"); }).find("chat template: template line 1"),
      std::string::npos);
}

TEST(ChatTemplate, TemplateSourcesOfHfDirectories) {
  const auto dir = temp_path("visikv_chat_template_dir");
  std::filesystem::create_directories(dir);
  const auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
  };
  EXPECT_FALSE(chat_template_from_hf_dir(dir).has_value());
  write("tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "T"},
                                                       {"name": "default", "template": "D"}]})");
  EXPECT_EQ(chat_template_from_hf_dir(dir).value(), "D");
  write("tokenizer_config.json", R"({"chat_template": [{"name": "tool_use", "template": "T"}]})");
  EXPECT_NE(error_of([&] { chat_template_from_hf_dir(dir); }).find("none is named \"default\""),
            std::string::npos);
  write("tokenizer_config.json", R"({"chat_template": "S"})");
  EXPECT_EQ(chat_template_from_hf_dir(dir).value(), "S");
  write("chat_template.json", R"({"chat_template": "J"})");
  EXPECT_EQ(chat_template_from_hf_dir(dir).value(), "J");
  write("chat_template.jinja", "F");
  EXPECT_EQ(chat_template_from_hf_dir(dir).value(), "F");
  std::filesystem::remove_all(dir);

  // A fixture model without a template: rendering asks for one and says which is missing.
  const Tokenizer tokenizer = Tokenizer::from_hf_json(std::filesystem::path(VISIKV_FIXTURES) /
                                                      "models" / "llama" / "tokenizer.json");
  EXPECT_FALSE(tokenizer.chat_template().has_value());
  EXPECT_NE(error_of([&] { ChatTemplate::from_tokenizer(tokenizer); }).find("has no chat template"),
            std::string::npos);
}

TEST(ChatTemplate, DefaultModelTemplateComesFromGguf) {
  const auto path = Model::default_model_path();
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "default model not fetched";
  const GgufFile file(path);
  const Tokenizer tokenizer = Tokenizer::from_gguf_metadata(file.metadata());
  ASSERT_TRUE(tokenizer.chat_template().has_value());
  EXPECT_EQ(*tokenizer.chat_template(), read_text(kDir / "templates" / "smollm2.jinja"));
  const ChatTemplate chat = ChatTemplate::from_tokenizer(tokenizer);
  EXPECT_EQ(chat.render(ordered_json::parse(R"([{"role": "user", "content": "Hi"}])"), true,
                        nullptr, chat_template_special_tokens(tokenizer)),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

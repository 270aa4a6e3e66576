#!/usr/bin/env python3
"""Writes tests/fixtures/chat_templates/cases.json: chat templates rendered by Hugging Face
transformers' own chat-template renderer (transformers.utils.chat_template_utils.render_jinja_template,
the function apply_chat_template(..., tokenize=False) calls, on jinja2) over several conversations.

Templates come from tests/fixtures/chat_templates/templates/*.jinja. The two GGUF models'
templates (tokenizer.chat_template) are copied there first when the models are present
(scripts/fetch_default_model.sh, scripts/fetch_qwen_coder.sh), so the tests never need them.
A case jinja2 rejects (raise_exception, an undefined attribute) is written with the error message
instead of an output. Needs scripts/requirements-fixtures.txt. Run from anywhere:
    python3 scripts/make_chat_template_fixtures.py
"""
import json
import pathlib

import gguf
import jinja2
import transformers
from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "chat_templates"
TEMPLATES = OUT / "templates"
GGUF_TEMPLATES = {
    "smollm2": ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen25_coder": ROOT / "models" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
# Special tokens each template is rendered with (transformers passes special_tokens_map).
SPECIAL = {
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "qwen25_coder": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "tinyllama_zephyr": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama3_tools": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "features": {"bos_token": "<s>", "eos_token": "</s>"},
}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city — today or später",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "number"}, "b": {"type": "number"}}}}},
]
UNICODE = "naïve café 日本語 🙂 \"double\" 'single' \\ backslash\ttab\nnew line  "
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system_user": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [{"role": "system", "content": "Be helpful."},
                   {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke."}],
    "no_system_multi": [{"role": "user", "content": "One"},
                        {"role": "assistant", "content": "Two"},
                        {"role": "user", "content": "Three"}],
    "unicode": [{"role": "user", "content": UNICODE}],
    "empty_content": [{"role": "user", "content": ""}],
    "none_key_dropped": [{"role": "user", "content": "x", "name": None}],
    "bad_alternation": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "tool_call": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather",
                                                        "arguments": {"city": "Paris", "unit": "celsius"}}}]},
                  {"role": "tool", "content": "{\"temp\": 21}"},
                  {"role": "tool", "content": "sunny"}],
}
# (conversation, with tools) per template; each runs with add_generation_prompt off and on.
PLAN = {
    "smollm2": ["user", "system_user", "multi_turn", "unicode", "empty_content", "none_key_dropped"],
    "qwen25_coder": ["user", "system_user", "multi_turn", "unicode", "empty_content",
                     ("user", "tools"), ("system_user", "tools"), ("tool_call", "tools"), "tool_call"],
    "gemma3": ["user", "system_user", "multi_turn", "no_system_multi", "unicode", "empty_content",
               "bad_alternation"],
    "mistral": ["user", "system_user", "multi_turn", "unicode", "bad_alternation", "tool_call"],
    "tinyllama_zephyr": ["user", "system_user", "multi_turn", "unicode", "empty_content"],
    "llama3_tools": ["user", "system_user", "multi_turn", "unicode", ("user", "tools"),
                     ("system_user", "tools"), ("tool_call", "tools")],
    "features": ["user", "multi_turn", "unicode", "tool_call", ("tool_call", "tools")],
}
# More names for some templates (the llama template would otherwise print today's date).
VARIABLES = {"llama3_tools": {"date_string": "26 Jul 2024"}, "features": {"extra_flag": True}}


def gguf_template(path):
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def render(template, messages, tools, add_generation_prompt, variables):
    conversation = _normalize_chat_messages(json.loads(json.dumps(messages)))
    rendered, _ = render_jinja_template(conversations=[conversation], tools=tools, chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **variables)
    return rendered[0]


def main():
    for name, path in GGUF_TEMPLATES.items():
        if path.exists():
            (TEMPLATES / f"{name}.jinja").write_text(gguf_template(path), encoding="utf-8")
    cases = []
    for name, plan in PLAN.items():
        template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
        for entry in plan:
            conversation, with_tools = (entry, None) if isinstance(entry, str) else entry
            tools = TOOLS if with_tools else None
            for add_generation_prompt in (False, True):
                variables = {**SPECIAL[name], **VARIABLES.get(name, {})}
                case = {"template": name, "conversation": conversation,
                        "messages": CONVERSATIONS[conversation], "tools": tools,
                        "add_generation_prompt": add_generation_prompt, "variables": variables}
                try:
                    case["expected"] = render(template, CONVERSATIONS[conversation], tools,
                                              add_generation_prompt, variables)
                except jinja2.exceptions.TemplateError as error:
                    case["expected_error"] = str(error)
                cases.append(case)
    (OUT / "cases.json").write_text(json.dumps({
        "generator": "scripts/make_chat_template_fixtures.py",
        "transformers": transformers.__version__, "jinja2": jinja2.__version__,
        "cases": cases}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()

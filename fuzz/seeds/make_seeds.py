#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs (fuzz/seeds/<target>/) from the committed test fixtures.

Seeds are small on purpose: a fuzzer mutates and re-reads a seed thousands of times a second, so
the tiny GGUF models and the cut-down tokenizers below keep every structure of the real files
(metadata kinds, tokenizer pipelines, tensor types) at a few kilobytes.
Needs numpy and gguf (scripts/requirements-fixtures.txt). Run from anywhere:
    python3 fuzz/seeds/make_seeds.py
"""
import json
import pathlib
import shutil

import gguf
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SEEDS = ROOT / "fuzz" / "seeds"
SEPARATOR = "\n@@file\n"  # fuzz/fuzz_support.h split_parts


def fresh(name):
    folder = SEEDS / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def tiny_gguf(path, arch, tokenizer_model, quantized):
    rng = np.random.default_rng(7)
    hidden, heads, kv_heads, ff, layers = 16, 2, 1, 32, 1
    if tokenizer_model == "llama":
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(8)] + \
                 ["▁", "▁a", "▁b", "ab", "a", "b", "c", "▁the", "th", "e"]
        types = [2, 3, 3] + [6] * 8 + [1] * 10
        scores = [0.0] * 11 + [-float(i) for i in range(10)]
        merges = None
    else:
        tokens = ["<|endoftext|>", "Ġ", "a", "b", "c", "Ġa", "ab", "Ġab", "t", "h", "e", "th", "the"]
        types = [3] + [1] * 12
        scores = None
        merges = ["Ġ a", "a b", "Ġa b", "t h", "th e"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads if arch == "llama" else heads)
    if arch == "llama":
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(10000.0)
        writer.add_rope_dimension_count(hidden // heads)
    else:
        writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1 if tokenizer_model == "llama" else 0)
    writer.add_eos_token_id(2 if tokenizer_model == "llama" else 0)

    def tensor(name, *shape):
        values = rng.standard_normal(shape).astype(np.float32)
        if quantized and len(shape) == 2 and shape[-1] % 32 == 0:
            data = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, data, raw_shape=data.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)

    tensor("token_embd.weight", vocab, hidden)
    if arch == "gpt2":
        tensor("position_embd.weight", 64, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", hidden)
        if arch == "gpt2":
            tensor(b + "attn_norm.bias", hidden)
            tensor(b + "attn_qkv.weight", 3 * hidden, hidden)
            tensor(b + "attn_qkv.bias", 3 * hidden)
            tensor(b + "attn_output.weight", hidden, hidden)
            tensor(b + "attn_output.bias", hidden)
            tensor(b + "ffn_norm.weight", hidden)
            tensor(b + "ffn_norm.bias", hidden)
            tensor(b + "ffn_up.weight", ff, hidden)
            tensor(b + "ffn_up.bias", ff)
            tensor(b + "ffn_down.weight", hidden, ff)
            tensor(b + "ffn_down.bias", hidden)
        else:
            head_dim = hidden // heads
            tensor(b + "attn_q.weight", hidden, hidden)
            tensor(b + "attn_k.weight", kv_heads * head_dim, hidden)
            tensor(b + "attn_v.weight", kv_heads * head_dim, hidden)
            tensor(b + "attn_output.weight", hidden, hidden)
            tensor(b + "ffn_norm.weight", hidden)
            tensor(b + "ffn_gate.weight", ff, hidden)
            tensor(b + "ffn_up.weight", ff, hidden)
            tensor(b + "ffn_down.weight", hidden, ff)
    tensor("output_norm.weight", hidden)
    if arch == "gpt2":
        tensor("output_norm.bias", hidden)
    tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cut_tokenizer(source, keep=96):
    """The same pipeline with the first `keep` vocabulary entries, the merges among them, and
    every added token."""
    t = json.loads(source.read_text())
    model = t["model"]
    added = {a["content"] for a in t.get("added_tokens", [])}
    if isinstance(model.get("vocab"), dict):
        kept = {k: v for k, v in model["vocab"].items() if v < keep or k in added}
        model["vocab"] = kept
        merges = []
        for m in model.get("merges", []):
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            if left in kept and right in kept and left + right in kept:
                merges.append(m)
        model["merges"] = merges
    elif isinstance(model.get("vocab"), list):  # Unigram
        model["vocab"] = model["vocab"][:keep]
    return json.dumps(t, ensure_ascii=False)


def main():
    folder = fresh("gguf")
    tiny_gguf(folder / "llama_spm_q8_0.gguf", "llama", "llama", quantized=True)
    tiny_gguf(folder / "gpt2_bpe_f32.gguf", "gpt2", "gpt2", quantized=False)
    shutil.copy(FIXTURES / "formats" / "quants.gguf", folder / "quants.gguf")

    folder = fresh("safetensors")
    shutil.copy(FIXTURES / "formats" / "floats.safetensors", folder / "floats.safetensors")
    for shard in sorted((FIXTURES / "formats" / "hf_sharded").glob("*.safetensors")):
        shutil.copy(shard, folder / shard.name)

    # config, generation config, shard index (the fuzz target's shard holds the llama fixture's
    # tensors), tokenizer config.
    folder = fresh("hf_dir")
    llama = FIXTURES / "models" / "llama"
    header = (llama / "model.safetensors").read_bytes()
    length = int.from_bytes(header[:8], "little")
    names = [n for n in json.loads(header[8:8 + length]) if n != "__metadata__"]
    index = json.dumps({"metadata": {}, "weight_map": {
        n: "model-00001-of-00001.safetensors" for n in sorted(names)}}, indent=1)
    for model in sorted((FIXTURES / "models").iterdir()):
        if not (model / "config.json").exists():
            continue
        parts = [(model / "config.json").read_text()]
        generation = model / "generation_config.json"
        parts.append(generation.read_text() if generation.exists() else "{}")
        parts.append(index)
        tokenizer_config = model / "tokenizer_config.json"
        if tokenizer_config.exists():
            parts.append(tokenizer_config.read_text())
        (folder / f"{model.name}.txt").write_text(SEPARATOR.join(parts))

    folder = fresh("tokenizer_json")
    for name in ["gpt2_trained", "llama3_trained", "qwen2_trained", "spm_legacy_trained",
                 "spm_metaspace_trained", "smollm2"]:
        (folder / f"{name}.json").write_text(
            cut_tokenizer(FIXTURES / "tokenizer" / name / "tokenizer.json"))

    folder = fresh("tokenizer_encode")
    texts = ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "It's 2026: 12345 + 678",
             "naïve café 日本語 🙂 ﷽", "<|im_start|>user\nhi<|im_end|>", "<s> </s> <unk>",
             "=== Heading ===\n the cat sat on the mat .", "\u00a0\u200b\ufeff\U0010ffff"]
    for i, text in enumerate(texts):
        for selector in range(7):  # one seed per tokenizer (fuzz_tokenizer_encode.cpp)
            (folder / f"t{i}_{selector}.txt").write_bytes(bytes([selector]) + text.encode())

    folder = fresh("specs")
    specs = ["f32", "f16", "bf16", "f16:had", "int2:g32:tok", "int4:g64:chan:r128:had",
             "int2:g16:tok+headq:r8:s4", "int2:g32:chan:r128:had+headq:r16:s2:keypca:wrongsign",
             "a2:int2:g64:w64:avg3", "int3:g64:tok", "int8:g64:tok", "dense",
             "sparse:a1:w64:k32:exact", "sparse:a1:w64:k32:b16:centroid:gqa=head:r8",
             "certified:a1:w64:b16:eps0.001:gqa=head", "certified:a1:w8:eps0.05",
             "a2:int2/int2::",  # fields shorter than their prefix, a past crash
             "a2e:int2/int3/int4:g64:w64:avg3:fromfloat", "a2:int2//int4:g64:w1:avg2.5",
             "qbasis:b3:g32:chan:r128:weighted:fisher", "qbasis:b2.5:g32:chan:keypca:iid"]
    for i, spec in enumerate(specs):
        (folder / f"s{i}.txt").write_text(spec)

    chat_template_seeds()
    serve_request_seeds()


def serve_request_seeds():
    # Request bodies of `visikv serve`: completions and chats, every field it reads, and the
    # per-request cache extension.
    folder = fresh("serve_request")
    bodies = [
        {"model": "llama", "prompt": "Hello world", "max_tokens": 8, "temperature": 0.7,
         "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n", "###"], "stream": True},
        {"prompt": [1, 5, 9, 200], "max_tokens": 4, "n": 1, "logprobs": None, "echo": False},
        {"prompt": ["one string"], "visikv": {"keys": "int4:g16:tok", "values": "f16",
                                              "selector": "sparse:a1:w8:k4:exact"}},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi é 東京"},
                      {"role": "assistant", "content": None,
                       "tool_calls": [{"type": "function",
                                       "function": {"name": "f", "arguments": {"x": 1}}}]},
                      {"role": "tool", "content": "42"}],
         "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
         "max_completion_tokens": 16},
    ]
    for i, body in enumerate(bodies):
        (folder / f"r{i}.json").write_text(json.dumps(body, ensure_ascii=False))


def chat_template_seeds():
    # The chat-template fixtures: real models' templates and one with every supported construct.
    folder = fresh("chat_template")
    for template in sorted((FIXTURES / "chat_templates" / "templates").glob("*.jinja")):
        shutil.copyfile(template, folder / template.name)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the small, seeded test fixtures for the file-format readers into tests/fixtures/formats/.

Every expected value here comes from an independent implementation: the `gguf` package's writer,
reader and numpy dequantizers, and the `safetensors` package with PyTorch. The C++ tests compare
against these files and never run Python.

  quants.gguf            one raw tensor per supported GGUF type (random blocks with sane fp16
                         scales), plus metadata of every GGUF value type; general.alignment = 64
  <TYPE>.f32             the values gguf.quants.dequantize gives for that tensor (little-endian
                         float32, row-major)
  quants.expected.json   the metadata and tensor descriptions as gguf.GGUFReader reads them back
  floats.safetensors     F32 / F16 / BF16 tensors written by safetensors.torch, with __metadata__
  hf_sharded/            a Hugging Face directory: config.json, generation_config.json, an index
                         json and two safetensors shards
  safetensors.expected.json  shapes, dtypes and float values of the tensors above
  smollm2_q4_1.expected.json (only with --model) tensor count, architecture, a few tensor
                         descriptions and whole dequantized rows of the default model GGUF

Usage: python3 scripts/make_format_fixtures.py [--model path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "formats"
SEED = 20240917

# Byte offsets of the fp16 scale/min fields inside one block of each quantized type.
FP16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}
ROWS, COLS = 3, 512  # two K-quant super-blocks or sixteen legacy blocks per row


def random_quant_blocks(rng: np.random.Generator, qtype: Q) -> np.ndarray:
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(ROWS * COLS // block_elements, block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(ROWS, -1)


def write_quant_fixtures(rng: np.random.Generator) -> None:
    path = OUT / "quants.gguf"
    writer = gguf.GGUFWriter(str(path), arch="visikv-test")
    writer.add_custom_alignment(64)
    # One key of every value type, arrays included (nested too).
    writer.add_key_value("test.uint8", 200, V.UINT8)
    writer.add_key_value("test.int8", -100, V.INT8)
    writer.add_key_value("test.uint16", 60000, V.UINT16)
    writer.add_key_value("test.int16", -30000, V.INT16)
    writer.add_key_value("test.uint32", 4000000000, V.UINT32)
    writer.add_key_value("test.int32", -2000000000, V.INT32)
    writer.add_key_value("test.uint64", 2**63 + 5, V.UINT64)
    writer.add_key_value("test.int64", -(2**62) - 3, V.INT64)
    writer.add_key_value("test.float32", 0.1, V.FLOAT32)
    writer.add_key_value("test.float64", 3.141592653589793, V.FLOAT64)
    writer.add_key_value("test.bool_true", True, V.BOOL)
    writer.add_key_value("test.bool_false", False, V.BOOL)
    writer.add_key_value("test.string", "h\u00e9llo w\u00f6rld \u2603", V.STRING)
    writer.add_key_value("test.empty_string", "", V.STRING)
    writer.add_key_value("test.array_int32", [1, -2, 3, 2147483647], V.ARRAY)
    writer.add_key_value("test.array_float32", [0.5, -1.25, 1e-5], V.ARRAY)
    writer.add_key_value("test.array_string", ["a", "bc", "", "\u00fc"], V.ARRAY)
    writer.add_key_value("test.array_uint8", [0, 7, 255], V.ARRAY, sub_type=V.UINT8)
    nested = [[1, 2], [3], [4, 5, 6]]
    writer.add_key_value("test.array_nested", nested, V.ARRAY)

    expected_values: dict[str, np.ndarray] = {}
    for qtype in FP16_FIELDS:
        raw = random_quant_blocks(rng, qtype)
        writer.add_tensor(f"q.{qtype.name}", raw, raw_shape=raw.shape, raw_dtype=qtype)
        expected_values[qtype.name] = gguf.quants.dequantize(raw, qtype)
    f16 = rng.standard_normal((ROWS, COLS)).astype(np.float16)
    f16.flat[:6] = np.array([0.0, -0.0, 6e-8, -3e-6, 65504.0, 1e-4], dtype=np.float16)  # subnormals
    writer.add_tensor("f.F16", f16)
    expected_values["F16"] = f16.astype(np.float32)
    bf16_bits = (rng.standard_normal((ROWS, COLS)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    writer.add_tensor("f.BF16", bf16_bits.view(np.uint8), raw_shape=bf16_bits.view(np.uint8).shape, raw_dtype=Q.BF16)
    expected_values["BF16"] = gguf.quants.dequantize(bf16_bits.view(np.uint8), Q.BF16)
    f32 = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)  # four dimensions
    writer.add_tensor("f.F32", f32)
    expected_values["F32"] = f32

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    for name, values in expected_values.items():
        np.ascontiguousarray(values, dtype="<f4").tofile(OUT / f"{name}.f32")

    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue  # the header, not key/value pairs
        metadata[field.name] = to_json_value(field.contents())
    # GGUFReader flattens nested arrays; the nesting is the one the writer was given.
    assert metadata["test.array_nested"] == [v for inner in nested for v in inner]
    metadata["test.array_nested"] = nested
    tensors = [
        {
            "name": t.name,
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "type": t.tensor_type.name,
            "bytes": int(t.n_bytes),
        }
        for t in reader.tensors
    ]
    (OUT / "quants.expected.json").write_text(
        json.dumps({"version": 3, "metadata": metadata, "tensors": tensors}, indent=1) + "\n")


def to_json_value(value):
    if isinstance(value, list):
        return [to_json_value(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    return value


def tensor_entry(tensor: torch.Tensor) -> dict:
    return {
        "dtype": {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[tensor.dtype],
        "shape": list(tensor.shape),
        "values": [float(v) for v in tensor.float().flatten().tolist()],
    }


def write_safetensors_fixtures(generator: torch.Generator) -> None:
    single = {
        "weight_f32": torch.randn(3, 4, generator=generator),
        "bias_f16": torch.randn(5, generator=generator).half(),
        "embed_bf16": torch.randn(2, 3, generator=generator).bfloat16(),
        "scalar_f32": torch.tensor(2.5),
    }
    save_file(single, str(OUT / "floats.safetensors"), metadata={"format": "pt", "note": "visikv"})

    hf = OUT / "hf_sharded"
    hf.mkdir(exist_ok=True)
    shard_tensors = [
        {
            "model.embed_tokens.weight": torch.randn(6, 4, generator=generator).bfloat16(),
            "model.layers.0.input_layernorm.weight": torch.randn(4, generator=generator),
        },
        {
            "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=generator).half(),
            "model.norm.weight": torch.randn(4, generator=generator),
        },
    ]
    weight_map = {}
    total_size = 0
    for number, tensors in enumerate(shard_tensors, start=1):
        shard_name = f"model-{number:05d}-of-{len(shard_tensors):05d}.safetensors"
        save_file(tensors, str(hf / shard_name), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard_name
            total_size += tensor.numel() * tensor.element_size()
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2) + "\n")
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4,
        "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 6,
    }, indent=2) + "\n")
    (hf / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")

    expected = {
        "floats.safetensors": {
            "metadata": {"format": "pt", "note": "visikv"},
            "tensors": {name: tensor_entry(t) for name, t in single.items()},
        },
        "hf_sharded": {
            "tensors": {name: tensor_entry(t) for shard in shard_tensors for name, t in shard.items()},
        },
    }
    (OUT / "safetensors.expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def write_model_expectations(model: Path) -> None:
    reader = gguf.GGUFReader(str(model))
    described = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight",
                 "blk.29.ffn_down.weight", "output_norm.weight"]
    rows = {"token_embd.weight": 1234, "blk.0.attn_q.weight": 7, "blk.29.ffn_down.weight": 100,
            "output_norm.weight": 0}
    by_name = {t.name: t for t in reader.tensors}
    tensors = []
    for name in described:
        t = by_name[name]
        entry = {"name": name, "shape": [int(d) for d in reversed(t.shape.tolist())],
                 "type": t.tensor_type.name}
        if name in rows:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
            entry["row"] = rows[name]
            entry["row_values"] = [float(v) for v in values[rows[name]]]
        tensors.append(entry)
    fields = reader.fields
    expected = {
        "tensor_count": len(reader.tensors),
        "kv_count": int(fields["GGUF.kv_count"].contents()),
        "version": int(fields["GGUF.version"].contents()),
        "architecture": fields["general.architecture"].contents(),
        "block_count": int(fields["llama.block_count"].contents()),
        "token_count": len(fields["tokenizer.ggml.tokens"].data),
        "token_1000": fields["tokenizer.ggml.tokens"].contents(1000),
        "tensors": tensors,
    }
    (OUT / "smollm2_q4_1.expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="the default model GGUF (SmolLM2-135M Q4_1)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    write_quant_fixtures(np.random.default_rng(SEED))
    write_safetensors_fixtures(torch.Generator().manual_seed(SEED))
    if args.model is not None:
        write_model_expectations(args.model)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote fixtures to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()

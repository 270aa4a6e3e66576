#!/usr/bin/env python3
"""Convert tiny Hugging Face fixture checkpoints to GGUF, with reference logits.

Reads tests/fixtures/models/<case>/ (made by scripts/make_model_fixtures.py) and writes GGUF files
into tests/fixtures/models_gguf/ with the `gguf` package's GGUFWriter, following the conventions
of llama.cpp's convert_hf_to_gguf.py (tensor names, metadata keys, Q/K row permutation for llama,
Conv1D transposes for GPT-2, which tensors stay float32):

  llama.gguf        llama fixture, all tensors float32 (bit-exact weights, Q/K rows permuted)
  llama.q8_0.gguf   the same with every matrix in Q8_0 (norms float32)
  qwen2.gguf        qwen2 fixture, matrices float16 (lossless: the fixture is stored in float16)
  gpt2.gguf         gpt2 fixture, matrices float16 (rounded from float32), fused attn_qkv
  gemma3.gguf       gemma3 fixture, all tensors float32, norm weights stored plus one

Where the GGUF's weights differ from the fixture's (Q8_0, and float16 rounding of GPT-2), the
reference logits are recomputed by Hugging Face transformers from the HF checkpoint with its
weights replaced by exactly the values stored in the GGUF (gguf.quants.dequantize of the bytes
written), and stored next to the GGUF as <name>.prefill_logits.f32 (float32 little-endian
[48, vocab]). Otherwise the fixture's own prefill_logits.f32 is the reference.

Independent cross-checks before anything is written (the script fails if one does not hold):
  * transformers' own GGUF reader (from_pretrained(..., gguf_file=...)) loads every file and
    gives the reference logits, which checks tensor names, metadata and the Q/K permutation
    against a second implementation;
  * the tokenizer transformers builds from the GGUF metadata gives the fixture's text_ids.

models_gguf/reference.json lists every file with its source fixture, reference logits, tolerance
basis and checksums. Deterministic: the same package versions give byte-identical files.

Usage:  python3 scripts/make_gguf_fixtures.py [--models DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from gguf import GGMLQuantizationType as QType  # noqa: E402
from gguf import LlamaFileType, TokenType  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = REPO_ROOT / "tests" / "fixtures" / "models"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "models_gguf"

# A GGUF file must reproduce its reference within this fraction of the logit scale, both in
# transformers' GGUF reader (checked here) and in the engine (checked by the C++ test).
RELATIVE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def permute_rows_for_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for llama-family checkpoints.

    Hugging Face rotates the two halves of each head ([x0..x(d/2-1)] with [x(d/2)..x(d-1)]);
    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... So the converter reorders each head's
    rows from [first half | second half] to interleaved [h0, s0, h1, s1, ...].
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of permute_rows_for_llama_cpp."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class GgufTensor:
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    hf_name: str  # the HF parameter it came from
    values: np.ndarray  # float32, in GGUF row order, shape as the engine sees it ([rows, cols])
    qtype: QType
    # Maps GGUF-layout values back to the HF parameter's layout and shape.
    to_hf: callable = field(default=lambda a: a)

    def encoded(self) -> np.ndarray:
        if self.qtype == QType.F32:
            return np.ascontiguousarray(self.values, dtype=np.float32)
        if self.qtype == QType.F16:
            return np.ascontiguousarray(self.values, dtype=np.float16)
        return gguf.quants.quantize(np.ascontiguousarray(self.values, dtype=np.float32), self.qtype)

    def stored_values(self) -> np.ndarray:
        """The float32 values a reader gets back from the bytes written."""
        data = self.encoded()
        if self.qtype in (QType.F32, QType.F16):
            return data.astype(np.float32)
        return gguf.quants.dequantize(data, self.qtype).reshape(self.values.shape).astype(np.float32)


def storage_type(gguf_name: str, values: np.ndarray, matrix_type: QType) -> QType:
    """Which type convert_hf_to_gguf.py gives a tensor for a requested output type.

    1-D tensors, norms, biases and learned position embeddings stay float32; other matrices take
    the requested type.
    """
    if values.ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return QType.F32
    if gguf_name == "position_embd.weight":
        return QType.F32
    return matrix_type


def hf_config(directory: Path, changes: dict):
    """The fixture's config with `changes`: what its GGUF file can express."""
    config = transformers.AutoConfig.from_pretrained(str(directory))
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def hf_state(directory: Path, config_changes: dict) -> tuple[dict[str, np.ndarray], torch.nn.Module]:
    model = AutoModelForCausalLM.from_pretrained(str(directory), config=hf_config(directory, config_changes),
                                                 dtype=torch.float32, attn_implementation="eager")
    model.eval()
    state = {name: tensor.detach().float().numpy().copy() for name, tensor in model.state_dict().items()}
    return state, model


def llama_like_tensors(hf: dict, config: dict, matrix_type: QType, permute_qk: bool) -> list[GgufTensor]:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    out: list[GgufTensor] = []

    def add(gguf_name: str, hf_name: str, permute_heads: int | None = None):
        values = hf[hf_name]
        to_hf = lambda a: a  # noqa: E731
        if permute_heads is not None:
            values = permute_rows_for_llama_cpp(values, permute_heads)
            to_hf = lambda a, h=permute_heads: unpermute_rows(a, h)  # noqa: E731
        out.append(GgufTensor(gguf_name, hf_name, values, storage_type(gguf_name, values, matrix_type), to_hf))

    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(config["num_hidden_layers"]):
        hf_prefix, prefix = f"model.layers.{i}.", f"blk.{i}."
        add(prefix + "attn_norm.weight", hf_prefix + "input_layernorm.weight")
        add(prefix + "attn_q.weight", hf_prefix + "self_attn.q_proj.weight", heads if permute_qk else None)
        add(prefix + "attn_k.weight", hf_prefix + "self_attn.k_proj.weight", kv_heads if permute_qk else None)
        add(prefix + "attn_v.weight", hf_prefix + "self_attn.v_proj.weight")
        for part in ("q", "k", "v"):
            if hf_prefix + f"self_attn.{part}_proj.bias" in hf:
                # Biases are permuted like their rows (only llama-layout models would need it).
                heads_for_bias = (heads if part == "q" else kv_heads) if permute_qk and part != "v" else None
                add(prefix + f"attn_{part}.bias", hf_prefix + f"self_attn.{part}_proj.bias", heads_for_bias)
        add(prefix + "attn_output.weight", hf_prefix + "self_attn.o_proj.weight")
        add(prefix + "ffn_norm.weight", hf_prefix + "post_attention_layernorm.weight")
        add(prefix + "ffn_gate.weight", hf_prefix + "mlp.gate_proj.weight")
        add(prefix + "ffn_up.weight", hf_prefix + "mlp.up_proj.weight")
        add(prefix + "ffn_down.weight", hf_prefix + "mlp.down_proj.weight")
    add("output_norm.weight", "model.norm.weight")
    if not config.get("tie_word_embeddings", False):
        add("output.weight", "lm_head.weight")
    return out


def gemma3_tensors(hf: dict, config: dict, matrix_type: QType) -> list[GgufTensor]:
    """convert_hf_to_gguf.py's Gemma3Model: no Q/K permutation (llama.cpp rotates Gemma
    NeoX-style), every norm weight stored plus one (Gemma3RMSNorm scales by 1 + weight), the head
    tied to token_embd."""
    out: list[GgufTensor] = []

    def add(gguf_name: str, hf_name: str):
        values = hf[hf_name]
        to_hf = lambda a: a  # noqa: E731
        if gguf_name.endswith("norm.weight"):
            values = (values + np.float32(1)).astype(np.float32)
            to_hf = lambda a: (a - np.float32(1)).astype(np.float32)  # noqa: E731
        out.append(GgufTensor(gguf_name, hf_name, values, storage_type(gguf_name, values, matrix_type), to_hf))

    add("token_embd.weight", "model.embed_tokens.weight")
    for i in range(config["num_hidden_layers"]):
        hf_prefix, prefix = f"model.layers.{i}.", f"blk.{i}."
        add(prefix + "attn_norm.weight", hf_prefix + "input_layernorm.weight")
        add(prefix + "attn_q.weight", hf_prefix + "self_attn.q_proj.weight")
        add(prefix + "attn_k.weight", hf_prefix + "self_attn.k_proj.weight")
        add(prefix + "attn_v.weight", hf_prefix + "self_attn.v_proj.weight")
        add(prefix + "attn_q_norm.weight", hf_prefix + "self_attn.q_norm.weight")
        add(prefix + "attn_k_norm.weight", hf_prefix + "self_attn.k_norm.weight")
        add(prefix + "attn_output.weight", hf_prefix + "self_attn.o_proj.weight")
        add(prefix + "post_attention_norm.weight", hf_prefix + "post_attention_layernorm.weight")
        add(prefix + "ffn_norm.weight", hf_prefix + "pre_feedforward_layernorm.weight")
        add(prefix + "ffn_gate.weight", hf_prefix + "mlp.gate_proj.weight")
        add(prefix + "ffn_up.weight", hf_prefix + "mlp.up_proj.weight")
        add(prefix + "ffn_down.weight", hf_prefix + "mlp.down_proj.weight")
        add(prefix + "post_ffw_norm.weight", hf_prefix + "post_feedforward_layernorm.weight")
    add("output_norm.weight", "model.norm.weight")
    return out


def gpt2_tensors(hf: dict, config: dict, matrix_type: QType) -> list[GgufTensor]:
    out: list[GgufTensor] = []
    transpose = lambda a: np.ascontiguousarray(a.T)  # noqa: E731

    def add(gguf_name: str, hf_name: str, conv1d: bool = False):
        values = hf[hf_name]
        to_hf = lambda a: a  # noqa: E731
        if conv1d:  # transformers' Conv1D stores [in, out]; GGUF (and nn.Linear) want [out, in]
            values, to_hf = transpose(values), transpose
        out.append(GgufTensor(gguf_name, hf_name, values, storage_type(gguf_name, values, matrix_type), to_hf))

    add("token_embd.weight", "transformer.wte.weight")
    add("position_embd.weight", "transformer.wpe.weight")
    for i in range(config["n_layer"]):
        hf_prefix, prefix = f"transformer.h.{i}.", f"blk.{i}."
        add(prefix + "attn_norm.weight", hf_prefix + "ln_1.weight")
        add(prefix + "attn_norm.bias", hf_prefix + "ln_1.bias")
        add(prefix + "attn_qkv.weight", hf_prefix + "attn.c_attn.weight", conv1d=True)
        add(prefix + "attn_qkv.bias", hf_prefix + "attn.c_attn.bias")
        add(prefix + "attn_output.weight", hf_prefix + "attn.c_proj.weight", conv1d=True)
        add(prefix + "attn_output.bias", hf_prefix + "attn.c_proj.bias")
        add(prefix + "ffn_norm.weight", hf_prefix + "ln_2.weight")
        add(prefix + "ffn_norm.bias", hf_prefix + "ln_2.bias")
        add(prefix + "ffn_up.weight", hf_prefix + "mlp.c_fc.weight", conv1d=True)
        add(prefix + "ffn_up.bias", hf_prefix + "mlp.c_fc.bias")
        add(prefix + "ffn_down.weight", hf_prefix + "mlp.c_proj.weight", conv1d=True)
        add(prefix + "ffn_down.bias", hf_prefix + "mlp.c_proj.bias")
    add("output_norm.weight", "transformer.ln_f.weight")
    add("output_norm.bias", "transformer.ln_f.bias")
    # The head is tied to wte: no output.weight, the reader reuses token_embd (llama.cpp's gpt2
    # loader accepts both; the converter writes a copy, which only costs space here).
    return out


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def llama_like_metadata(writer: gguf.GGUFWriter, config: dict, with_rope_dims: bool) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_freq_base(float(config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if with_rope_dims:
        writer.add_rope_dimension_count(head_dim)


def gemma3_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    """What convert_hf_to_gguf.py writes for gemma3: no layer pattern, local rope base or
    query_pre_attn_scalar (llama.cpp fixes the first two and derives the scale from the head dim)."""
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(float(config["rope_parameters"]["full_attention"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_sliding_window(config["sliding_window"])


def gpt2_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_block_count(config["n_layer"])
    # convert_hf_to_gguf.py writes 4 * n_embd here; this checkpoint sets n_inner (128 = 2 * 64),
    # and the real inner size is what the tensors have.
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(float(config["layer_norm_epsilon"]))
    writer.add_vocab_size(config["vocab_size"])


def merge_pairs(tokenizer_json: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tokenizer_json["model"]["merges"]]


def vocab_in_id_order(tokenizer_json: dict, vocab_size: int) -> list[str | None]:
    tokens: list[str | None] = [None] * vocab_size
    for text, token_id in tokenizer_json["model"]["vocab"].items():
        tokens[token_id] = text
    for added in tokenizer_json["added_tokens"]:
        tokens[added["id"]] = added["content"]
    return tokens


def byte_level_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_json: dict, reference: dict, pre: str) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, as _set_vocab_gpt2 writes it."""
    vocab_size = reference["vocab_size"]
    tokens = vocab_in_id_order(tokenizer_json, vocab_size)
    added = {a["id"]: a for a in tokenizer_json["added_tokens"]}
    texts, types = [], []
    for token_id, text in enumerate(tokens):
        if text is None:
            texts.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        elif token_id in added:
            texts.append(text)
            types.append(TokenType.CONTROL if added[token_id]["special"] else TokenType.USER_DEFINED)
        else:
            texts.append(text)
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in merge_pairs(tokenizer_json)])
    special_ids(writer, reference)


def sentencepiece_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_json: dict, reference: dict,
                                     space_prefix: bool = True) -> None:
    """tokenizer.ggml.* ("llama" model) for a SentencePiece-style BPE tokenizer.json.

    llama.cpp tokenizes such vocabularies by scores: it repeatedly joins the adjacent pair whose
    concatenation is the highest-scoring token. A BPE tokenizer.json has merge ranks instead, so a
    token's score is minus the rank of the first merge that makes it (earlier merge = higher
    score), as a SentencePiece model's own scores order its pieces; pieces no merge makes (the
    alphabet, bytes, special tokens) score 0. (convert_hf_to_gguf.py's tokenizer.json-only path
    writes a placeholder score of -1000 for every token, which loses the merge order.)
    """
    vocab_size = reference["vocab_size"]
    tokens = vocab_in_id_order(tokenizer_json, vocab_size)
    token_ids = {text: token_id for token_id, text in enumerate(tokens) if text is not None}
    scores = [0.0] * vocab_size
    ranked: set[int] = set()
    for rank, (a, b) in enumerate(merge_pairs(tokenizer_json)):
        token_id = token_ids.get(a + b)
        if token_id is not None and token_id not in ranked:
            scores[token_id] = -float(rank + 1)
            ranked.add(token_id)
    unk = tokenizer_json["model"].get("unk_token")
    added = {a["id"]: a for a in tokenizer_json["added_tokens"]}
    types = []
    for token_id, text in enumerate(tokens):
        if text is None:
            types.append(TokenType.UNUSED)
        elif text == unk:
            types.append(TokenType.UNKNOWN)
        elif token_id in added:
            types.append(TokenType.CONTROL if added[token_id]["special"] else TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if unk is not None:
        writer.add_unk_token_id(token_ids[unk])
    # Whether the normalizer prepends "▁" (SentencePiece's add_dummy_prefix; Gemma's does not).
    writer.add_add_space_prefix(space_prefix)
    special_ids(writer, reference)


def special_ids(writer: gguf.GGUFWriter, reference: dict) -> None:
    if reference.get("bos_token_id") is not None:
        writer.add_bos_token_id(reference["bos_token_id"])
    if reference.get("eos_token_id") is not None:
        writer.add_eos_token_id(reference["eos_token_id"])
    writer.add_add_bos_token(bool(reference["tokenizer_adds_bos"]))
    writer.add_add_eos_token(False)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass
class GgufCase:
    file: str  # output name in models_gguf/
    fixture: str  # tests/fixtures/models/<fixture>
    arch: str  # general.architecture
    matrix_type: QType
    file_type: LlamaFileType
    description: str
    # Config settings of the fixture that the GGUF cannot hold, with the values its readers use
    # instead; the reference logits are computed with them.
    config_changes: dict = field(default_factory=dict)


CASES = [
    GgufCase(
        "llama.gguf",
        "llama",
        "llama",
        QType.F32,
        LlamaFileType.ALL_F32,
        "llama fixture, every tensor float32; Q/K rows permuted to llama.cpp's interleaved rotary "
        "order; SentencePiece-style vocabulary (tokenizer.ggml.model llama, scores from merge ranks).",
    ),
    GgufCase(
        "llama.q8_0.gguf",
        "llama",
        "llama",
        QType.Q8_0,
        LlamaFileType.MOSTLY_Q8_0,
        "llama fixture with every matrix (token_embd and output included) in Q8_0, norms float32.",
    ),
    GgufCase(
        "qwen2.gguf",
        "qwen2",
        "qwen2",
        QType.F16,
        LlamaFileType.MOSTLY_F16,
        "qwen2 fixture, matrices float16 (the fixture's own storage type, so lossless), norms and "
        "q/k/v biases float32, Hugging Face rotary layout kept, tied head (no output.weight), "
        "byte-level BPE with tokenizer.ggml.pre qwen2.",
    ),
    GgufCase(
        "gpt2.gguf",
        "gpt2",
        "gpt2",
        QType.F16,
        LlamaFileType.MOSTLY_F16,
        "gpt2 fixture, matrices float16 (rounded from the fixture's float32); Conv1D weights "
        "transposed to [out, in]; fused attn_qkv with bias; position_embd, norms and biases "
        "float32; tied head (no output.weight); byte-level BPE with tokenizer.ggml.pre gpt-2.",
    ),
    GgufCase(
        "gemma3.gguf",
        "gemma3",
        "gemma3",
        QType.F32,
        LlamaFileType.ALL_F32,
        "gemma3 fixture, every tensor float32, norm weights stored plus one (as the converter "
        "writes them), attention.sliding_window 8, tied head, SentencePiece-style vocabulary "
        "without space prefix. A GGUF stores neither query_pre_attn_scalar nor a logit soft-cap: "
        "the reference is the fixture with query_pre_attn_scalar = head dim (llama.cpp's scale) "
        "and no soft-cap.",
        {"query_pre_attn_scalar": 16, "final_logit_softcapping": None},
    ),
]


@torch.no_grad()
def prefill_logits(model, tokens: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([tokens], dtype=torch.long), use_cache=False).logits[0].float().numpy()


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_f32(path: Path, array: np.ndarray) -> dict:
    data = np.ascontiguousarray(array, dtype="<f4")
    path.write_bytes(data.tobytes())
    return {"path": path.name, "dtype": "float32", "byte_order": "little", "shape": list(data.shape),
            "sha256": hashlib.sha256(data.tobytes()).hexdigest()}


def write_gguf(path: Path, case: GgufCase, config: dict, reference: dict, tokenizer_json: dict,
               tensors: list[GgufTensor]) -> None:
    writer = gguf.GGUFWriter(str(path), case.arch)
    writer.add_name(f"visikv tiny {case.fixture} fixture")
    if case.arch == "gpt2":
        gpt2_metadata(writer, config)
    elif case.arch == "gemma3":
        gemma3_metadata(writer, config)
    else:
        llama_like_metadata(writer, config, with_rope_dims=case.arch == "llama")
    writer.add_file_type(case.file_type)
    if case.matrix_type not in (QType.F32, QType.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if reference["tokenizer_kind"] in ("sentencepiece_bpe", "gemma_bpe"):
        sentencepiece_tokenizer_metadata(writer, tokenizer_json, reference,
                                         space_prefix=reference["tokenizer_kind"] == "sentencepiece_bpe")
    else:
        pre = {"gpt2": "gpt-2", "qwen2": "qwen2"}[reference["pre_tokenizer_split"]]
        byte_level_tokenizer_metadata(writer, tokenizer_json, reference, pre)
    for tensor in tensors:
        data = tensor.encoded()
        raw = None if tensor.qtype in (QType.F32, QType.F16) else tensor.qtype
        writer.add_tensor(tensor.name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_with_transformers_gguf_reader(path: Path, fixture: Path, tokens: list[int], expected: np.ndarray,
                                        scale: float, reference: dict, case: GgufCase) -> dict:
    """transformers' GGUF loader (a reader nobody here wrote) must reproduce the reference.

    Two known limits of that reader are worked around, and only for what they affect:
      * its gpt2 metadata mapping reads context_length as n_ctx (GPT2Config wants n_positions)
        and ignores feed_forward_length (assumes 4 * n_embd), so for gpt2 it gets the fixture's
        config.json; tensors still come from the GGUF (names, transposes, fused QKV checked);
      * its tokenizer for "llama" vocabularies prepends "▁" only when the text does not already
        start with one (Metaspace prepend_scheme "first"), where llama.cpp and Llama 2's
        tokenizer.json always prepend; so it is compared with the fixture's tokenizer on the
        texts without their leading space (vocabulary, scores/merges, byte fallback checked).
    """
    with tempfile.TemporaryDirectory() as scratch:
        # from_pretrained wants a directory; give it one holding only this file.
        shutil.copyfile(path, Path(scratch) / path.name)
        extra = {}
        if reference["model_type"] == "gpt2":
            extra["config"] = transformers.AutoConfig.from_pretrained(str(fixture))
        elif reference["model_type"] == "gemma3_text":
            # Its gemma3 mapping reads no attention scale: query_pre_attn_scalar stays at the
            # class default 256, where llama.cpp (and this file's reference) use the head dim.
            extra["config"] = hf_config(fixture, case.config_changes)
        model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager", **extra)
        model.eval()
        diff = max_abs(prefill_logits(model, tokens), expected)
        if diff > RELATIVE_TOLERANCE * scale:
            raise RuntimeError(f"{path.name}: transformers' GGUF reader differs from the reference by {diff}")
        from_gguf = AutoTokenizer.from_pretrained(scratch, gguf_file=path.name)
        from_fixture = AutoTokenizer.from_pretrained(str(fixture))
        for text in (reference["text"], reference["reference_sentence"]):
            if reference["tokenizer_kind"] == "sentencepiece_bpe":
                text = text.lstrip(" ")
            if from_gguf(text).input_ids != from_fixture(text).input_ids:
                raise RuntimeError(f"{path.name}: transformers' GGUF tokenizer disagrees on {text[:30]!r}")
    print(f"  transformers' GGUF reader: max |Δ| {diff:.3g} against the reference; tokenizer agrees")
    config_source = "GGUF metadata"
    if extra:
        config_source = "fixture config.json" + (f" with {case.config_changes}" if case.config_changes else "")
    tokenizer_check = ("transformers_gguf_tokenizer_agrees_without_leading_space"
                       if reference["tokenizer_kind"] == "sentencepiece_bpe" else "transformers_gguf_tokenizer_agrees")
    return {"transformers_gguf_reader_max_abs_diff": diff,
            "transformers_gguf_reader_config": config_source,
            tokenizer_check: True}


def make_case(case: GgufCase, models: Path, out: Path) -> dict:
    print(f"[{case.file}] from {case.fixture}")
    directory = models / case.fixture
    config = json.loads((directory / "config.json").read_text())
    reference = json.loads((directory / "reference.json").read_text())
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = reference["tokens"]
    scale = float(reference["logit_scale"])

    hf, model = hf_state(directory, case.config_changes)
    if case.arch == "gpt2":
        tensors = gpt2_tensors(hf, config, case.matrix_type)
    elif case.arch == "gemma3":
        tensors = gemma3_tensors(hf, config, case.matrix_type)
    else:
        tensors = llama_like_tensors(hf, config, case.matrix_type, permute_qk=case.arch == "llama")

    # Put exactly the stored values back into the HF model: if nothing was rounded, they equal the
    # fixture's weights and the fixture's logits are the reference; else recompute.
    lossless = not case.config_changes
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for tensor in tensors:
            stored = tensor.to_hf(tensor.stored_values())
            if not np.array_equal(stored, hf[tensor.hf_name]):
                lossless = False
            parameters[tensor.hf_name].copy_(torch.from_numpy(np.ascontiguousarray(stored)))
    fixture_logits = np.fromfile(directory / "prefill_logits.f32", dtype="<f4").reshape(len(tokens), -1)
    logits = prefill_logits(model, tokens)
    entry: dict = {"file": case.file, "fixture": case.fixture, "architecture": case.arch,
                   "matrix_type": case.matrix_type.name, "description": case.description,
                   "tensor_types": {t.name: t.qtype.name for t in tensors}}
    if lossless:
        diff = max_abs(logits, fixture_logits)
        if diff > 1e-5 * scale:
            raise RuntimeError(f"{case.file}: weights unchanged but logits moved by {diff}")
        expected = fixture_logits
        entry["reference_logits"] = f"../models/{case.fixture}/prefill_logits.f32"
        entry["reference_notes"] = "weights bit-identical to the fixture's: its own prefill logits"
        entry["logit_scale"] = scale
    else:
        expected = logits
        name = case.file.removesuffix(".gguf") + ".prefill_logits.f32"
        entry["reference_logits"] = name
        entry["reference_file"] = write_f32(out / name, logits)
        entry["reference_notes"] = (
            "transformers prefill over the fixture's tokens with every weight replaced by the value "
            "stored in the GGUF (gguf.quants.dequantize of the written bytes, inverse-permuted)"
            + (f" and the config changed to what the GGUF holds: {case.config_changes}" if case.config_changes else ""))
        entry["logit_scale"] = float(np.max(np.abs(logits)))
        entry["max_abs_diff_from_unrounded_fixture_logits"] = max_abs(logits, fixture_logits)
        print(f"  rounding the weights moved the logits by up to {entry['max_abs_diff_from_unrounded_fixture_logits']:.3g}"
              f" (scale {scale:.3f})")

    path = out / case.file
    write_gguf(path, case, config, reference, tokenizer_json, tensors)
    entry["checks"] = check_with_transformers_gguf_reader(path, directory, tokens, expected, entry["logit_scale"],
                                                          reference, case)
    entry["bytes"] = path.stat().st_size
    entry["sha256"] = sha256(path)
    print(f"  wrote {path.name} ({entry['bytes'] / 1024:.0f} KiB)")
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="HF fixture root (tests/fixtures/models)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (tests/fixtures/models_gguf)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same logits on every machine, as make_model_fixtures.py
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in list(args.out.glob("*.gguf")) + list(args.out.glob("*.f32")):
        stale.unlink()

    entries = [make_case(case, args.models, args.out) for case in CASES]
    manifest = {
        "relative_tolerance": RELATIVE_TOLERANCE,
        "n_positions": 48,
        "gguf_package_version": _package_version("gguf"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "files": entries,
    }
    (args.out / "reference.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"done: {total / 1024:.0f} KiB in {args.out}")
    return 0


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - only informational
        return None


if __name__ == "__main__":
    sys.exit(main())

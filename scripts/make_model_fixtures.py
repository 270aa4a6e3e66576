#!/usr/bin/env python3
"""Build tiny random Hugging Face checkpoints and their reference logits.

Every case under tests/fixtures/models/<case>/ is a complete Hugging Face model directory
(config.json, model.safetensors, tokenizer.json, ...) of a two-layer model with random weights,
plus the logits that Hugging Face transformers computes for a fixed 48-token sequence:

  prefill_logits.f32  model(input_ids) over all 48 positions, float32 little-endian [48, vocab]
  decode_logits.f32   the same sequence fed one token at a time through the KV cache
                      (use_cache=True, a DynamicCache), one row per step, [48, vocab]
  reference.json      what was computed, with which versions, and the tokenizer check strings

The C++ tests load these directories with the engine and compare; no Python at test time.
Everything is created locally and deterministically on the CPU (no Hub access): tokenizers are
trained with the `tokenizers` library on the start of the WikiText-2 validation text, weights come
from a seeded transformers initialisation.

Usage:  python3 scripts/make_model_fixtures.py [--data PATH] [--out DIR] [--only CASE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-valid-tokenized.txt"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "models"

TRAINING_BYTES = 200 * 1024  # the tokenizers learn from this much of the validation text
TOKENIZER_VOCAB = 512
SEQUENCE_LENGTH = 48
BASE_SEED = 20240601

# A WikiText-103 *test* sentence (first article, "Robert Boulter"); the validation text the
# tokenizers were trained on does not contain it.
REFERENCE_SENTENCE = (
    " Robert Boulter is an English film , television and theatre actor . He had a guest @-@ "
    "starring role on the television series The Bill in 2000 . This was followed by a starring "
    "role in the play Herons written by Simon Stephens , which was performed in 2001 at the "
    "Royal Court Theatre ."
)
# Short string for tokenizer tests: leading/double spaces, digits, punctuation, a newline and a
# tab, accented Latin, CJK and an emoji (the last two fall back to bytes in the SentencePiece-style
# vocabularies, whose alphabet only holds frequent characters).
TOKENIZER_CHECK_TEXT = " Hello world!  The 1990s cost $3,500 -- naïve café.\n\tNew line: 東京 🙂 end"

# Small architectures share these sizes; initializer_range is ten times the usual 0.02 so the
# logits of a random two-layer model are not all near zero.
COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=128,
    initializer_range=0.2,
)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def load_training_lines(path: Path) -> list[str]:
    """The first TRAINING_BYTES of the text, cut at a line boundary so no UTF-8 char is split."""
    raw = path.read_bytes()[:TRAINING_BYTES]
    raw = raw[: raw.rfind(b"\n") + 1]
    return raw.decode("utf-8").splitlines(keepends=True)


# Qwen2's pre-tokenizer split (its tokenizer.json, and transformers' Qwen2Tokenizer): like GPT-2's
# but case-insensitive contractions, single digits, and a leading non-letter glued to a word.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_byte_level_bpe(
    lines: list[str],
    leading_specials: list[str],
    trailing_specials: list[str],
    bos: str | None,
    split: str = "gpt2",
) -> Tokenizer:
    """Byte-level BPE.

    `split` "gpt2": GPT-2's pre-tokenizer regex, no normalizer (GPT-2, GPT-NeoX, Llama 3 here);
    "qwen2": NFC normalizer, Qwen2's split regex, then the byte-level mapping (as Qwen2's
    tokenizer.json; transformers 5 rebuilds exactly this for model_type qwen2 whatever the file
    says, so a GPT-2 regex there would not be what users get).
    `leading_specials` take the first ids (as in GPT-NeoX), `trailing_specials` the last ones
    (as GPT-2's <|endoftext|>, Qwen2's and Llama 3's control tokens). With `bos`, a template
    post-processor prepends it (as Llama 3's tokenizer.json does).
    """
    tokenizer = Tokenizer(models.BPE())
    if split == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(trailing_specials),
        special_tokens=leading_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    tokenizer.add_special_tokens(trailing_specials)
    if bos is None:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def train_sentencepiece_bpe(lines: list[str]) -> Tokenizer:
    """A tokenizer.json shaped like Llama 2's: SentencePiece BPE with byte fallback.

    Ids 0..2 are <unk>, <s>, </s>; ids 3..258 the byte pieces <0x00>..<0xFF>; then the learned
    characters and merges. The normalizer prepends U+2581 and replaces spaces by it, there is no
    pre-tokenizer, and the post-processor adds <s>. Characters outside the learned alphabet
    become byte pieces.
    """
    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{value:02X}>" for value in range(256)]

    # Learn merges on words that start with the meta-space, as SentencePiece does; the merges
    # therefore never join across a word boundary, so running them without a pre-tokenizer later
    # (as Llama 2's tokenizer.json does) gives the same pieces.
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace("\n", "")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(specials) - len(byte_pieces),
        limit_alphabet=80,
        min_frequency=2,
        show_progress=False,
    )
    learner.train_from_iterator(lines, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]

    vocab: dict[str, int] = {}
    for piece in specials + byte_pieces:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def train_gemma_bpe(lines: list[str]) -> Tokenizer:
    """A tokenizer.json shaped like Gemma's: SentencePiece BPE with byte fallback, no prefix space.

    Ids 0..3 are <pad>, <eos>, <bos>, <unk> (Gemma's order); ids 4..259 the byte pieces; then the
    learned characters and merges. The normalizer only replaces spaces by U+2581 (Gemma adds no
    dummy prefix), the pre-tokenizer splits at spaces as GemmaTokenizer's does (a no-op after the
    normalizer), the decoder keeps leading spaces, and the post-processor adds <bos>.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_pieces = [f"<0x{value:02X}>" for value in range(256)]
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace("\n", "")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(specials) - len(byte_pieces),
        limit_alphabet=80,
        min_frequency=2,
        show_progress=False,
    )
    learner.train_from_iterator(lines, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]

    vocab: dict[str, int] = {}
    for piece in specials + byte_pieces:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    return tokenizer


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenizerSpec:
    kind: str  # "byte_level_bpe", "sentencepiece_bpe" or "gemma_bpe"
    split: str = "gpt2"  # byte-level pre-tokenizer: "gpt2" or "qwen2"
    leading_specials: list[str] = dataclasses.field(default_factory=list)
    trailing_specials: list[str] = dataclasses.field(default_factory=list)
    bos: str | None = None  # token the post-processor prepends
    bos_token: str | None = None  # config / tokenizer_config bos (may differ from what is added)
    eos_token: str | None = None
    unk_token: str | None = None


@dataclasses.dataclass
class Case:
    name: str
    architecture: str
    tokenizer: TokenizerSpec
    # Builds the transformers config given the tokenizer's size and special ids.
    make_config: Callable[[int, int | None, int | None], transformers.PretrainedConfig]
    save_dtype: torch.dtype
    notes: str


def gpt2_config(vocab: int, bos: int | None, eos: int | None):
    return transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=COMMON["max_position_embeddings"],
        n_embd=COMMON["hidden_size"],
        n_layer=COMMON["num_hidden_layers"],
        n_head=COMMON["num_attention_heads"],
        n_inner=COMMON["intermediate_size"],
        activation_function="gelu_new",
        initializer_range=COMMON["initializer_range"],
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def gpt_neox_config(parallel: bool, rotary_fraction: float):
    def make(vocab: int, bos: int | None, eos: int | None):
        return transformers.GPTNeoXConfig(
            vocab_size=vocab,
            **COMMON,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            use_parallel_residual=parallel,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": rotary_fraction,
            },
            attention_bias=True,
            tie_word_embeddings=False,
            bos_token_id=bos,
            eos_token_id=eos,
        )

    return make


def llama_like_config(config_class, tie: bool, rope_parameters: dict, rms_eps: float, **extra):
    def make(vocab: int, bos: int | None, eos: int | None):
        return config_class(
            vocab_size=vocab,
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            hidden_act="silu",
            rms_norm_eps=rms_eps,
            rope_parameters=rope_parameters,
            tie_word_embeddings=tie,
            bos_token_id=bos,
            eos_token_id=eos,
            **extra,
        )

    return make


def gemma3_config(vocab: int, bos: int | None, eos: int | None):
    """Seven layers: local (sliding-window) layers 0-4 and 6, global layer 5, as the sixth-layer
    pattern every Gemma 3 GGUF implies; a window of 8 over the 48-token sequence."""
    return transformers.Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=COMMON["hidden_size"],
        num_hidden_layers=GEMMA3_LAYERS,
        num_attention_heads=COMMON["num_attention_heads"],
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=COMMON["intermediate_size"],
        max_position_embeddings=COMMON["max_position_embeddings"],
        initializer_range=COMMON["initializer_range"],
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        sliding_window=GEMMA3_WINDOW,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(GEMMA3_LAYERS)],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        query_pre_attn_scalar=GEMMA3_QUERY_PRE_ATTN_SCALAR,
        final_logit_softcapping=GEMMA3_SOFTCAP,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=bos,
        eos_token_id=eos,
    )


GEMMA3_LAYERS = 7
GEMMA3_WINDOW = 8
# Not the head dim (16), so the attention scale is read from the config, not derived.
GEMMA3_QUERY_PRE_ATTN_SCALAR = 24
# About the largest logit of the uncapped model, so the cap bends the large logits visibly.
GEMMA3_SOFTCAP = 4.0


BYTE_LEVEL_GPT2 = TokenizerSpec(
    "byte_level_bpe",
    trailing_specials=["<|endoftext|>"],
    bos_token="<|endoftext|>",
    eos_token="<|endoftext|>",
    unk_token="<|endoftext|>",
)
BYTE_LEVEL_NEOX = TokenizerSpec(
    "byte_level_bpe",
    leading_specials=["<|endoftext|>", "<|padding|>"],
    bos_token="<|endoftext|>",
    eos_token="<|endoftext|>",
    unk_token="<|endoftext|>",
)
BYTE_LEVEL_QWEN2 = TokenizerSpec(
    "byte_level_bpe",
    split="qwen2",
    trailing_specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    bos_token=None,
    eos_token="<|endoftext|>",
)
BYTE_LEVEL_LLAMA3 = TokenizerSpec(
    "byte_level_bpe",
    trailing_specials=["<|begin_of_text|>", "<|end_of_text|>"],
    bos="<|begin_of_text|>",
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
)
SENTENCEPIECE = TokenizerSpec(
    "sentencepiece_bpe", bos="<s>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
)
GEMMA_SENTENCEPIECE = TokenizerSpec(
    "gemma_bpe", bos="<bos>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
)

CASES = [
    Case(
        "gpt2",
        "GPT2LMHeadModel",
        BYTE_LEVEL_GPT2,
        gpt2_config,
        torch.float32,
        "GPT-2: learned positions, pre-LayerNorm, Conv1D weights stored [in, out], gelu_new "
        "(tanh approximation), lm head tied to wte.",
    ),
    Case(
        "gpt_neox_parallel",
        "GPTNeoXForCausalLM",
        BYTE_LEVEL_NEOX,
        gpt_neox_config(parallel=True, rotary_fraction=0.25),
        torch.float32,
        "GPT-NeoX, parallel residual x + attn(ln1(x)) + mlp(ln2(x)); fused query_key_value laid "
        "out per head as [q|k|v]; rotary (NeoX half-split) on the first 25% of each head's "
        "dimensions; exact (erf) gelu; untied embed_out.",
    ),
    Case(
        "gpt_neox_sequential",
        "GPTNeoXForCausalLM",
        BYTE_LEVEL_NEOX,
        gpt_neox_config(parallel=False, rotary_fraction=0.5),
        torch.float32,
        "GPT-NeoX with use_parallel_residual=False (x += attn(ln1(x)); x += mlp(ln2(x))); rotary "
        "on the first 50% of each head's dimensions.",
    ),
    Case(
        "llama",
        "LlamaForCausalLM",
        SENTENCEPIECE,
        llama_like_config(
            transformers.LlamaConfig,
            tie=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_eps=1e-5,
        ),
        torch.float32,
        "Llama: GQA (4 query heads, 2 KV heads, head_dim 16), RMSNorm eps 1e-5, rotary "
        "(half-split) theta 1e4, SwiGLU, untied lm_head; SentencePiece-style BPE tokenizer with "
        "byte fallback, BOS added.",
    ),
    Case(
        "llama3_scaled",
        "LlamaForCausalLM",
        BYTE_LEVEL_LLAMA3,
        llama_like_config(
            transformers.LlamaConfig,
            tie=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            rms_eps=1e-5,
        ),
        torch.bfloat16,
        "Llama with Llama-3.1 rope scaling (factor 8, low/high freq factors 1/4, original context "
        "32: of the 8 rotary frequencies of head_dim 16 one is kept, one interpolated, six divided "
        "by 8); tied embeddings; weights stored in bfloat16, reference computed in float32 from "
        "the bf16 values; byte-level BPE whose post-processor adds <|begin_of_text|>.",
    ),
    Case(
        "mistral",
        "MistralForCausalLM",
        SENTENCEPIECE,
        llama_like_config(
            transformers.MistralConfig,
            tie=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_eps=1e-5,
            sliding_window=8,
        ),
        torch.float32,
        "Mistral: GQA and sliding-window attention with sliding_window=8 over a 48-token "
        "sequence (see sliding_window_check for which keys a query sees).",
    ),
    Case(
        "qwen2",
        "Qwen2ForCausalLM",
        BYTE_LEVEL_QWEN2,
        llama_like_config(
            transformers.Qwen2Config,
            tie=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_eps=1e-6,
        ),
        torch.float16,
        "Qwen2: bias on q/k/v projections (none on o_proj), rope theta 1e6, GQA, tied "
        "embeddings; weights stored in float16, reference computed in float32 from the fp16 "
        "values; byte-level BPE shaped like Qwen2's (NFC, Qwen2 split regex), no BOS added.",
    ),
    Case(
        "gemma3",
        "Gemma3ForCausalLM",
        GEMMA_SENTENCEPIECE,
        gemma3_config,
        torch.float32,
        "Gemma 3 text model: 7 layers, local (sliding_window 8, rope theta 1e4) except layer 5, "
        "global (rope theta 1e6); embeddings times sqrt(hidden); RMSNorm by (1 + weight) with "
        "per-head q/k norms before RoPE and post-attention / post-feedforward norms; GeGLU "
        "(gelu tanh); attention scale query_pre_attn_scalar^-0.5 = 24^-0.5 (head dim 16); final "
        "logit soft-cap 4; GQA; tied head; Gemma-style SentencePiece BPE (no prefix space, <bos> "
        "added). See gemma3_checks for what each of these changes in the logits.",
    ),
]


# --------------------------------------------------------------------------------------------
# Model construction and reference computation
# --------------------------------------------------------------------------------------------


def case_seed(index: int) -> int:
    return BASE_SEED + 1000 * index


def build_model(config, seed: int, save_dtype: torch.dtype) -> torch.nn.Module:
    """A seeded random model whose values are exactly representable in `save_dtype`.

    transformers initialises norm weights to one and biases to zero; a test could not tell a
    loader that ignores them from one that reads them, so every 1-D parameter gets N(0, 0.1)
    added on top.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        # Round the parameters (not the buffers: model.to() would also round the rotary
        # inv_freq) to the storage type; compute in float32 from the rounded values.
        for parameter in model.parameters():
            parameter.copy_(parameter.to(save_dtype).to(torch.float32))
    model.eval()
    return model


@torch.no_grad()
def prefill_logits(model, tokens: list[int]) -> np.ndarray:
    ids = torch.tensor([tokens], dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def decode_logits(model, tokens: list[int]) -> np.ndarray:
    """One token per forward through a KV cache (transformers' DynamicCache, grown in place)."""
    cache = DynamicCache(config=model.config)
    # transformers 5 renamed the forward argument `past_key_values` to `cache`.
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    for position, token in enumerate(tokens):
        out = model(input_ids=torch.tensor([[token]], dtype=torch.long), use_cache=True, **{cache_argument: cache})
        if cache.get_seq_length() == 0:
            raise RuntimeError(f"the model did not fill the KV cache at step {position}")
        rows.append(out.logits[0, -1].float().numpy())
    return np.stack(rows)


def reference_tokens(tokenizer: Tokenizer) -> list[int]:
    """The reference sentence's ids (with whatever the post-processor adds), cut or repeated to 48."""
    ids = tokenizer.encode(REFERENCE_SENTENCE).ids
    while len(ids) < SEQUENCE_LENGTH:
        ids = ids + ids
    return ids[:SEQUENCE_LENGTH]


def add_legacy_config_keys(config_path: Path) -> dict:
    """Add the pre-5.0 spelling of the rope and dtype settings next to transformers 5's own.

    transformers >= 5 writes `rope_parameters` and `dtype`; checkpoints written by older versions
    (most published ones) spell them rope_theta / rope_scaling / rotary_pct / rotary_emb_base and
    torch_dtype. Writing both, with equal values, lets a reader of either convention load the
    fixture; transformers 5 reads the file back unchanged (checked by the reload below).
    """
    data = json.loads(config_path.read_text())
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
        if data.get("model_type") == "gpt_neox":
            data["rotary_emb_base"] = rope["rope_theta"]
    if data.get("model_type") == "gemma3_text":  # one rope per layer type: global and local
        data["rope_theta"] = rope["full_attention"]["rope_theta"]
        data["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    if "partial_rotary_factor" in rope and data.get("model_type") == "gpt_neox":
        data["rotary_pct"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        data["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    elif data.get("model_type") != "gpt2":
        data["rope_scaling"] = None
    if "dtype" in data:
        data["torch_dtype"] = data["dtype"]
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def write_f32(path: Path, array: np.ndarray) -> dict:
    data = np.ascontiguousarray(array, dtype="<f4")
    path.write_bytes(data.tobytes())
    return {
        "path": path.name,
        "dtype": "float32",
        "byte_order": "little",
        "shape": list(data.shape),
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
    }


def save_tokenizer(directory: Path, tokenizer: Tokenizer, spec: TokenizerSpec) -> None:
    """tokenizer.json plus tokenizer_config.json, as save_pretrained writes them."""
    wrapper = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=spec.bos_token,
        eos_token=spec.eos_token,
        unk_token=spec.unk_token,
        clean_up_tokenization_spaces=False,
    )
    wrapper.save_pretrained(str(directory))
    # The raw tokenizers object is the ground truth for tokenizer.json; write it ourselves so the
    # file holds exactly the trained tokenizer whatever the wrapper adds or rewrites.
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    for stray in ("special_tokens_map.json", "chat_template.jinja"):
        (directory / stray).unlink(missing_ok=True)


def dump_json(value) -> str:
    """Indented JSON with lists of numbers kept on one line (token id lists stay readable)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return re.sub(
        r"\[\s*(-?[0-9.eE+-]+(?:,\s*-?[0-9.eE+-]+)*)\s*\]",
        lambda match: "[" + ", ".join(part.strip() for part in match.group(1).split(",")) + "]",
        text,
    )


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def sliding_window_check(case: Case, config, seed: int, tokens: list[int], windowed: np.ndarray) -> dict:
    """Show that transformers really restricts attention to the window.

    The same weights without a window must agree on the first positions (whose whole context
    fits in the window) and differ afterwards; the first differing position tells how many keys
    (the query's own included) a query sees.
    """
    window = config.sliding_window
    full_config = type(config).from_dict(config.to_dict())
    full_config.sliding_window = None
    full = prefill_logits(build_model(full_config, seed, case.save_dtype), tokens)
    per_position = np.max(np.abs(windowed.astype(np.float64) - full), axis=1)
    scale = float(np.max(np.abs(full)))
    differing = np.nonzero(per_position > 1e-4 * scale)[0]
    if len(differing) == 0:
        raise RuntimeError(f"{case.name}: sliding_window={window} changed nothing; the window is not applied")
    first = int(differing[0])
    if np.any(per_position[:first] > 1e-5 * scale):
        raise RuntimeError(f"{case.name}: positions before {first} already differ")
    if first > window:
        raise RuntimeError(f"{case.name}: first difference at {first}, expected at most {window}")
    if not np.all(per_position[first:] > 1e-4 * scale):
        raise RuntimeError(f"{case.name}: some position after {first} matches full attention")
    print(f"  sliding window {window}: same as full attention before position {first}, differs from there on")
    return {
        "sliding_window": window,
        "first_position_differing_from_full_attention": first,
        "keys_seen_by_query_at_position_t": f"max(0, t-{first - 1}) .. t ({first} keys, its own included)",
        "max_abs_diff_from_full_attention_before": float(per_position[:first].max()) if first else 0.0,
        "min_abs_diff_from_full_attention_after": float(per_position[first:].min()),
    }


def gemma3_checks(case: Case, config, seed: int, tokens: list[int], logits: np.ndarray) -> dict:
    """What each Gemma 3 feature the fixture sets does to the logits, so that none goes untested.

    The local layers' window: with one rope for both layer types, making every layer global
    leaves the logits up to position W - 1 (whose context fits the window) and changes them from
    W on (a query sees W keys, its own included). The local rope base, the attention scale and
    the soft-cap must each move the logits.
    """
    scale = float(np.max(np.abs(logits)))

    def variant(**changes) -> np.ndarray:
        changed = type(config).from_dict(config.to_dict())
        for key, value in changes.items():
            setattr(changed, key, value)
        return prefill_logits(build_model(changed, seed, case.save_dtype), tokens)

    window = config.sliding_window
    one_rope_parameters = {
        "full_attention": dict(config.rope_parameters["full_attention"]),
        "sliding_attention": dict(config.rope_parameters["full_attention"]),
    }
    one_rope = variant(rope_parameters=one_rope_parameters)
    full = variant(rope_parameters=one_rope_parameters, layer_types=["full_attention"] * config.num_hidden_layers)
    per_position = np.max(np.abs(one_rope.astype(np.float64) - full), axis=1)
    differing = np.nonzero(per_position > 1e-4 * scale)[0]
    if len(differing) == 0 or int(differing[0]) != window:
        raise RuntimeError(f"{case.name}: the window of {window} first matters at {differing[:1]}, expected {window}")
    if np.any(per_position[:window] > 1e-5 * scale) or not np.all(per_position[window:] > 1e-4 * scale):
        raise RuntimeError(f"{case.name}: local layers do not behave as a window of {window}")
    unit_scale = variant(query_pre_attn_scalar=config.head_dim)
    uncapped = variant(final_logit_softcapping=None)
    effects = {
        "max_abs_diff_with_every_layer_global": float(per_position.max()),
        "max_abs_diff_with_the_global_rope_on_local_layers": max_abs(one_rope, logits),
        "max_abs_diff_with_query_pre_attn_scalar_equal_to_head_dim": max_abs(unit_scale, logits),
        "max_abs_diff_without_the_final_logit_softcap": max_abs(uncapped, logits),
        "max_abs_uncapped_logit": float(np.max(np.abs(uncapped))),
    }
    for name, value in effects.items():
        if name.startswith("max_abs_diff") and value < 1e-3 * scale:
            raise RuntimeError(f"{case.name}: {name} = {value}: that feature changes nothing")
    print(f"  window {window}: same as all-global before position {window}, differs from there on; "
          f"local rope, attention scale and soft-cap each move the logits")
    return {"sliding_window": window,
            "first_position_differing_from_all_global_layers": int(differing[0]),
            "keys_seen_by_query_at_position_t_in_a_local_layer": f"max(0, t-{window - 1}) .. t",
            **effects}


def rope_scaling_check(case: Case, config, seed: int, tokens: list[int], scaled: np.ndarray) -> dict:
    """The llama3 scaling must change the logits (else the fixture would not test it)."""
    plain_config = type(config).from_dict(config.to_dict())
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    plain = prefill_logits(build_model(plain_config, seed, case.save_dtype), tokens)
    diff = max_abs(plain, scaled)
    if diff < 1e-3 * float(np.max(np.abs(plain))):
        raise RuntimeError(f"{case.name}: rope scaling has no visible effect ({diff})")
    print(f"  llama3 rope scaling changes the logits by up to {diff:.3g} against unscaled rope")
    return {"max_abs_diff_from_unscaled_rope": diff}


def make_case(index: int, case: Case, lines: list[str], out_root: Path) -> int:
    print(f"[{case.name}] training {case.tokenizer.kind} tokenizer")
    spec = case.tokenizer
    if spec.kind == "byte_level_bpe":
        tokenizer = train_byte_level_bpe(lines, spec.leading_specials, spec.trailing_specials, spec.bos, spec.split)
    elif spec.kind == "gemma_bpe":
        tokenizer = train_gemma_bpe(lines)
    else:
        tokenizer = train_sentencepiece_bpe(lines)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    bos_id = tokenizer.token_to_id(spec.bos_token) if spec.bos_token else None
    eos_id = tokenizer.token_to_id(spec.eos_token) if spec.eos_token else None

    config = case.make_config(vocab_size, bos_id, eos_id)
    seed = case_seed(index)
    model = build_model(config, seed, case.save_dtype)
    if type(model).__name__ != case.architecture:
        raise RuntimeError(f"{case.name}: built {type(model).__name__}, expected {case.architecture}")

    directory = out_root / case.name
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)

    # Save in the storage dtype (the parameters are exact in it), then compute the reference
    # from the files as transformers reads them back in float32.
    model.to(case.save_dtype)
    model.config.dtype = case.save_dtype
    model.save_pretrained(str(directory))
    (directory / "model.safetensors").chmod(0o644)  # save_pretrained creates it owner-only
    del model
    written_config = add_legacy_config_keys(directory / "config.json")
    save_tokenizer(directory, tokenizer, spec)
    stored_dtypes = {str(p.dtype) for p in AutoModelForCausalLM.from_pretrained(str(directory)).parameters()}
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="eager")
    model.eval()

    tokens = reference_tokens(tokenizer)
    print(f"  vocab {vocab_size}, tokens {tokens[:8]}...")
    prefill = prefill_logits(model, tokens)
    decode = decode_logits(model, tokens)
    scale = float(np.max(np.abs(prefill)))
    decode_diff = max_abs(prefill, decode)
    print(f"  max|logit| {scale:.3f}; decode vs prefill max diff {decode_diff:.3g}")
    if decode_diff > 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"{case.name}: KV-cache decode disagrees with prefill by {decode_diff}")

    # The model as built in memory (before saving) must agree with what was read back: nothing
    # was lost or reinterpreted on the way through config.json and model.safetensors.
    built = build_model(config, seed, case.save_dtype)
    reload_diff = max_abs(prefill, prefill_logits(built, tokens))
    if reload_diff > 1e-5 * max(scale, 1.0):
        raise RuntimeError(f"{case.name}: saved checkpoint gives different logits ({reload_diff})")
    # The saved tokenizer, loaded the way users load it, must give the recorded ids.
    encoding = tokenizer.encode(TOKENIZER_CHECK_TEXT)
    auto_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if auto_tokenizer(TOKENIZER_CHECK_TEXT).input_ids != encoding.ids:
        raise RuntimeError(f"{case.name}: AutoTokenizer on the saved files disagrees with the trained tokenizer")
    if auto_tokenizer(REFERENCE_SENTENCE).input_ids[:SEQUENCE_LENGTH] != tokenizer.encode(REFERENCE_SENTENCE).ids[:SEQUENCE_LENGTH]:
        raise RuntimeError(f"{case.name}: AutoTokenizer disagrees on the reference sentence")

    checks: dict = {
        "decode_vs_prefill_max_abs_diff": decode_diff,
        "in_memory_vs_saved_max_abs_diff": reload_diff,
        "stored_parameter_dtypes": sorted(stored_dtypes),
    }
    if written_config["model_type"] == "gemma3_text":
        checks["gemma3_checks"] = gemma3_checks(case, config, seed, tokens, prefill)
    elif getattr(config, "sliding_window", None):
        checks["sliding_window_check"] = sliding_window_check(case, config, seed, tokens, prefill)
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        checks["rope_scaling_check"] = rope_scaling_check(case, config, seed, tokens, prefill)

    files = {
        "prefill_logits": write_f32(directory / "prefill_logits.f32", prefill),
        "decode_logits": write_f32(directory / "decode_logits.f32", decode),
    }
    reference = {
        "case": case.name,
        "architecture": case.architecture,
        "model_type": written_config["model_type"],
        "tokens": tokens,
        "vocab_size": vocab_size,
        "n_positions": SEQUENCE_LENGTH,
        "logit_scale": scale,
        "seed": seed,
        "dtype": str(case.save_dtype).removeprefix("torch."),
        "compute_dtype": "float32",
        "attn_implementation": "eager",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "tokenizer_kind": spec.kind,
        "pre_tokenizer_split": spec.split if spec.kind == "byte_level_bpe" else None,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tokenizer_adds_bos": spec.bos is not None,
        "reference_sentence": REFERENCE_SENTENCE,
        "text": TOKENIZER_CHECK_TEXT,
        "text_ids": encoding.ids,
        "text_ids_without_special_tokens": tokenizer.encode(TOKENIZER_CHECK_TEXT, add_special_tokens=False).ids,
        "text_pieces": encoding.tokens,
        "text_decoded": tokenizer.decode(encoding.ids, skip_special_tokens=True),
        "files": files,
        "checks": checks,
        "notes": case.notes
        + " prefill_logits row t = logits after tokens[0..t]; decode_logits row t = logits of"
        " decode step t (token t fed with the KV cache of tokens 0..t-1). Weights: seeded"
        " transformers init with initializer_range 0.2, N(0, 0.1) added to every 1-D parameter"
        " (norm weights, biases).",
    }
    (directory / "reference.json").write_text(dump_json(reference) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(f"  wrote {directory.relative_to(out_root.parent)} ({size / 1024:.0f} KiB)")
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WikiText-2 validation text (tokenizer training)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture root (default tests/fixtures/models)")
    parser.add_argument("--only", nargs="*", choices=[c.name for c in CASES], help="build only these cases")
    args = parser.parse_args()

    if not args.data.is_file():
        print(f"error: training text not found: {args.data} (pass --data)", file=sys.stderr)
        return 1
    torch.set_num_threads(1)  # single-threaded CPU kernels: the same logits on every machine we tried
    torch.use_deterministic_algorithms(True)
    lines = load_training_lines(args.data)
    args.out.mkdir(parents=True, exist_ok=True)

    total = 0
    for index, case in enumerate(CASES):
        if args.only and case.name not in args.only:
            continue
        total += make_case(index, case, lines, args.out)
    print(f"done: {total / 1024:.0f} KiB of fixtures")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Independent Hugging Face transformers reference for the default model (a GGUF checkpoint),
or for another GGUF model given with --gguf (Gemma-3-270M: tests/fixtures/models/gemma3_270m_ref).

transformers reads the GGUF itself: it dequantizes every weight to float32 and builds the
tokenizer from the GGUF vocabulary, so nothing here shares code with the engine.

Subcommands
  logits  Tokenize the start of the WikiText-103 test text, run the model on the first 512
          tokens and write tests/fixtures/models/smollm2_ref/: the ids, and for every position
          the top-256 next-token log-probabilities plus the log of the remaining mass, so a C++
          test can measure top-1 agreement and a (coarse-grained) KL(reference || engine).
  ppl     Perplexity on the engine's protocol: tokenize the whole text, cut it into
          non-overlapping windows of L tokens, score every predicted token of every window.

Examples
  python3 scripts/reference_default_model.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf logits
  python3 scripts/reference_default_model.py ppl --tokens 4096 --json ppl_hf.json
  python3 scripts/reference_default_model.py --gguf models/gemma-3-270m-q4_k_m.gguf logits
      --n-tokens 768 --out tests/fixtures/models/gemma3_270m_ref   (one command)

Text files are read as raw UTF-8 bytes (the WikiText files have CRLF line ends, which are kept,
as the engine keeps them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-103-test.txt"
DEFAULT_LOGITS_OUT = REPO_ROOT / "tests" / "fixtures" / "models" / "smollm2_ref"


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def gguf_metadata(path: Path, key: str):
    """One scalar/string metadata value of a GGUF file (None if absent)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    return None if field is None else field.contents()


# transformers maps llama.cpp's `tokenizer.ggml.pre` names to split regexes, but not every name.
# For these it would fall back to the bare GPT-2 regex; restore the model's own pre-tokenizer.
PRE_TOKENIZER_FIXES = {
    # SmolLM / SmolLM2: every digit is its own pre-token, then the GPT-2 regex (the model's
    # tokenizer.json: Digits(individual_digits) + ByteLevel; llama.cpp's "smollm" pre-type).
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    ),
}


class Reference:
    """The tokenizer and the float32 model transformers builds from a GGUF file."""

    def __init__(self, gguf_path: Path, threads: int, attn: str, fix_pre_tokenizer: bool = True):
        if not gguf_path.is_file():
            raise SystemExit(f"error: GGUF file not found: {gguf_path} (pass --gguf)")
        torch.set_num_threads(threads)
        self.path = gguf_path
        self.threads = threads
        directory, name = str(gguf_path.parent), gguf_path.name

        log(f"loading tokenizer from {gguf_path}")
        self.tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        self.pre_type = gguf_metadata(gguf_path, "tokenizer.ggml.pre")
        self.stock_pre_tokenizer = str(self.tokenizer.backend_tokenizer.pre_tokenizer)
        self.pre_tokenizer_fix = None
        if fix_pre_tokenizer and self.pre_type in PRE_TOKENIZER_FIXES:
            self.tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZER_FIXES[self.pre_type]()
            self.pre_tokenizer_fix = (
                f"tokenizer.ggml.pre={self.pre_type!r}: replaced transformers' pre-tokenizer "
                f"{self.stock_pre_tokenizer} by {self.tokenizer.backend_tokenizer.pre_tokenizer}"
            )
            log(f"  {self.pre_tokenizer_fix}")

        probe = self.tokenizer("probe").input_ids
        self.bos_id = self.tokenizer.bos_token_id
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        log(f"  vocab {len(self.tokenizer)}, bos id {self.bos_id}, tokenizer adds BOS: {self.adds_bos}")

        log("loading model (dequantizing every GGUF tensor to float32)")
        started = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            attn_implementation=attn,
        )
        self.model.eval()
        packed = [type(m).__name__ for m in self.model.modules() if "gguf" in type(m).__name__.lower()]
        if packed:
            raise RuntimeError(f"model still holds packed GGUF modules ({packed[:3]}...); expected dense float32")
        dtypes = {p.dtype for p in self.model.parameters()}
        if dtypes != {torch.float32}:
            raise RuntimeError(f"expected float32 parameters, got {dtypes}")
        self.attn = self.model.config._attn_implementation
        log(f"  {type(self.model).__name__}, {sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters, "
            f"attention {self.attn}, loaded in {time.perf_counter() - started:.1f}s")

    def describe(self) -> dict:
        return {
            "gguf_file": self.path.name,
            "gguf_sha256": sha256_file(self.path),
            "architecture": type(self.model).__name__,
            "weights": "GGUF tensors dequantized to float32 by transformers (GgufConfig(dequantize=True))",
            "compute_dtype": "float32",
            "attn_implementation": self.attn,
            "torch_threads": self.threads,
            "tokenizer": "transformers AutoTokenizer built from the GGUF vocabulary",
            "tokenizer_pre_type": self.pre_type,
            "pre_tokenizer_fix": self.pre_tokenizer_fix,
            "bos_token_id": self.bos_id,
            "tokenizer_adds_bos": self.adds_bos,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "tokenizers_version": __import__("tokenizers").__version__,
            "gguf_version": package_version("gguf"),
        }

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 logits of one causal forward over `ids`."""
        return self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits[0].float()


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path) -> str:
    if not path.is_file():
        raise SystemExit(f"error: text file not found: {path} (pass --text)")
    # Bytes decoded as UTF-8 with no newline translation: CRLF stays CRLF.
    return path.read_bytes().decode("utf-8")


def log_softmax_double(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax with the log-sum-exp in float64, rows in chunks to bound memory."""
    rows = []
    for chunk in torch.split(logits, 128):
        chunk = chunk.double()
        rows.append(chunk - torch.logsumexp(chunk, dim=-1, keepdim=True))
    return torch.cat(rows)


# --------------------------------------------------------------------------------------------
# logits
# --------------------------------------------------------------------------------------------


def write_array(path: Path, array: np.ndarray, dtype: str) -> dict:
    data = np.ascontiguousarray(array, dtype=dtype)
    path.write_bytes(data.tobytes())
    return {
        "path": path.name,
        "dtype": {"<i4": "int32", "<f4": "float32"}[dtype],
        "byte_order": "little",
        "shape": list(data.shape),
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
    }


def command_logits(args: argparse.Namespace) -> int:
    reference = Reference(args.gguf, args.threads, args.attn, not args.no_pre_tokenizer_fix)
    text = read_text(args.text)
    log(f"tokenizing {args.text} ({len(text)} characters)")
    ids = reference.tokenizer(text).input_ids  # with BOS if the tokenizer adds one
    if len(ids) < args.n_tokens:
        raise SystemExit(f"error: the text has only {len(ids)} tokens, {args.n_tokens} needed")
    ids = ids[: args.n_tokens]
    bos_first = reference.adds_bos and ids[0] == reference.bos_id

    log(f"running the model on {len(ids)} tokens")
    started = time.perf_counter()
    logprobs = log_softmax_double(reference.logits(ids))  # [n, vocab] float64
    elapsed = time.perf_counter() - started
    top_values, top_ids = torch.topk(logprobs, args.top_k, dim=-1, sorted=True)
    # log of the mass outside the top-k, from the remaining logits directly (no 1 - sum).
    rest = logprobs.clone()
    rest.scatter_(1, top_ids, float("-inf"))
    rest_logprob = torch.logsumexp(rest, dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long)
    target_logprobs = logprobs[:-1].gather(1, targets[:, None])[:, 0]
    mean_nll = float(-target_logprobs.mean())
    top1_hits = int((top_ids[:-1, 0] == targets).sum())
    log(f"  {elapsed:.1f}s; mean NLL of the {len(targets)} next tokens {mean_nll:.4f} (PPL {math.exp(mean_nll):.3f}); "
        f"top-1 = next token at {top1_hits}/{len(targets)} positions")
    covered = torch.exp(top_values).sum(-1) + torch.exp(rest_logprob)
    if float((covered - 1).abs().max()) > 1e-9:
        raise RuntimeError("top-k mass plus rest mass does not add up to one")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.json").write_text(json.dumps(ids) + "\n")
    files = {
        "tokens": {"path": "tokens.json", "format": "JSON array of token ids", "count": len(ids)},
        "topk_ids": write_array(out / "topk_ids.i32", top_ids.numpy(), "<i4"),
        "topk_logprobs": write_array(out / "topk_logprobs.f32", top_values.numpy(), "<f4"),
        "rest_logprob": write_array(out / "rest_logprob.f32", rest_logprob.numpy(), "<f4"),
        "target_logprobs": write_array(out / "target_logprobs.f32", target_logprobs.numpy(), "<f4"),
    }
    description = {
        "model": reference.describe(),
        "text": {
            "path": args.text.name,
            "sha256": sha256_file(args.text),
            "reading": "raw bytes decoded as UTF-8, CRLF kept; the whole file tokenized in one call, "
            "special tokens added as the tokenizer does by default; first n_tokens ids kept",
        },
        "n_tokens": len(ids),
        "bos_first": bos_first,
        "top_k": args.top_k,
        "vocab_size": int(logprobs.shape[1]),
        "files": files,
        "layout": {
            "topk_ids": "[n_tokens, top_k]: row t = the top_k most likely tokens after ids[0..t], "
            "most likely first (ties in logit order of torch.topk)",
            "topk_logprobs": "[n_tokens, top_k]: their log-softmax values (natural log; log-sum-exp "
            "in float64, stored as float32)",
            "rest_logprob": "[n_tokens]: log of the total probability of the vocab_size - top_k other "
            "tokens (computed from their logits, not as 1 - sum)",
            "target_logprobs": "[n_tokens - 1]: log-probability of the actual next token ids[t + 1] "
            "after ids[0..t]",
        },
        "summary": {
            "mean_nll_next_token": mean_nll,
            "ppl_next_token": math.exp(mean_nll),
            "top1_is_next_token": top1_hits,
            "forward_seconds": elapsed,
        },
        "notes": "Compare an engine's logits row by row: top-1 agreement = its argmax equals "
        "topk_ids[t][0]. KL(ref || ours) is computed over top_k + 1 buckets: the top_k ids "
        "(ref p_i = exp(topk_logprobs), ours q_i from the engine's log-softmax at the same ids) "
        "and one 'rest' bucket (ref exp(rest_logprob), ours 1 - sum q_i). Merging tokens into a "
        "bucket can only lose information, so this coarse-grained KL is a lower bound of the "
        "full-vocabulary KL (equal when the rest mass is tiny). Reference logits are transformers' "
        "float32 forward over the dequantized GGUF weights.",
    }
    (out / "reference.json").write_text(json.dumps(description, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({total / 1024:.0f} KiB)")
    return 0


# --------------------------------------------------------------------------------------------
# ppl
# --------------------------------------------------------------------------------------------


def command_ppl(args: argparse.Namespace) -> int:
    if args.window < 2:
        raise SystemExit("error: --window must be at least 2")
    reference = Reference(args.gguf, args.threads, args.attn, not args.no_pre_tokenizer_fix)
    text = read_text(args.text)
    log(f"tokenizing {args.text} ({len(text)} characters)")
    started = time.perf_counter()
    ids = reference.tokenizer(text, add_special_tokens=False).input_ids
    log(f"  {len(ids)} tokens in {time.perf_counter() - started:.1f}s")
    if args.tokens is not None:
        ids = ids[: args.tokens]

    use_bos = {"auto": reference.adds_bos, "yes": True, "no": False}[args.bos]
    if use_bos and reference.bos_id is None:
        raise SystemExit("error: --bos yes, but the tokenizer has no BOS token")
    # Each window holds exactly `window` tokens: with BOS, BOS + (window - 1) text tokens, every
    # text token scored; without, `window` text tokens, all but the first scored.
    text_per_window = args.window - 1 if use_bos else args.window
    windows = [ids[start : start + text_per_window] for start in range(0, len(ids), text_per_window)]
    if not use_bos and windows and len(windows[-1]) < 2:
        windows.pop()  # a lone trailing token predicts nothing
    log(f"{len(windows)} windows of up to {args.window} tokens (BOS first: {use_bos}), {args.threads} threads")

    total_nll = 0.0
    scored = 0
    forward_seconds = 0.0
    processed = 0
    for index, window in enumerate(windows):
        sequence = ([reference.bos_id] if use_bos else []) + window
        started = time.perf_counter()
        logits = reference.logits(sequence)
        forward_seconds += time.perf_counter() - started
        logprobs = log_softmax_double(logits[:-1])
        targets = torch.tensor(sequence[1:], dtype=torch.long)
        nll = -logprobs.gather(1, targets[:, None]).sum().item()
        total_nll += nll
        scored += len(targets)
        processed += len(sequence)
        log(f"  window {index + 1}/{len(windows)}: {len(targets)} tokens, NLL {nll / len(targets):.4f}; "
            f"running PPL {math.exp(total_nll / scored):.4f}")

    if scored == 0:
        raise SystemExit("error: no tokens to score")
    mean_nll = total_nll / scored
    result = {
        "model": args.gguf.name,
        "mode": "hf-transformers",
        "window": args.window,
        "tokens": scored,
        "nll": mean_nll,
        "ppl": math.exp(mean_nll),
        "tokens_per_s": processed / forward_seconds,
        "windows": len(windows),
        "bos_first": use_bos,
        "text_tokens_used": len(ids),
        "text": args.text.name,
        "protocol": "whole text tokenized without special tokens (raw UTF-8, CRLF kept); cut into "
        "non-overlapping windows of `window` tokens (BOS + window-1 text tokens when bos_first, "
        "else window text tokens); every token after the first of each window scored; one causal "
        "forward per window, no context carried across windows; tokens_per_s = tokens fed through "
        "the model / forward time",
        "threads": args.threads,
        "attn_implementation": reference.attn,
        "pre_tokenizer_fix": reference.pre_tokenizer_fix,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    log(f"tokens scored {scored}, mean NLL {mean_nll:.5f}, PPL {result['ppl']:.4f}, "
        f"{result['tokens_per_s']:.0f} tokens/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help=f"model file (default {DEFAULT_GGUF})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--attn", default="eager", help="transformers attention implementation (default eager)")
    parser.add_argument(
        "--no-pre-tokenizer-fix",
        action="store_true",
        help="keep transformers' GGUF pre-tokenizer even where it lacks the model's (e.g. SmolLM digits)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    logits = commands.add_parser("logits", help="write the top-k log-prob fixture")
    logits.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="WikiText-103 test text")
    logits.add_argument("--out", type=Path, default=DEFAULT_LOGITS_OUT, help="output folder")
    logits.add_argument("--n-tokens", type=int, default=512, help="sequence length (default 512)")
    logits.add_argument("--top-k", type=int, default=256, help="ids kept per position (default 256)")
    logits.set_defaults(run=command_logits)

    ppl = commands.add_parser("ppl", help="windowed perplexity")
    ppl.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="WikiText-103 test text")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per window, BOS included (default 1024)")
    ppl.add_argument("--tokens", type=int, default=None, help="use only the first N text tokens")
    ppl.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                     help="BOS at the start of each window (auto: if the tokenizer adds one)")
    ppl.add_argument("--json", type=Path, default=None, help="write the result here")
    ppl.set_defaults(run=command_ppl)

    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

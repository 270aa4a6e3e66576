#!/usr/bin/env python3
"""Prefill and decode tokens/s of visikv and llama.cpp on the same GGUF, same threads, one run.

    python3 bench/speed_vs_llamacpp.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--threads 2] [--contexts 128 1024 4096] [--json results/speed.json]

visikv is measured by build/bench/bench_model (Google Benchmark); llama.cpp through the PyPI
package llama-cpp-python (scripts/setup.sh --bench) with an f16 KV cache. Protocol for both:
prefill = one pass over N WikiText-103 test tokens; decode = 32 tokens fed one at a time after
an N-token prefill (not timed). The table prints tokens/s and visikv/llama.cpp ratios.
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DECODE_STEPS = 32


def visikv_figures(binary, model, threads, contexts, repetitions):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               VISIKV_BENCH_MODEL=str(model), VISIKV_BENCH_CACHE="f16")
    pattern = "|".join(f"(Prefill|Decode)/{n}/" for n in contexts)
    out = subprocess.run([str(binary), f"--benchmark_filter={pattern}", "--benchmark_format=json",
                          f"--benchmark_repetitions={repetitions}"],
                         env=env, check=True, capture_output=True, text=True).stdout
    runs = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("run_type") != "iteration":
            continue
        kind, n = b["run_name"].split("/")[:2]
        runs.setdefault((kind.lower(), int(n)), []).append(b["tokens_per_s"])
    return {key: median(values) for key, values in runs.items()}


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def llamacpp_figures(model, threads, contexts, tokens, repetitions):
    from llama_cpp import Llama, GGML_TYPE_F16
    figures = {}
    for n in contexts:
        llm = Llama(model_path=str(model), n_ctx=n + DECODE_STEPS + 8, n_threads=threads,
                    n_threads_batch=threads, n_batch=min(n, 2048), n_ubatch=min(n, 512),
                    type_k=GGML_TYPE_F16, type_v=GGML_TYPE_F16, logits_all=False, verbose=False)
        prefill, decode = [], []
        for _ in range(repetitions):
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            start = time.perf_counter()
            llm.eval(tokens[:n])
            prefill.append(n / (time.perf_counter() - start))
            start = time.perf_counter()
            for i in range(DECODE_STEPS):
                llm.eval([tokens[n + i]])
            decode.append(DECODE_STEPS / (time.perf_counter() - start))
        figures[("prefill", n)] = median(prefill)
        figures[("decode", n)] = median(decode)
        del llm
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--binary", default=str(ROOT / "build" / "bench" / "bench_model"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-103-test.txt"))
    parser.add_argument("--json", default=str(ROOT / "results" / "speed_vs_llamacpp.json"))
    args = parser.parse_args()

    model = pathlib.Path(args.model)
    if not model.is_file():
        sys.exit(f"model not found: {model} (run scripts/setup.sh)")
    if not pathlib.Path(args.binary).is_file():
        sys.exit(f"benchmark binary not found: {args.binary} (run scripts/build.sh)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed (run scripts/setup.sh --bench)")

    from llama_cpp import Llama
    vocab_only = Llama(model_path=str(model), vocab_only=True, verbose=False)
    text = pathlib.Path(args.text).read_text(encoding="utf-8")
    tokens = vocab_only.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    need = max(args.contexts) + DECODE_STEPS
    if len(tokens) < need:
        sys.exit(f"the text has only {len(tokens)} tokens, {need} needed")

    print(f"measuring visikv ({args.threads} threads) ...", file=sys.stderr, flush=True)
    ours = visikv_figures(args.binary, model, args.threads, args.contexts, args.repetitions)
    print(f"measuring llama.cpp {llama_cpp.__version__} ({args.threads} threads) ...", file=sys.stderr, flush=True)
    peer = llamacpp_figures(model, args.threads, args.contexts, tokens, args.repetitions)

    rows = []
    print(f"\n{'phase':<8} {'context':>8} {'visikv tok/s':>13} {'llama.cpp tok/s':>16} {'ratio':>7}")
    for kind in ("prefill", "decode"):
        for n in args.contexts:
            a, b = ours[(kind, n)], peer[(kind, n)]
            rows.append({"phase": kind, "context": n, "visikv_tokens_per_s": a,
                         "llamacpp_tokens_per_s": b, "ratio": a / b})
            print(f"{kind:<8} {n:>8} {a:>13.1f} {b:>16.1f} {a / b:>7.2f}")
    result = {"model": str(model), "threads": args.threads, "kv_cache": "f16",
              "decode_steps": DECODE_STEPS, "llama_cpp_python": llama_cpp.__version__,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

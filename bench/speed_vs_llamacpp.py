#!/usr/bin/env python3
"""Prefill and decode tokens/s of visikv and llama.cpp on the same GGUF, same threads, one run.

    python3 bench/speed_vs_llamacpp.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--threads 2] [--contexts 128 1024 4096 8160] [--kv f16 q4_0] [--numerics exact int8 int16]
        [--json results/speed.json]

visikv is measured by build/bench/bench_model (Google Benchmark); llama.cpp through the PyPI
package llama-cpp-python (scripts/setup.sh --bench). Protocol for both: prefill = one pass over N
WikiText-103 test tokens; decode = 32 tokens fed one at a time after an N-token prefill (not
timed); 8160 + 32 fills the default model's 8192 positions. visikv runs once per --numerics
(exact: transformers-equal products; int8: 8-bit activations, as llama.cpp computes; int16: 16-bit
activations). KV caches (--kv), keys and values
alike: f16 (both f16); q8_0 (llama.cpp q8_0: 32 values share an fp16 scale, 8.5 bits; visikv
int8:g32:tok: scale and zero, 9 bits); q4_0 (llama.cpp q4_0, 4.5 bits; visikv int4:g32:tok, 5
bits). llama.cpp runs with flash attention off and on and its faster setting counts (a quantized
V cache needs it on).
The table prints tokens/s and visikv/llama.cpp ratios.
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


# --kv name: (visikv cache spec, llama.cpp ggml type name)
KV_CACHES = {"f16": ("f16", "GGML_TYPE_F16"), "q8_0": ("int8:g32:tok", "GGML_TYPE_Q8_0"),
             "q4_0": ("int4:g32:tok", "GGML_TYPE_Q4_0")}


def visikv_figures(binary, model, threads, contexts, repetitions, cache_spec, numerics):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               VISIKV_BENCH_MODEL=str(model), VISIKV_BENCH_CACHE=cache_spec,
               VISIKV_BENCH_NUMERICS=numerics)
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


def llamacpp_figures(model, threads, contexts, tokens, repetitions, cache_type):
    """The faster of flash attention off and on, per phase and context."""
    quantized = cache_type != "GGML_TYPE_F16"
    figures = {}
    for flash in ([True] if quantized else [False, True]):
        for key, value in llamacpp_run(model, threads, contexts, tokens, repetitions, cache_type,
                                       flash).items():
            figures[key] = max(figures.get(key, 0.0), value)
    return figures


def llamacpp_run(model, threads, contexts, tokens, repetitions, cache_type, flash):
    import llama_cpp
    from llama_cpp import Llama
    ggml_type = getattr(llama_cpp, cache_type)
    figures = {}
    for n in contexts:
        llm = Llama(model_path=str(model), n_ctx=n + DECODE_STEPS, n_threads=threads,
                    n_threads_batch=threads, n_batch=min(n, 2048), n_ubatch=min(n, 512),
                    type_k=ggml_type, type_v=ggml_type, flash_attn=flash, logits_all=False,
                    verbose=False)
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
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 8160])
    parser.add_argument("--kv", nargs="+", default=["f16"], choices=sorted(KV_CACHES))
    parser.add_argument("--numerics", nargs="+", default=["exact"], choices=["exact", "int8", "int16"])
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

    rows = []
    for kv in args.kv:
        ours_spec, peer_type = KV_CACHES[kv]
        ours = {}
        for numerics in args.numerics:
            print(f"measuring visikv, cache {ours_spec}, {numerics} products ({args.threads} threads) ...",
                  file=sys.stderr, flush=True)
            ours[numerics] = visikv_figures(args.binary, model, args.threads, args.contexts,
                                            args.repetitions, ours_spec, numerics)
        print(f"measuring llama.cpp {llama_cpp.__version__}, cache {kv} ({args.threads} threads) ...",
              file=sys.stderr, flush=True)
        peer = llamacpp_figures(model, args.threads, args.contexts, tokens, args.repetitions, peer_type)
        print(f"\n{'kv':<5} {'numerics':<8} {'phase':<8} {'context':>8} {'visikv tok/s':>13} "
              f"{'llama.cpp tok/s':>16} {'ratio':>7}")
        for numerics in args.numerics:
            for kind in ("prefill", "decode"):
                for n in args.contexts:
                    a, b = ours[numerics][(kind, n)], peer[(kind, n)]
                    rows.append({"kv": kv, "visikv_cache": ours_spec, "numerics": numerics,
                                 "phase": kind, "context": n, "visikv_tokens_per_s": a,
                                 "llamacpp_tokens_per_s": b, "ratio": a / b})
                    print(f"{kv:<5} {numerics:<8} {kind:<8} {n:>8} {a:>13.1f} {b:>16.1f} {a / b:>7.2f}",
                          flush=True)
    result = {"model": str(model), "threads": args.threads, "kv_caches": args.kv,
              "decode_steps": DECODE_STEPS, "llama_cpp_python": llama_cpp.__version__,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

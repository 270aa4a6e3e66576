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
Each engine runs every context in a process of its own, and the peak resident memory of that
process (VmHWM, which the process reads from /proc/self/status as it ends: wait4's ru_maxrss
would start from this script's own peak, which a child keeps across exec) is reported beside its
speed: for llama.cpp the process is a Python interpreter running llama-cpp-python, whose own peak
with llama_cpp imported and no model loaded is measured the same way and subtracted (the column
says so).
The table prints tokens/s, peak RSS and visikv/llama.cpp ratios.
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DECODE_STEPS = 32


# --kv name: (visikv cache spec, llama.cpp ggml type name)
KV_CACHES = {"f16": ("f16", "GGML_TYPE_F16"), "q8_0": ("int8:g32:tok", "GGML_TYPE_Q8_0"),
             "q4_0": ("int4:g32:tok", "GGML_TYPE_Q4_0")}


def run_measured(command, env=None):
    """Runs `command`; returns its standard output."""
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{command[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def own_peak_rss():
    """This process's peak resident memory in bytes (VmHWM; its own, not its parent's)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def visikv_figures(binary, model, threads, contexts, repetitions, cache_spec, numerics):
    """{(phase, context): tokens/s} and {context: peak RSS}, one process per context."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               VISIKV_BENCH_MODEL=str(model), VISIKV_BENCH_CACHE=cache_spec,
               VISIKV_BENCH_NUMERICS=numerics)
    runs, peaks = {}, {}
    for n in contexts:
        out = run_measured(
            [str(binary), f"--benchmark_filter=(Prefill|Decode)/{n}/", "--benchmark_format=json",
             f"--benchmark_repetitions={repetitions}"], env)
        for b in json.loads(out)["benchmarks"]:
            if b.get("run_type") != "iteration":
                continue
            peaks[n] = max(peaks.get(n, 0), int(b["peak_rss_mib"] * (1 << 20)))
            kind, _ = b["run_name"].split("/")[:2]
            runs.setdefault((kind.lower(), n), []).append(b["tokens_per_s"])
    return {key: median(values) for key, values in runs.items()}, peaks


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def llamacpp_figures(model, threads, contexts, tokens, repetitions, cache_type):
    """The faster of flash attention off and on, per phase and context, and the peak RSS of the
    faster setting's process (decode's) less the interpreter's own, per context."""
    quantized = cache_type != "GGML_TYPE_F16"
    baseline = int(run_measured([sys.executable, __file__, "--llamacpp-baseline"]))
    figures, peaks, best_decode = {}, {}, {}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as token_file:
        json.dump(tokens, token_file)
        token_file.flush()
        for flash in ([True] if quantized else [False, True]):
            for n in contexts:
                out = run_measured(
                    [sys.executable, __file__, "--llamacpp-worker", "--model", str(model),
                     "--threads", str(threads), "--contexts", str(n), "--repetitions",
                     str(repetitions), "--cache-type", cache_type, "--flash", str(int(flash)),
                     "--tokens-file", token_file.name])
                run = json.loads(out)
                for kind in ("prefill", "decode"):
                    figures[(kind, n)] = max(figures.get((kind, n), 0.0), run[kind])
                if run["decode"] >= best_decode.get(n, 0.0):
                    best_decode[n], peaks[n] = run["decode"], run["peak_rss"] - baseline
    return figures, peaks


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
    # Internal: one llama.cpp measurement in a process of its own (see llamacpp_figures).
    parser.add_argument("--llamacpp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llamacpp-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-type", help=argparse.SUPPRESS)
    parser.add_argument("--flash", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llamacpp_baseline:
        import llama_cpp  # noqa: F401  (the interpreter's own peak, with the library loaded)
        print(own_peak_rss())
        return
    if args.llamacpp_worker:
        tokens = json.loads(pathlib.Path(args.tokens_file).read_text())
        run = llamacpp_run(args.model, args.threads, args.contexts, tokens, args.repetitions,
                           args.cache_type, bool(args.flash))
        n = args.contexts[0]
        print(json.dumps({"prefill": run[("prefill", n)], "decode": run[("decode", n)],
                          "peak_rss": own_peak_rss()}))
        return

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
        ours, our_peaks = {}, {}
        for numerics in args.numerics:
            print(f"measuring visikv, cache {ours_spec}, {numerics} products ({args.threads} threads) ...",
                  file=sys.stderr, flush=True)
            ours[numerics], our_peaks[numerics] = visikv_figures(
                args.binary, model, args.threads, args.contexts, args.repetitions, ours_spec, numerics)
        print(f"measuring llama.cpp {llama_cpp.__version__}, cache {kv} ({args.threads} threads) ...",
              file=sys.stderr, flush=True)
        peer, peer_peaks = llamacpp_figures(model, args.threads, args.contexts, tokens,
                                            args.repetitions, peer_type)
        mib = 1 << 20
        print(f"\n{'kv':<5} {'numerics':<8} {'phase':<8} {'context':>8} {'visikv tok/s':>13} "
              f"{'llama.cpp tok/s':>16} {'ratio':>7} {'visikv MiB':>11} {'llama.cpp MiB*':>15}")
        for numerics in args.numerics:
            for kind in ("prefill", "decode"):
                for n in args.contexts:
                    a, b = ours[numerics][(kind, n)], peer[(kind, n)]
                    rows.append({"kv": kv, "visikv_cache": ours_spec, "numerics": numerics,
                                 "phase": kind, "context": n, "visikv_tokens_per_s": a,
                                 "llamacpp_tokens_per_s": b, "ratio": a / b,
                                 "visikv_peak_rss_bytes": our_peaks[numerics][n],
                                 "llamacpp_peak_rss_bytes_less_interpreter": peer_peaks[n]})
                    print(f"{kv:<5} {numerics:<8} {kind:<8} {n:>8} {a:>13.1f} {b:>16.1f} {a / b:>7.2f} "
                          f"{our_peaks[numerics][n] / mib:>11.1f} {peer_peaks[n] / mib:>15.1f}",
                          flush=True)
        print("* llama.cpp's process peak less the Python interpreter's with llama_cpp imported")
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

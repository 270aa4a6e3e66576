#!/usr/bin/env python3
"""A bounded load test of `visikv serve` with the official openai client: C concurrent clients
each send R completion requests; reports failures, latency percentiles and total generated
tokens per second, then the KV cache bytes of one sequence as /metrics shows them for f16 and
4-bit caches. Output: a readable table and JSON (--json).

    python3 bench/serve_load.py [--model default] [--clients 16] [--requests 20] \\
        [--max-tokens 32] [--max-sequences 16] [--threads 2] [--json F]
"""

import argparse
import json
import pathlib
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai

ROOT = pathlib.Path(__file__).resolve().parents[1]


def start(model, threads, max_sequences):
    process = subprocess.Popen(
        [str(ROOT / "build" / "visikv"), "-t", str(threads), "serve", model, "--port", "0",
         "--max-sequences", str(max_sequences)],
        stderr=subprocess.PIPE, text=True,
    )
    line = process.stderr.readline()
    match = re.search(r"serve: (.+) on http://([\d.]+):(\d+)", line)
    if not match:
        process.kill()
        sys.exit(f"serve_load: the server did not start: {line}{process.stderr.read()}")
    return process, match[1], f"http://{match[2]}:{match[3]}"


def metrics(url):
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return {l.split()[0]: float(l.split()[1]) for l in lines if l and not l.startswith("#")}


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def load(client, model_id, clients, requests, max_tokens):
    latencies, tokens, failures = [], [], []
    lock = threading.Lock()

    def worker(w):
        for i in range(requests):
            started = time.monotonic()
            try:
                r = client.completions.create(
                    model=model_id, prompt=f"Question {w}.{i}: what is the capital of France?",
                    max_tokens=max_tokens, temperature=0.8, seed=w * 1000 + i,
                )
                with lock:
                    latencies.append(time.monotonic() - started)
                    tokens.append(r.usage.completion_tokens)
            except Exception as error:  # every failure counts
                with lock:
                    failures.append(repr(error))

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, tokens, failures, time.monotonic() - started


def kv_bytes(client, url, model_id, keys, values, after_tokens=64):
    stream = client.completions.create(
        model=model_id, prompt="The history of the city begins", max_tokens=after_tokens + 64,
        temperature=0, stream=True, extra_body={"visikv": {"keys": keys, "values": values}},
    )
    seen = None
    for i, _ in enumerate(stream):
        if i == after_tokens:
            seen = metrics(url)
            break
    stream.close()
    return {"bytes": seen["visikv_kv_cache_bytes_per_sequence"],
            "tokens": seen["visikv_kv_cache_tokens"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-sequences", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()

    process, model_id, url = start(args.model, args.threads, args.max_sequences)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        latencies, tokens, failures, wall = load(
            client, model_id, args.clients, args.requests, args.max_tokens)
        kv = {f"{k}/{v}": kv_bytes(client, url, model_id, k, v)
              for k, v in [("f16", "f16"), ("int4:g32:tok", "int4:g32:tok"),
                           ("int2:g32:chan:r128", "f16")]}
    finally:
        process.terminate()
        process.wait(timeout=60)

    result = {
        "model": model_id, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "max_sequences": args.max_sequences,
        "threads": args.threads, "requests": len(latencies) + len(failures),
        "failures": len(failures), "failure_examples": failures[:3],
        "latency_p50_s": percentile(latencies, 50) if latencies else None,
        "latency_p99_s": percentile(latencies, 99) if latencies else None,
        "latency_mean_s": statistics.mean(latencies) if latencies else None,
        "generated_tokens": sum(tokens), "wall_s": wall,
        "generated_tokens_per_s": sum(tokens) / wall,
        "kv_per_sequence_after_64_streamed_tokens": kv,
    }
    print(f"{result['requests']} requests ({args.clients} clients x {args.requests}), "
          f"{result['failures']} failures")
    print(f"latency p50 {result['latency_p50_s']:.2f} s, p99 {result['latency_p99_s']:.2f} s; "
          f"{result['generated_tokens']} tokens in {wall:.1f} s = "
          f"{result['generated_tokens_per_s']:.1f} tokens/s")
    print("| keys/values | KV bytes per sequence | tokens | bytes per token |\n| --- | --- | --- | --- |")
    for name, value in kv.items():
        print(f"| {name} | {value['bytes']:.0f} | {value['tokens']:.0f} | "
              f"{value['bytes'] / value['tokens']:.0f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

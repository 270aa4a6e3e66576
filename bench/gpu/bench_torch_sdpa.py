#!/usr/bin/env python3
"""Times torch.nn.functional.scaled_dot_product_attention with the FlashAttention backend forced
(torch.nn.attention.sdpa_kernel) on the shapes bench_cuda_attention times, bf16, CUDA events,
medians. Writes one JSON report; `--plan` prints the cases without touching a GPU.

    bench_torch_sdpa.py [--quick] [--out FILE] [--plan]
"""
import argparse
import json
import statistics
import sys

SIZES = [1024, 4096, 16384, 65536, 131072]
QUICK_SIZES = [1024, 4096]
HEADS = [(32, 8, 128), (9, 3, 64)]  # query heads, KV heads, head dim (and the default model's)


def cases(quick):
    sizes = QUICK_SIZES if quick else SIZES
    for q_heads, kv_heads, dim in HEADS:
        for n in sizes:
            yield {"kernel": "sdpa_decode", "heads": (q_heads, kv_heads, dim), "batch": 1, "n": n}
            yield {"kernel": "sdpa_prefill", "heads": (q_heads, kv_heads, dim), "batch": 1, "n": n}
    target_n = 4096 if quick else 131072
    yield {"kernel": "sdpa_decode", "heads": (32, 8, 128), "batch": 16, "n": target_n}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--out", help="write the JSON report here (default: stdout)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case")
    parser.add_argument("--plan", action="store_true", help="print the cases and exit")
    return parser.parse_args(argv)


def median_ms(torch, call, repeats):
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def time_case(torch, case, repeats):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    q_heads, kv_heads, dim = case["heads"]
    batch, n = case["batch"], case["n"]
    queries = 1 if case["kernel"] == "sdpa_decode" else n
    device, dtype = "cuda", torch.bfloat16
    q = torch.randn(batch, q_heads, queries, dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, dim, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, dim, device=device, dtype=dtype)
    causal = case["kernel"] == "sdpa_prefill"
    gqa = "enable_gqa"
    if q_heads != kv_heads:
        try:  # grouped-query attention inside the kernel (torch >= 2.5)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        except (TypeError, RuntimeError):
            # Older torch: repeat the KV heads (reads more bytes; noted in the record).
            k = k.repeat_interleave(q_heads // kv_heads, dim=1)
            v = v.repeat_interleave(q_heads // kv_heads, dim=1)
            gqa = "repeated_kv"
    kwargs = {"is_causal": causal}
    if gqa == "enable_gqa" and q_heads != kv_heads:
        kwargs["enable_gqa"] = True

    def call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, **kwargs)

    ms = median_ms(torch, call, repeats if n < 65536 or not causal else max(3, repeats // 4))
    record = dict(case, heads="x".join(map(str, case["heads"])), ms=ms, gqa=gqa)
    del q, k, v
    torch.cuda.empty_cache()
    return record


def main(argv):
    args = parse_args(argv)
    planned = list(cases(args.quick))
    if args.plan:
        for case in planned:
            print(json.dumps(dict(case, heads="x".join(map(str, case["heads"])))))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_torch_sdpa: no CUDA device", file=sys.stderr)
        return 1
    records = []
    for case in planned:
        record = time_case(torch, case, args.repeats)
        print(json.dumps(record), file=sys.stderr)
        records.append(record)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "records": records}
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

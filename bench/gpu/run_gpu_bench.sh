#!/usr/bin/env bash
# The GPU benchmark in one run (docs/CUDA.md): configure and build with the CUDA kernels, run
# the CUDA tests (they must pass, not skip), time our kernels and torch SDPA (FlashAttention
# backend) on the same shapes, and print one table plus its JSON.
#
#   bench/gpu/run_gpu_bench.sh [--quick]        (from the repository root; needs torch)
set -euo pipefail
cd "$(dirname "$0")/../.."
QUICK=()
if [[ "${1:-}" == "--quick" ]]; then QUICK=(--quick); fi
BUILD=${VISIKV_GPU_BUILD:-build-gpu}
OUT=${VISIKV_GPU_OUT:-$BUILD/gpu-bench}
JOBS=$(nproc)

cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DVISIKV_CUDA=ON \
  -DVISIKV_BUILD_BENCH=ON -DVISIKV_BUILD_TESTS=ON > "$BUILD.configure.log"
cmake --build "$BUILD" -j "$JOBS" --target test_cuda_attention bench_cuda_attention
mkdir -p "$OUT"

# Correctness first: every GPU test must run and pass (a skip means no device was seen).
"$BUILD/tests/test_cuda_attention" --gtest_brief=1 | tee "$OUT/tests.log"
if grep -q "SKIPPED" "$OUT/tests.log"; then
  echo "run_gpu_bench: GPU tests were skipped (no device?)" >&2
  exit 1
fi

"$BUILD/bench/bench_cuda_attention" "${QUICK[@]}" --out "$OUT/ours.json"
python3 bench/gpu/bench_torch_sdpa.py "${QUICK[@]}" --out "$OUT/sdpa.json"
python3 bench/gpu/make_table.py "$OUT/ours.json" "$OUT/sdpa.json" --json "$OUT/table.json" \
  | tee "$OUT/table.md"

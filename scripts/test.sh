#!/usr/bin/env bash
# Builds and runs the whole test suite: the release build (with the Python package and its pytest
# suite), then the same C++ tests under AddressSanitizer and UndefinedBehaviorSanitizer. Sets
# everything up first.
#   scripts/test.sh            both builds
#   scripts/test.sh --fast     the release build only
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=$(nproc)
# ctest runs test binaries side by side; one worker thread each avoids oversubscribing the cores
# (tests that check thread-count independence set their own counts).
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

# The release build also builds the Python extension (build/python), whose tests follow the C++
# ones.
scripts/build.sh build -DVISIKV_PYTHON=ON -DPython_EXECUTABLE="$(command -v python3)"
(cd build && ctest --output-on-failure -j "$jobs")
PYTHONPATH=build/python python3 -m pytest -q tests/python

if [ "${1:-}" != "--fast" ]; then
  # The sanitizers check the host code; the CUDA kernels were compiled (and their tests run or
  # skipped) by the release build above. Clang builds the instrumented code several times faster
  # than GCC (the SIMD kernels compiled for several instruction sets above all), and it holds the
  # libFuzzer targets (fuzz/README.md), which run for a bounded time among these tests.
  CC=clang CXX=clang++ scripts/build.sh build-sanitize -DVISIKV_SANITIZE=ON -DVISIKV_FUZZ=ON \
    -DVISIKV_BUILD_BENCH=OFF -DVISIKV_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  (cd build-sanitize && ctest --output-on-failure -j "$jobs")
fi
echo "test.sh: all tests passed"

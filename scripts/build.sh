#!/usr/bin/env bash
# Configures and builds visikv into build/ (the program lands at build/visikv).
#   scripts/build.sh [build-dir] [extra cmake flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
shift || true
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$dir" -j "$(nproc)"

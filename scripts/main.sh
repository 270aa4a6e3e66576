#!/usr/bin/env bash
# The main job on the default model: perplexity on WikiText-103 test (prefill mode, windows of
# 1024 tokens) and a short greedy generation. Sets everything up first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh build
mkdir -p results
build/visikv ppl default --mode prefill --window 1024 --json results/ppl_default_prefill.json "$@"
build/visikv generate default "The history of the Roman Empire" --tokens 48 --stats

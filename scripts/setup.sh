#!/usr/bin/env bash
# Installs everything visikv needs on a fresh Debian 12 machine and fetches the default model.
# Safe to run again: it skips what is already there.
#   scripts/setup.sh            system packages + default model
#   scripts/setup.sh --bench    also the Python packages of the benchmarks (llama-cpp-python)
#   scripts/setup.sh --fixtures also the Python packages that regenerate test fixtures
#   scripts/setup.sh --models   also the second benchmark model (Qwen2.5-Coder-1.5B Q4_K_M, 1.1 GB)
#                               and Gemma-3-270M (Q4_K_M, 253 MB)
set -euo pipefail
cd "$(dirname "$0")/.."

want_bench=0
want_fixtures=0
want_models=0
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=1 ;;
    --fixtures) want_fixtures=1 ;;
    --models) want_models=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# libclang-rt-dev: clang's sanitizer and libFuzzer runtimes (the sanitizer build, fuzz/).
packages=(build-essential g++ clang libclang-rt-dev libomp-dev cmake ninja-build pkg-config git unzip python3 python3-pip python3-dev
          nlohmann-json3-dev libpcre2-dev libutf8proc-dev libcli11-dev libopenblas-dev
          libgtest-dev libgmock-dev libbenchmark-dev zlib1g-dev libhwy-dev ccache libcpp-httplib-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

scripts/fetch_default_model.sh
if ((want_models)); then
  scripts/fetch_qwen_coder.sh
  scripts/fetch_gemma3.sh
fi

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}
# The Python package's build and test dependencies (nanobind, numpy, pytest): the test command
# builds the extension and runs its tests.
pip_install -r scripts/requirements-python.txt
if ((want_bench)); then pip_install -r scripts/requirements-bench.txt; fi
if ((want_fixtures)); then pip_install -r scripts/requirements-fixtures.txt; fi
echo "setup: done"

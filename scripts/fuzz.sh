#!/usr/bin/env bash
# Runs the fuzz targets of the sanitizer build for a number of executions each.
#   scripts/fuzz.sh RUNS [target ...]     e.g. scripts/fuzz.sh 1000000 gguf specs
# Needs the build described in fuzz/README.md (build-sanitize with -DVISIKV_FUZZ=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:?usage: scripts/fuzz.sh RUNS [target ...]}
shift
targets=("$@")
((${#targets[@]})) || targets=(gguf safetensors hf_dir tokenizer_json tokenizer_encode specs chat_template
                                  serve_request)
build=build-sanitize
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
printf '%-18s %12s %9s %s\n' target executions seconds result
for target in "${targets[@]}"; do
  binary=$build/fuzz/fuzz_$target
  [ -x "$binary" ] || { echo "fuzz.sh: $binary is missing (see fuzz/README.md)" >&2; exit 2; }
  corpus=$build/fuzz/corpus/$target
  mkdir -p "$corpus"
  log=$build/fuzz/fuzz_$target.log
  start=$(date +%s)
  if (cd "$build/fuzz" && "./fuzz_$target" -runs="$runs" -timeout=30 -rss_limit_mb=2560 \
        -print_final_stats=1 "corpus/$target" "$PWD/../../fuzz/seeds/$target") >"$log" 2>&1; then
    result="no crash"
  else
    result="FAILED (see $log)"
    status=1
  fi
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  printf '%-18s %12s %9s %s\n' "$target" "${executions:-?}" "$(($(date +%s) - start))" "$result"
done
exit $status

#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET seconds each (default 60),
# starting from the committed seed corpus (fuzz/corpus/TARGET), and prints per target the
# number of executions. Exits non-zero when any target crashes; the crashing input is written
# to fuzz/artifacts/TARGET/ (replay it with `cargo fuzz run TARGET FILE` in fuzz/).
#
# Runs on the stable toolchain: cargo-fuzz passes -Z flags (-Zsanitizer=address), which
# RUSTC_BOOTSTRAP=1 lets a stable rustc accept. FUZZ_SANITIZER=none builds without
# AddressSanitizer (faster, finds panics but not memory errors in unsafe code).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: $0 [SECONDS_PER_TARGET]" >&2
  exit 2
}
(($# <= 1)) || usage
secs="${1:-60}"
[[ "$secs" =~ ^[0-9]+$ ]] && ((secs > 0)) || usage
sanitizer="${FUZZ_SANITIZER:-address}"

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

cd fuzz
mapfile -t targets < <(cargo fuzz list)
((${#targets[@]})) || {
  echo "no fuzz targets found in fuzz/" >&2
  exit 1
}

# One build for every target; the runs below start the built binaries directly, so every
# target fuzzes the same build and the time given is all fuzzing.
echo "building ${#targets[@]} targets (sanitizer: $sanitizer)"
build_start=$SECONDS
cargo fuzz build --sanitizer "$sanitizer"
echo "built in $((SECONDS - build_start)) s"
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="target/$host/release"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

# Runs work on a copy of the seed corpus, so the committed corpus does not grow.
runs=target/fuzz-run
rm -rf "$runs" target/scratch
mkdir -p "$runs"
failed=()
summary=()
for t in "${targets[@]}"; do
  work="$runs/$t"
  log="$runs/$t.log"
  mkdir -p "$work"
  if [[ -d "corpus/$t" ]]; then
    cp -R "corpus/$t/." "$work/"
  fi
  echo "fuzzing $t for $secs s (log: fuzz/$log)"
  start=$SECONDS
  status=ok
  mkdir -p "artifacts/$t"
  if ! "$bin_dir/$t" -artifact_prefix="artifacts/$t/" -max_total_time="$secs" -timeout=30 \
    -print_final_stats=1 "$work" >"$log" 2>&1; then
    status=CRASH
    failed+=("$t")
    grep -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)|Test unit written" "$log" | head -n 5 || true
  fi
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -n 1 | awk '{print $2}' || true)
  cov=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 | grep -o 'cov: [0-9]*' | awk '{print $2}' || true)
  summary+=("$(printf '%-14s %-6s %6s s %12s execs  cov %s' "$t" "$status" "$((SECONDS - start))" "${execs:-?}" "${cov:-?}")")
done

echo
echo "target         result   time   executions"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/, logs in fuzz/$runs/)" >&2
  exit 1
fi

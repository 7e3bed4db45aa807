#!/usr/bin/env bash
# Runs the benchmark suite on loopback (bounded: about 6 minutes with the defaults) and prints
# Markdown for BENCHMARKS.md. Arguments are passed to scripts/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --quiet
exec python3 scripts/bench.py "$@"

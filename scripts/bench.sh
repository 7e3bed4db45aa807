#!/usr/bin/env bash
# Runs the benchmark suite on loopback and prints Markdown for BENCHMARKS.md (bounded: about
# 6 minutes for the invoke proxy with the defaults, 2 for reaction times, 1 for datacenters).
#   scripts/bench.sh                 both
#   scripts/bench.sh invoke [ARGS]   the invoke proxy only (ARGS go to scripts/bench.py)
#   scripts/bench.sh reaction        reaction times only (scripts/bench_reaction.py)
#   scripts/bench.sh datacenters     fan-out and docker/swarm scale-up (needs dockerd in a swarm)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
[[ $# -gt 0 ]] && shift
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v python3 >/dev/null || missing+=(python3)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --quiet
case "$what" in
  invoke) exec python3 scripts/bench.py "$@" ;;
  reaction) exec python3 scripts/bench_reaction.py "$@" ;;
  datacenters) exec python3 scripts/bench_datacenters.py "$@" ;;
  all) python3 scripts/bench.py "$@" && python3 scripts/bench_reaction.py \
    && python3 scripts/bench_datacenters.py ;;
  *) echo "usage: scripts/bench.sh [all|invoke|reaction|datacenters] [ARGS]" >&2; exit 2 ;;
esac

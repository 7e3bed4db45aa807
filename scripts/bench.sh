#!/usr/bin/env bash
# The benchmark suite, on loopback with bounded loads. Each part writes target/bench-PART.json;
# the summary table (what, faastastic, baseline, ratio, target, pass) is printed at the end
# and written to target/bench-results.md and target/bench-results.json.
#   scripts/bench.sh              every part (about 10 minutes on 2 cores)
#   scripts/bench.sh smoke        every part with tiny loads (about a minute; CI runs it so the
#                                 suite cannot rot; its figures are not results)
#   scripts/bench.sh PART [ARGS]  one part: invoke | classic | reaction | state | datacenters | tls |
#                                 nats | ha | autoscale
#                                 (ARGS go to that part's script)
# The datacenters part needs dockerd in a swarm, as scripts/test.sh sets up.
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
command -v nats-server >/dev/null || missing+=(nats-server)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# Built before anything is timed. The bench target first: building it re-links the binary
# with the test-only dependencies' features, and the binary measured is the one users run.
if [[ $what == all || $what == smoke || $what == autoscale ]]; then
  cargo bench --no-run --quiet --bench autoscale
fi
cargo build --release --quiet
cargo build --release --quiet --example spawn_floor --example nats_load
mkdir -p target
started=$SECONDS

part() {
  local name="$1"
  shift
  case "$name" in
    invoke) python3 scripts/bench.py "$@" ;;
    classic) python3 scripts/bench_classic.py "$@" ;;
    reaction) python3 scripts/bench_reaction.py "$@" ;;
    state) python3 scripts/bench_state.py "$@" ;;
    datacenters) python3 scripts/bench_datacenters.py "$@" ;;
    tls) python3 scripts/bench_tls.py "$@" ;;
    nats) python3 scripts/bench_nats.py "$@" ;;
    ha) python3 scripts/bench_ha.py "$@" ;;
    autoscale) cargo bench --quiet --bench autoscale -- "$@" ;;
    *) echo "usage: scripts/bench.sh [all|smoke|invoke|classic|reaction|state|datacenters|tls|nats|ha|autoscale] [ARGS]" >&2
       exit 2 ;;
  esac
}

case "$what" in
  all)
    rm -f target/bench-{invoke,classic,reaction,state,datacenters,tls,nats,ha,autoscale}.json
    part invoke
    part classic
    part reaction
    part state
    part datacenters
    part tls
    part nats
    part ha
    part autoscale
    python3 scripts/bench_report.py
    echo "suite: $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s (after the build)"
    ;;
  smoke)
    rm -f target/bench-{invoke,classic,reaction,state,datacenters,tls,nats,ha,autoscale}.json
    part invoke --seconds 1 --rounds 1 --conns 1,16
    part classic --seconds 1 --rounds 1
    part reaction --query-only --timeout 30
    part state --functions 300 --alerts 100 --list-requests 5 --cold-rounds 2
    part datacenters --rounds 1
    part tls --seconds 1 --rounds 1 --conns 16
    part nats --messages 500 --seconds 1 --rounds 1 --burst 300
    part ha --payloads 6 --deploys 15 --failovers 1
    part autoscale --smoke
    python3 scripts/bench_report.py --require invoke,classic,reaction,state,datacenters,tls,nats,ha,autoscale
    ;;
  *) part "$what" "$@" ;;
esac

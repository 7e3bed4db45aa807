#!/usr/bin/env bash
# Installs what the tests need (Debian packages) and runs every check: formatting, clippy with
# warnings as errors, and the whole test suite (unit tests and black-box tests that start the
# real binary), then the benchmark suite's smoke run and a bounded fuzz run of every target
# (FUZZ_SECONDS per target, default 60; 0 leaves it out and says so).
set -euo pipefail
cd "$(dirname "$0")/.."

# program -> Debian package
declare -A needs=(
  [python3]=python3
  [curl]=curl
  [prometheus]=prometheus
  [promtool]=prometheus
  [prometheus-alertmanager]=prometheus-alertmanager
  [amtool]=prometheus-alertmanager
  [docker-compose]=docker-compose
  [dockerd]=docker.io
  [docker]=docker.io
  [busybox]=busybox-static
  [bwrap]=bubblewrap
  [openssl]=openssl
  [wrk]=wrk
  [nginx]=nginx-light
  [chromium]=chromium
  [chromedriver]=chromium-driver
  [nats-server]=nats-server
)
missing=()
for program in "${!needs[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("${needs[$program]}")
done
# PostgreSQL's server programs live off PATH, under /usr/lib/postgresql/<version>/bin.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d')
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The docker and swarm tests need a running engine: start one when none answers (root only).
if ! docker info >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "dockerd is not running and only root can start it here" >&2
    exit 1
  fi
  echo "starting dockerd"
  mkdir -p target
  nohup dockerd >target/dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see target/dockerd.log" >&2; exit 1; }
fi
# The swarm tests need a single-node swarm, on loopback only.
if [[ $(docker info --format '{{.Swarm.LocalNodeState}}') != active ]]; then
  docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 >/dev/null
fi

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
# Modules depend on each other one way only.
python3 scripts/check_cycles.py
cargo test --all-targets
# The benchmark suite with tiny loads, so that it cannot rot (its figures are not results).
./scripts/bench.sh smoke
fuzz_secs="${FUZZ_SECONDS:-60}"
if [[ "$fuzz_secs" == 0 ]]; then
  echo "FUZZ_SECONDS=0: the fuzz run is left out"
else
  ./scripts/fuzz.sh "$fuzz_secs"
fi

#!/usr/bin/env python3
"""NATS JetStream benchmark, in one run against a real nats-server (JetStream, a temporary
store, a free loopback port):

* messages per second through a subject into a no-op function (nginx answering 200 in http
  mode), from the first publication to the last acknowledgement by faastastic's consumer
  (examples/nats_load.rs), against HTTP invocations of the same function through faastastic
  with wrk at as many connections as messages may be in flight (`max_in_flight`), in
  interleaved rounds (medians; the ratio is the median of the rounds' ratios);
* the time from a burst of messages to 4 ready replicas of a function scaled on its backlog
  (`source = "nats"`, 50 messages per replica, read every 500 ms), the function taking 50 ms
  per message.
Usage: scripts/bench_nats.py [--messages 20000] [--seconds 4] [--rounds 3] [--burst 1000]
       [--json FILE]
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench import ROOT, free_port, nginx_function, serve_with, stop_all, wait_for, wrk
from benchrows import row, write

LOAD = os.path.join(ROOT, "target", "release", "examples", "nats_load")
IN_FLIGHT = 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-nats.json"))
    args = ap.parse_args()
    if not os.access(LOAD, os.X_OK):
        sys.exit(f"{LOAD} is missing: cargo build --release --example nats_load")
    if shutil.which("nats-server") is None:
        sys.exit("nats-server is missing: apt-get install -y nats-server")
    work = tempfile.mkdtemp(prefix="faastastic-bench-nats-")
    procs = []
    signal.signal(signal.SIGTERM, lambda *a: (stop_all(procs), sys.exit(1)))
    try:
        port = free_port()
        nats = subprocess.Popen(
            ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
             os.path.join(work, "nats")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(nats)
        url = f"nats://127.0.0.1:{port}"

        def nats_up():
            import socket
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        wait_for(nats_up, 20, "nats-server")
        config = f"""[proxy]
connection_threads = 1
[triggers.nats]
url = "{url}"
stream = "bench"
subjects = ["bench.>"]
max_in_flight = {IN_FLIGHT}
[autoscale]
tick_interval_ms = 250
[[autoscale.queries]]
name = "backlog"
source = "nats"
match = "burst.*"
target = 50
interval_ms = 500
"""
        function = nginx_function(work, annotations={"topic": "bench.noop"})
        server, base = serve_with(work, config, function, procs)
        burst = {"service": "burst", "image": "local/sleep",
                 "envProcess": "sh -c 'cat >/dev/null; sleep 0.05'",
                 "labels": {"com.openfaas.scale.max": "4"},
                 "annotations": {"topic": "bench.burst"}}
        urllib.request.urlopen(urllib.request.Request(
            base + "/system/functions", data=json.dumps(burst).encode(), method="POST",
            headers={"Content-Type": "application/json"}))

        def status(name):
            with urllib.request.urlopen(f"{base}/system/function/{name}") as r:
                return json.load(r)
        wait_for(lambda: status("burst").get("availableReplicas", 0) == 1, 30, "burst's replica")

        def load(subject, count, prefix):
            out = subprocess.run([LOAD, url, "bench", subject, str(count), prefix, "300"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"nats_load failed: {out.stderr.strip()}")
            return float(out.stdout.split()[0])

        # The consumers exist once faastastic has seen the functions.
        def consumers():
            out = subprocess.run([LOAD, url, "bench", "bench.noop", "1", "faastastic_bench_", "30"],
                                 capture_output=True, text=True)
            return out.returncode == 0
        wait_for(consumers, 30, "the no-op function's consumer")
        invoke = f"{base}/function/bench"
        wrk(invoke, IN_FLIGHT, 1)  # warm up
        load("bench.noop", 1000, "faastastic_bench_")
        results = {"nats": [], "http": []}
        for rnd in range(args.rounds):
            order = ["nats", "http"] if rnd % 2 == 0 else ["http", "nats"]
            for which in order:
                if which == "nats":
                    secs = load("bench.noop", args.messages, "faastastic_bench_")
                    rate = args.messages / secs
                else:
                    rate = wrk(invoke, IN_FLIGHT, args.seconds)["rps"]
                results[which].append(rate)
                print(f"round {rnd + 1} {which:<5} {rate:>9.0f} /s", flush=True)

        # A burst on the scaled function: time to 4 ready replicas.
        wait_for(lambda: subprocess.run(
            [LOAD, url, "bench", "bench.burst", "1", "faastastic_burst_", "30"],
            capture_output=True).returncode == 0, 30, "the burst function's consumer")
        wait_for(lambda: status("burst").get("availableReplicas", 0) == 1, 30, "burst at 1")
        started = time.monotonic()
        publisher = subprocess.Popen(
            [LOAD, url, "bench", "bench.burst", str(args.burst), "faastastic_burst_", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(publisher)
        wait_for(lambda: status("burst").get("availableReplicas", 0) >= 4, 60, "4 ready replicas")
        to_four = time.monotonic() - started
        drained = publisher.communicate(timeout=300)[0]
        print(f"burst of {args.burst}: 4 ready replicas after {to_four:.2f} s, drained after "
              f"{float(drained.split()[0]):.2f} s", flush=True)
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)

    nats_rate = statistics.median(results["nats"])
    http_rate = statistics.median(results["http"])
    ratio = statistics.median(a / b for a, b in zip(results["nats"], results["http"]))
    table = [
        row("nats", f"messages/s through a NATS JetStream subject into a no-op function "
            f"({args.messages:,} per round, {IN_FLIGHT} in flight, each acknowledged after its "
            f"2xx)", f"{nats_rate:,.0f}", f"HTTP invocations at {IN_FLIGHT} connections: "
            f"{http_rate:,.0f}", ratio),
        row("nats", f"burst of {args.burst:,} messages → 4 ready replicas (backlog policy, 50 "
            f"per replica, read every 500 ms; 50 ms per message)", f"{to_four:.2f} s"),
    ]
    write(args.json, table, nats=results["nats"], http=results["http"], to_four=to_four,
          rounds=args.rounds, messages=args.messages, burst=args.burst)


if __name__ == "__main__":
    main()

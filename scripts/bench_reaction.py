#!/usr/bin/env python3
"""Reaction-time benchmark: from load start to 2 and 4 ready replicas, for three functions
loaded side by side in one run against one real Prometheus and one real Alertmanager:

* query path: a `[[autoscale.queries]]` policy reading Prometheus every 500 ms
  (`irate` over the last two scrapes, target 5/s per replica);
* alert path, step mode: the shipped rule and Alertmanager config, OpenFaaS step mode
  (`com.faastastic.scale.alert-mode=step`, factor 25 % of max 4 = +1 per delivery);
* alert path, proportional: the same rule and config, sized from the alert's value;
* defaults, internal source: a policy that sets only `source = "internal"` and `target = 10`;
* defaults, Prometheus: a policy that sets only
  `sum by (function_name) (rate(gateway_function_invocation_total[1m]))` and `target = 10`
  (both: 10 s / 1 m windows read every 2 s, the 2 s short window every 500 ms, 5 s up
  cooldown).

Each function gets 40 invocations/s (8x the rule's threshold of 5/s; 4 replicas' worth at the
defaults' target of 10). Prometheus scrapes and
evaluates every second; everything else is as shipped (rules/faastastic.rules.yml,
rules/alertmanager.yml). Bounded: the load stops at 4 replicas or after --timeout seconds.
Usage: scripts/bench_reaction.py [--timeout 150] [--json FILE] [--query-only]
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from base64 import b64encode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BIN, ROOT, free_port, stop_all, wait_for  # noqa: E402
from benchrows import row, write  # noqa: E402

RATE = 40
FUNCTIONS = {
    "query-path": {"com.openfaas.scale.max": "4"},
    "alert-step": {"com.openfaas.scale.max": "4", "com.openfaas.scale.factor": "25",
                   "com.faastastic.scale.alert-mode": "step"},
    "alert-proportional": {"com.openfaas.scale.max": "4"},
    "defaults-internal": {"com.openfaas.scale.max": "4"},
    "defaults-prometheus": {"com.openfaas.scale.max": "4"},
}


def paced_load(port, name, stop, sent):
    """RATE requests/s on one keep-alive connection until `stop` is set."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    gap = 1.0 / RATE
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            conn.request("POST", f"/function/{name}", body=b"x")
            conn.getresponse().read()
            sent[name] = sent.get(name, 0) + 1
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        next_at += gap
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=int, default=150)
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-reaction.json"))
    ap.add_argument("--query-only", action="store_true",
                    help="only the query path (seconds, for the smoke run)")
    args = ap.parse_args()
    if args.query_only:
        for name in ("alert-step", "alert-proportional"):
            FUNCTIONS.pop(name)

    work = tempfile.mkdtemp(prefix="faastastic-reaction-")
    procs = []
    port, prom_port, am_port = free_port(), free_port(), free_port()
    data = os.path.join(work, "data")
    try:
        with open(os.path.join(work, "faastastic.toml"), "w") as f:
            f.write(f"""[autoscale]
tick_interval_ms = 250
[prometheus]
url = "http://127.0.0.1:{prom_port}"
[[autoscale.queries]]
name = "rps"
match = "query-path.*"
query = 'sum by (function_name) (irate(gateway_function_invocation_total[5s]))'
target = 5
interval_ms = 500
[[autoscale.queries]]
name = "defaults-internal"
match = "defaults-internal.*"
source = "internal"
target = 10
[[autoscale.queries]]
name = "defaults-prometheus"
match = "defaults-prometheus.*"
query = 'sum by (function_name) (rate(gateway_function_invocation_total[1m]))'
target = 10
""")
        server = subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
             "--config", os.path.join(work, "faastastic.toml")],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "serve.log"), "w"),
            env={**os.environ, "RUST_LOG": "warn"})
        procs.append(server)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(base + "/healthz").status == 200, 30, "faastastic")
        with open(os.path.join(data, "basic-auth-password")) as f:
            auth = "Basic " + b64encode(f"admin:{f.read().strip()}".encode()).decode()

        def api(method, path, body=None):
            req = urllib.request.Request(base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": auth,
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                text = r.read()
                return json.loads(text) if text.strip() else None

        for name, labels in FUNCTIONS.items():
            api("POST", "/system/functions", {"service": name, "image": "local/echo",
                                              "envProcess": "cat", "labels": labels})
        for name in FUNCTIONS:
            wait_for(lambda: api("GET", f"/system/function/{name}")["availableReplicas"] == 1,
                     30, name)

        # Alertmanager and Prometheus with the shipped rule and route.
        with open(os.path.join(ROOT, "rules", "alertmanager.yml")) as f:
            am = f.read().replace("http://127.0.0.1:8080/system/alert", base + "/system/alert") \
                .replace("/var/lib/faastastic/basic-auth-password",
                         os.path.join(data, "basic-auth-password"))
        with open(os.path.join(work, "alertmanager.yml"), "w") as f:
            f.write(am)
        with open(os.path.join(work, "prometheus.yml"), "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{ROOT}/rules/faastastic.rules.yml"]
alerting:
  alertmanagers:
  - static_configs:
    - targets: ["127.0.0.1:{am_port}"]
scrape_configs:
- job_name: faastastic
  static_configs:
  - targets: ["127.0.0.1:{port}"]
""")
        procs.append(subprocess.Popen(
            ["prometheus-alertmanager", f"--config.file={work}/alertmanager.yml",
             f"--storage.path={work}/am", f"--web.listen-address=127.0.0.1:{am_port}",
             "--cluster.listen-address="], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={work}/prometheus.yml",
             f"--storage.tsdb.path={work}/tsdb", f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in (am_port, prom_port):
            wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{p}/-/ready").status == 200,
                     30, f"port {p}")
        # Prometheus applies discovered targets a few seconds after start: wait for its first
        # scrape, then give it two more of the idle state.
        up_query = f"http://127.0.0.1:{prom_port}/api/v1/query?query=up%7Bjob%3D%22faastastic%22%7D"
        wait_for(lambda: json.load(urllib.request.urlopen(up_query))["data"]["result"], 60,
                 "Prometheus's first scrape")
        time.sleep(2)

        stop, sent = threading.Event(), {}
        started = time.monotonic()
        start_wall = time.time()
        threads = [threading.Thread(target=paced_load, args=(port, n, stop, sent), daemon=True)
                   for n in FUNCTIONS]
        for t in threads:
            t.start()
        reached = {n: {} for n in FUNCTIONS}
        while time.monotonic() - started < args.timeout:
            for name in FUNCTIONS:
                ready = api("GET", f"/system/function/{name}")["availableReplicas"]
                for want in (2, 4):
                    if ready >= want and want not in reached[name]:
                        reached[name][want] = time.monotonic() - started
                        print(f"{name}: {want} ready after {reached[name][want]:.1f} s", flush=True)
            if all(4 in r for r in reached.values()):
                break
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(timeout=15)
        elapsed = time.monotonic() - started

        rows = []
        for name in FUNCTIONS:
            events = api("GET", f"/system/scale-events?function={name}&limit=100") or []
            ups = [e for e in events if e["outcome"] == "scaled" and e["direction"] == "up"]
            ups.sort(key=lambda e: e["time"])

            def offset(e):
                t = e["time"].replace("Z", "+00:00")
                from datetime import datetime
                return datetime.fromisoformat(t).timestamp() - start_wall

            rows.append({
                "function": name, "to_2_s": reached[name].get(2), "to_4_s": reached[name].get(4),
                "decisions": len(ups),
                "first_decision_s": offset(ups[0]) if ups else None,
                "last_decision_s": offset(ups[-1]) if ups else None,
                "requests_per_s": sent.get(name, 0) / elapsed,
                "sources": sorted({e["source"] for e in ups}),
                "events": events,
            })
    finally:
        stop_all(procs, timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    def s(v):
        return "not reached" if v is None else f"{v:.1f} s"

    by = {r["function"]: r for r in rows}
    table = []
    q = by.get("query-path", {}).get("to_4_s")
    table.append(row("reaction", "query path: load start → 4 ready replicas", s(q), None, None,
                     "≤ 3 s", q is not None and q <= 3))
    for name, what in (("defaults-internal", "internal source"),
                       ("defaults-prometheus", "Prometheus rate()[1m]")):
        r = by[name]
        last, n = r["last_decision_s"], r["decisions"]
        ok = r["to_4_s"] is not None and last is not None and last <= 2 and n <= 2
        table.append(row("reaction", f"defaults, {what}: load start → last scale-up "
                         f"({n} decision(s); 4 ready at {s(r['to_4_s'])})", s(last),
                         None, None, "≤ 2 s, ≤ 2 decisions", ok))
    if "alert-proportional" in by:
        pr, st = by["alert-proportional"]["to_4_s"], by["alert-step"]["to_4_s"]
        table.append(row("reaction", "alert path, alert-sized: load start → 4 ready replicas "
                         f"({by['alert-proportional']['decisions']} decision(s))", s(pr),
                         f"step mode: {s(st)}", pr / st if pr and st else None, "≤ 40 s",
                         pr is not None and pr <= 40))
    write(args.json, table, rate_per_function=RATE, functions=rows)

    print()
    print("| path | load | → 2 ready | → 4 ready | scale-ups | first decision | last decision "
          "| replica start after last decision |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        start = None if r["to_4_s"] is None or r["last_decision_s"] is None \
            else r["to_4_s"] - r["last_decision_s"]
        print(f"| {r['function']} ({', '.join(r['sources'])}) | {r['requests_per_s']:.0f}/s "
              f"| {s(r['to_2_s'])} | {s(r['to_4_s'])} | {r['decisions']} "
              f"| {s(r['first_decision_s'])} | {s(r['last_decision_s'])} | {s(start)} |")
    print()
    for r in table:
        print(f"- {r['what']}: {r['faastastic']} (target {r['target']}): "
              f"{'pass' if r['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Scale of state and cold start, in one server with three local datacenters (stage, lon, syd).

Scale of state: --functions functions (10,000 by default), each placed in all three
datacenters at zero replicas (`com.faastastic.scale.initial=0`, so the local platform runs nothing
for them) and in shadow mode (decisions computed and recorded, nothing executed). Measured:
  * `GET /system/functions` latency over --list-requests sequential requests, against nginx
    serving the same bytes as a static file (the cost of moving the answer);
  * one evaluation cycle of an internal query policy over every function in every datacenter,
    from the server's own `faastastic_autoscaler_evaluation_duration_seconds` histogram;
  * one Alertmanager payload of --alerts firing alerts through `/system/alert` (each decided
    and recorded in all three datacenters);
  * the server's resident memory (VmRSS and its peak VmHWM) against the same server idle.
Cold start: a function scaled to zero, then invoked; the time to the first byte of the answer
(the request is held while the replica starts), against a warm invocation of the same function.
Bounded: every loop has a fixed count. Usage:
  scripts/bench_state.py [--functions 10000] [--list-requests 50] [--alerts 1000]
                         [--cold-rounds 10] [--json FILE]
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BIN, ROOT, free_port, stop_all, wait_for  # noqa: E402
from benchrows import ms, row, write  # noqa: E402

PART = "state"


def proc_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def request(conn, method, path, body=None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def deploy_all(port, names, threads=4):
    """Deploys `names` over `threads` keep-alive connections; returns the failures."""
    failures = []

    def worker(chunk):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for name in chunk:
            body = json.dumps({
                "service": name, "image": "local/cat", "envProcess": "cat",
                "labels": {"com.faastastic.scale.initial": "0", "com.openfaas.scale.max": "10",
                           "com.faastastic.scale.shadow": "true"},
            })
            status, text = request(conn, "POST", "/system/functions", body)
            if status != 202:
                failures.append((name, status, text[:200]))
        conn.close()

    chunks = [names[i::threads] for i in range(threads)]
    ts = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return failures


def timed_gets(port, path, count):
    """Sequential GETs on one keep-alive connection: (seconds each, last body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times, body = [], b""
    for _ in range(count):
        t0 = time.perf_counter()
        status, body = request(conn, "GET", path)
        times.append(time.perf_counter() - t0)
        if status != 200:
            sys.exit(f"GET {path}: {status}")
    conn.close()
    return times, body


def p99(values):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def histogram(metrics_text, name, loop):
    """(count, sum, [(le, cumulative count)]) of one loop's histogram."""
    count, total, buckets = 0, 0.0, []
    for line in metrics_text.splitlines():
        if f'loop="{loop}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "_count"):
            count = value
        elif line.startswith(name + "_sum"):
            total = value
        elif line.startswith(name + "_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    return count, total, sorted(buckets)


def alert_payload(names, round_no):
    alerts = [{
        "status": "firing",
        "labels": {"alertname": "FunctionHighInvocationRate", "function_name": name,
                   "service": "gateway", "severity": "major"},
        "annotations": {"value": "20", "target_per_replica": "5"},
        "startsAt": f"2026-01-01T00:{round_no:02d}:00Z", "endsAt": "0001-01-01T00:00:00Z",
        "fingerprint": f"{i:016x}",
    } for i, name in enumerate(names)]
    return json.dumps({
        "version": "4", "groupKey": "{}:{alertname=\"FunctionHighInvocationRate\"}",
        "status": "firing", "receiver": "scale-up", "groupLabels": {}, "commonLabels": {},
        "commonAnnotations": {}, "externalURL": "", "alerts": alerts})


def deploy_cold(base):
    """Deploys the function the cold start measures and waits for its replica."""
    body = json.dumps({"service": "cold", "image": "local/cat", "envProcess": "cat",
                       "constraints": ["datacenter==stage"]}).encode()
    urllib.request.urlopen(urllib.request.Request(
        base + "/system/functions", data=body, method="POST",
        headers={"Content-Type": "application/json"}))
    wait_for(lambda: cold_available(base) == 1, 30, "the cold function's replica")


def cold_available(base):
    with urllib.request.urlopen(base + "/system/function/cold") as r:
        return json.load(r).get("availableReplicas", 0)


def cold_round(port, base):
    """One round: the function scaled to zero, then the first byte of a held invocation and
    of a warm one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    status, _ = request(conn, "POST", "/system/scale-function/cold",
                        json.dumps({"serviceName": "cold", "replicas": 0}))
    if status not in (200, 202):
        sys.exit(f"scale to zero: {status}")
    wait_for(lambda: cold_available(base) == 0, 30, "zero replicas")
    time.sleep(0.2)  # let the stopped replica's process go
    out = []
    for _ in ("cold", "warm"):
        t0 = time.perf_counter()
        conn.request("POST", "/function/cold", body=b"x")
        resp = conn.getresponse()  # returns once the status line and headers are in
        first_byte = time.perf_counter() - t0
        payload = resp.read()
        if resp.status != 200 or payload != b"x":
            sys.exit(f"invoke: {resp.status} {payload[:100]!r}")
        out.append(first_byte)
    conn.close()
    return out


def start_server(work, name, config, port):
    """A server with `config` in work/name, its log there; returns the process."""
    home = os.path.join(work, name)
    os.makedirs(home)
    with open(os.path.join(home, "faastastic.toml"), "w") as f:
        f.write(config)
    server = subprocess.Popen(
        [BIN, "serve", "--no-auth", "--config", os.path.join(home, "faastastic.toml"),
         "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(home, "data")],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(home, "serve.log"), "w"),
        env={**os.environ, "RUST_LOG": "warn"})
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: urllib.request.urlopen(base + "/healthz").status == 200, 30, name)
    return server


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", type=int, default=10000)
    ap.add_argument("--list-requests", type=int, default=50)
    ap.add_argument("--alerts", type=int, default=1000)
    ap.add_argument("--cold-rounds", type=int, default=10)
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-state.json"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="faastastic-state-")
    procs = []
    rows, raw = [], {}
    try:
        port = free_port()
        server = start_server(work, "main", """placement = "all"
""" + "".join(f"""[[datacenters]]
name = "{dc}"
rate_per_sec = 1000000
""" for dc in ("stage", "lon", "syd")) + """[[autoscale.queries]]
name = "internal"
source = "internal"
target = 5
interval_ms = 1000
""", port)
        procs.append(server)
        base = f"http://127.0.0.1:{port}"
        idle_rss = proc_kib(server.pid, "VmRSS")

        def stage_rss(stage):
            """Records the server's RSS after a stage (raw rss_after_STAGE_kib), for printing."""
            kib = raw[f"rss_after_{stage}_kib"] = proc_kib(server.pid, "VmRSS")
            return f"(RSS {kib / 1024:.0f} MB)"

        # Cold start first, while the machine is quiet; beside it, in interleaved rounds, the
        # same on a server whose functions run as its own user (the cost of a user per
        # function and of the sandbox: the directory handed over, the user's switch, the
        # sandbox's namespaces and mounts; as root only).
        shared_port = free_port()
        isolating = os.geteuid() == 0
        if isolating:
            procs.append(start_server(work, "shared", """[[datacenters]]
name = "stage"
[local]
function_users = false
""", shared_port))
        shared_base = f"http://127.0.0.1:{shared_port}"
        deploy_cold(base)
        if isolating:
            deploy_cold(shared_base)
        cold, warm, shared_cold = [], [], []
        for _ in range(args.cold_rounds):
            c, w = cold_round(port, base)
            cold.append(c)
            warm.append(w)
            if isolating:
                shared_cold.append(cold_round(shared_port, shared_base)[0])
        raw["cold_start_s"], raw["warm_s"] = cold, warm
        cold_med, warm_med = statistics.median(cold), statistics.median(warm)
        rows.append(row(PART, "cold start: 0 → 1 on the local platform, first byte of the held "
                        f"request (median of {len(cold)}; max {ms(max(cold))})", ms(cold_med),
                        f"warm invocation {ms(warm_med)}", cold_med / warm_med, "< 50 ms",
                        cold_med < 0.050))
        print(f"cold start: median {ms(cold_med)}, max {ms(max(cold))}; warm {ms(warm_med)}",
              flush=True)
        if isolating:
            raw["cold_start_shared_user_s"] = shared_cold
            shared_med = statistics.median(shared_cold)
            rows.append(row(PART, "cold start with a user per function (in the bubblewrap "
                            "sandbox where it works), against the same with functions as the "
                            "server's user (local.function_users = false), interleaved rounds "
                            f"(median of {len(cold)})", ms(cold_med),
                            f"server's user {ms(shared_med)}", cold_med / shared_med,
                            "< 50 ms", cold_med < 0.050))
            print(f"cold start as the server's user: median {ms(shared_med)}", flush=True)
        request(http.client.HTTPConnection("127.0.0.1", port), "DELETE", "/system/functions",
                json.dumps({"functionName": "cold"}))

        names = [f"fn-{i:05d}" for i in range(args.functions)]
        t0 = time.perf_counter()
        failures = deploy_all(port, names)
        deploy_s = time.perf_counter() - t0
        if failures:
            sys.exit(f"{len(failures)} deploys failed, e.g. {failures[:3]}")
        raw["deploy_s"] = deploy_s
        print(f"deployed {len(names)} functions × 3 datacenters in {deploy_s:.1f} s "
              f"{stage_rss('deploy')}", flush=True)

        # The list, against nginx serving the same bytes.
        times, body = timed_gets(port, "/system/functions", args.list_requests)
        listed = json.loads(body)
        if len(listed) != len(names) or any(f.get("replicas", 0) != 0 for f in listed):
            sys.exit("the list does not show every function at zero replicas")
        static = os.path.join(work, "static")
        os.makedirs(static)
        os.chmod(work, 0o755)  # nginx's workers read the file as an unprivileged user
        with open(os.path.join(static, "functions.json"), "wb") as f:
            f.write(body)
        nginx_port = free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 64; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{nginx_port}; root {static}; }} }}
""")
        nginx = subprocess.Popen(["/usr/sbin/nginx", "-c", conf, "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(nginx)
        wait_for(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{nginx_port}/functions.json").status == 200, 10, "nginx")
        static_times, _ = timed_gets(nginx_port, "/functions.json", args.list_requests)
        raw["list_s"], raw["list_static_s"] = times, static_times
        rows.append(row(PART, f"`GET /system/functions` with {len(names):,} functions × 3 "
                        f"datacenters ({len(body) / 1e6:.1f} MB), p99 of {len(times)}",
                        ms(p99(times)), f"nginx, same bytes from a file: {ms(p99(static_times))}",
                        p99(times) / p99(static_times), "p99 < 50 ms", p99(times) < 0.050))
        print(f"list: p50 {ms(statistics.median(times))} p99 {ms(p99(times))}; "
              f"nginx p99 {ms(p99(static_times))} {stage_rss('list')}", flush=True)

        # Evaluation cycles of the internal query policy over every function.
        name = "faastastic_autoscaler_evaluation_duration_seconds"

        def cycles():
            with urllib.request.urlopen(base + "/metrics") as r:
                return histogram(r.read().decode(), name, "query:internal")
        start_count, start_sum, _ = cycles()
        wait_for(lambda: cycles()[0] >= start_count + 5, 60, "five evaluation cycles")
        count, total, buckets = cycles()
        mean = (total - start_sum) / (count - start_count)
        bound = next(le for le, c in buckets if c >= count)  # every cycle so far is ≤ this
        raw["cycle_mean_s"], raw["cycle_bucket_bound_s"] = mean, bound
        rows.append(row(PART, f"one evaluation cycle of a query policy over {len(names):,} × 3 "
                        f"(internal source, live server; every cycle ≤ {ms(bound)} bucket)",
                        f"mean {ms(mean)}", None, None, "< 50 ms", mean < 0.050))
        print(f"evaluation cycle: mean {ms(mean)}, all ≤ {ms(bound)} {stage_rss('cycles')}",
              flush=True)

        # One webhook payload of --alerts alerts, three rounds.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        payload_times = []
        for rnd in range(3):
            payload = alert_payload(names[:args.alerts], rnd)
            t0 = time.perf_counter()
            status, text = request(conn, "POST", "/system/alert", payload)
            payload_times.append(time.perf_counter() - t0)
            answer = json.loads(text)
            outcomes = {a["outcome"] for a in answer["alerts"]}
            if status != 200 or outcomes != {"dry_run"}:
                sys.exit(f"webhook: {status} {sorted(outcomes)}")
        raw["webhook_s"] = payload_times
        worst = max(payload_times)
        rows.append(row(PART, f"webhook: one payload of {args.alerts:,} alerts, each decided and "
                        "recorded in 3 datacenters (worst of 3)",
                        f"{worst:.2f} s ({worst / args.alerts * 1e6:.0f} µs per alert, "
                        f"{args.alerts / worst:,.0f} alerts/s)", None, None,
                        "< 1 ms per alert", worst / args.alerts < 0.001))
        print(f"webhook: {[f'{t:.2f}' for t in payload_times]} s per {args.alerts} alerts",
              flush=True)

        rss, peak = proc_kib(server.pid, "VmRSS"), proc_kib(server.pid, "VmHWM")
        raw["rss_kib"], raw["peak_kib"], raw["idle_rss_kib"] = rss, peak, idle_rss
        rows.append(row(PART, f"server memory with {len(names):,} functions × 3 datacenters "
                        f"after the above (peak {peak / 1024:.0f} MB)",
                        f"{rss / 1024:.0f} MB", f"idle server {idle_rss / 1024:.0f} MB",
                        rss / idle_rss, "RSS < 150 MB", peak < 150 * 1024))
        print(f"RSS {rss / 1024:.0f} MB (peak {peak / 1024:.0f} MB), idle {idle_rss / 1024:.0f} MB",
              flush=True)
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)
    write(args.json, rows, **raw)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()

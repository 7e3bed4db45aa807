#!/usr/bin/env python3
"""Invoke-proxy benchmark: wrk through faastastic's /function/NAME vs straight to the function's
own server vs nginx as a keep-alive reverse proxy to that server, interleaved rounds in one
run. The function is an http-mode replica on the local platform; faastastic reaches its server
without the watchdog (local.http_direct), so both proxies make the same one hop, and
faastastic's CPU per request counts the server and the replica's watchdog together.

Everything runs on loopback and stops by itself. Prints a Markdown table and writes JSON.
Usage: scripts/bench.py [--seconds 4] [--rounds 5] [--conns 1,16,64,256] [--threads 1]
                       [--json FILE]
Each round runs every target back to back at each concurrency, in the opposite order to the
round before (so neither proxy always runs first). The figures are medians over the rounds;
a ratio to nginx is the median of the rounds' ratios, each taken between runs seconds apart,
which keeps the machine's slower drifts out of the comparison. A second nginx, configured
as the first, is measured in the same rounds as a control: its ratio to the first is how far
two runs of one proxy differ here, the yardstick for faastastic's.
nginx runs one worker process (as in the reference baselines); faastastic likewise serves
client connections on one connection thread unless --threads says otherwise.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchrows import row as table_row, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "faastastic")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def stop_all(procs, timeout=10):
    """SIGTERM, newest first (nginx stops its workers, faastastic its replicas), then SIGKILL."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def watchdog_under(pid):
    """The replica watchdog started under process `pid` (directly, or in a sandbox whose
    processes are its descendants), or None."""
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")[:-1]
            except OSError:
                continue
            if len(argv) == 2 and argv[1] == b"watchdog":
                return child
            todo.append(child)
    return None


def wrk(url, conns, seconds, script=None):
    """wrk's figures for `url` (with a Lua `script` file, e.g. one that makes a POST)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
        + (["-s", script] if script else []) + [url],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]

    return {
        "rps": rps, "requests": requests, "p50_us": pct(50), "p99_us": pct(99),
        "non2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def nginx_function(work, **extra):
    """The function measured: nginx returning a fixed body, behind the watchdog in http mode
    (its deployment, with `extra` fields). Its configuration is a secret: a replica may run as
    a user of its own in a sandbox with a /tmp of its own, and reads it from its secrets; what
    it writes goes to its working directory. `serve_with` creates the secret."""
    port = free_port()
    conf = f"""worker_processes 1; pid backend.pid; error_log stderr;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  client_body_temp_path body; proxy_temp_path proxy; fastcgi_temp_path fastcgi;
  uwsgi_temp_path uwsgi; scgi_temp_path scgi;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello\\n"; }} }} }}
"""
    return {
        "service": "bench", "image": "local/nginx",
        "envProcess": "sh -c 'exec /usr/sbin/nginx -p . -e stderr "
                      "-c \"$secret_mount_path/bench-backend\" -g \"daemon off;\"'",
        "envVars": {"mode": "http", "upstream_url": f"http://127.0.0.1:{port}"},
        "secrets": ["bench-backend"],
        "_secret_values": {"bench-backend": conf},
        **extra,
    }


def serve_with(work, config_text, function, procs):
    """faastastic (auth off) with `config_text` on a free port, `function` deployed and its
    replica ready; the process (also added to `procs`) and its base URL."""
    port = free_port()
    config = os.path.join(work, "faastastic.toml")
    with open(config, "w") as f:
        f.write(config_text)
    server = subprocess.Popen(
        [BIN, "serve", "--no-auth", "--listen", f"127.0.0.1:{port}", "--data-dir",
         os.path.join(work, "data"), "--config", config],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "serve.log"), "w"),
        env={**os.environ, "RUST_LOG": "warn"})
    procs.append(server)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: urllib.request.urlopen(base + "/healthz").status == 200, 30, "faastastic")
    function = dict(function)
    for name, value in function.pop("_secret_values", {}).items():
        urllib.request.urlopen(urllib.request.Request(
            base + "/system/secrets", data=json.dumps({"name": name, "value": value}).encode(),
            method="POST", headers={"Content-Type": "application/json"}))
    urllib.request.urlopen(urllib.request.Request(
        base + "/system/functions", data=json.dumps(function).encode(), method="POST",
        headers={"Content-Type": "application/json"}))

    def ready():
        with urllib.request.urlopen(f"{base}/system/function/{function['service']}") as r:
            return json.load(r).get("availableReplicas", 0) == 1
    wait_for(ready, 30, "the function's replica")
    return server, base


def interleaved(targets, conns_list, rounds, seconds):
    """wrk against every target (name: (url, pids to count CPU of, or None)) at each
    concurrency, for `rounds` rounds in alternating order after a warm-up; every run's figures
    per concurrency and target, with the CPU per request of the pids given."""
    for url, _ in targets.values():  # warm up pools
        wrk(url, 16, 1)
    results = {c: {t: [] for t in targets} for c in conns_list}
    for rnd in range(rounds):
        order = list(targets.items())
        if rnd % 2:
            order.reverse()
        for conns in conns_list:
            for name, (url, pids) in order:
                before = cpu_seconds(pids) if pids else 0
                r = wrk(url, conns, seconds)
                if pids:
                    r["cpu_us_per_req"] = (cpu_seconds(pids) - before) / r["requests"] * 1e6
                results[conns][name].append(r)
                print(f"round {rnd + 1} c={conns:<3} {name:<10} {r['rps']:>10.0f} req/s "
                      f"p50 {r['p50_us']:>7.0f} us p99 {r['p99_us']:>7.0f} us "
                      f"{'cpu/req %.1f us' % r['cpu_us_per_req'] if 'cpu_us_per_req' in r else ''}",
                      flush=True)
    return results


def us(v):
    return "–" if v is None else (f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", default="1,16,64,256")
    ap.add_argument("--threads", type=int, default=1,
                    help="faastastic's proxy.connection_threads (nginx: worker_processes 1)")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-invoke.json"))
    args = ap.parse_args()
    conns_list = [int(c) for c in args.conns.split(",")]

    work = tempfile.mkdtemp(prefix="faastastic-bench-")
    procs = []

    def cleanup(*_):
        stop_all(procs)

    signal.signal(signal.SIGTERM, lambda *a: (cleanup(), sys.exit(1)))
    try:
        # The function: nginx returning a fixed body, behind the watchdog in http mode.
        backend = nginx_function(work)
        server, base = serve_with(work, f"[proxy]\nconnection_threads = {args.threads}\n",
                                  backend, procs)
        replicas = children(server.pid)
        if len(replicas) != 1:
            sys.exit(f"expected one replica process, found {replicas}")
        watchdog = watchdog_under(server.pid)
        if watchdog is None:
            sys.exit("no replica watchdog found under the server")
        # The function's own server: faastastic reaches it without the watchdog
        # (local.http_direct), and so does nginx here.
        replica_port = int(backend["envVars"]["upstream_url"].rsplit(":", 1)[1])

        # nginx as a reverse proxy to the same replica (settings as in the reference baselines),
        # twice: the second, identical one is the control that shows how far two runs of the
        # same proxy differ on this machine in this run.
        def start_nginx(label):
            listen = free_port()
            conf = os.path.join(work, f"{label}.conf")
            with open(conf, "w") as f:
                f.write(f"""worker_processes 1; pid {work}/{label}.pid; error_log {work}/{label}.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream replica {{ server 127.0.0.1:{replica_port}; keepalive 64; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{listen};
    location / {{ proxy_http_version 1.1; proxy_set_header Connection ""; proxy_pass http://replica; }} }} }}
""")
            proc = subprocess.Popen(["/usr/sbin/nginx", "-c", conf, "-g", "daemon off;"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{listen}/").status == 200,
                     10, label)
            return f"http://127.0.0.1:{listen}/", [proc.pid] + children(proc.pid)

        targets = {
            "direct": (f"http://127.0.0.1:{replica_port}/", None),
            "nginx": start_nginx("nginx"),
            "faastastic": (f"{base}/function/bench", [server.pid, watchdog]),
            "nginx-control": start_nginx("nginx-control"),
        }
        results = interleaved(targets, conns_list, args.rounds, args.seconds)
    finally:
        cleanup()
        shutil.rmtree(work, ignore_errors=True)

    def med(rows, key):
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else None

    summary = []
    for conns in conns_list:
        row = {"conns": conns}
        for name in targets:
            rows = results[conns][name]
            row[name] = {k: med(rows, k) for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req")}
            row[name]["non2xx"] = sum(r["non2xx"] for r in rows)
        summary.append(row)
    def paired(conns, key, of="faastastic"):
        """The median over rounds of a proxy's figure ÷ nginx's in the same round."""
        pairs = zip(results[conns][of], results[conns]["nginx"])
        return statistics.median(a[key] / b[key] for a, b in pairs)

    table = []
    for r in summary:
        f, n, d = r["faastastic"], r["nginx"], r["direct"]
        c = r["conns"]
        r["paired"] = {k: paired(c, k) for k in ("rps", "cpu_us_per_req")}
        r["control_paired"] = {k: paired(c, k, "nginx-control")
                               for k in ("rps", "cpu_us_per_req")}
        rps, cpu = r["paired"]["rps"], r["paired"]["cpu_us_per_req"]
        control = r["control_paired"]
        table.append(table_row("invoke", f"invoke proxy, {c} connections: req/s (÷ direct "
                         f"{f['rps'] / d['rps']:.2f}; control nginx ÷ nginx {control['rps']:.2f})",
                         f"{f['rps']:,.0f}",
                         f"nginx {n['rps']:,.0f}", rps, "≥ nginx (≥ 1.00)", rps >= 1.0))
        table.append(table_row("invoke", f"invoke proxy, {c} connections: p99 (control nginx "
                         f"{us(r['nginx-control']['p99_us'])})", us(f["p99_us"]),
                         f"nginx {us(n['p99_us'])}", f["p99_us"] / n["p99_us"],
                         "≤ nginx + 1 ms", f["p99_us"] <= n["p99_us"] + 1000))
        table.append(table_row("invoke", f"invoke proxy, {c} connections: proxy CPU per request "
                         f"(control nginx ÷ nginx {control['cpu_us_per_req']:.2f})",
                         us(f["cpu_us_per_req"]), f"nginx {us(n['cpu_us_per_req'])}",
                         cpu, "≤ nginx", cpu <= 1.0))
    write(args.json, table, seconds=args.seconds, rounds=args.rounds, threads=args.threads,
          summary=summary,
          raw=results)

    print()
    print("| conns | case | req/s | ÷ direct | ÷ nginx | p50 | p99 | proxy CPU per request | "
          "÷ nginx | non-2xx |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in summary:
        d, n = row["direct"], row["nginx"]
        for name in targets:
            c = row[name]
            cpu = "–" if c["cpu_us_per_req"] is None else f"{c['cpu_us_per_req']:.1f} µs"
            if name in ("faastastic", "nginx-control"):  # paired per round, as judged
                ratios = row["paired" if name == "faastastic" else "control_paired"]
                rps_ratio, cpu_ratio = ratios["rps"], ratios["cpu_us_per_req"]
            else:
                rps_ratio = c["rps"] / n["rps"]
                cpu_ratio = None if c["cpu_us_per_req"] is None else 1.0
            cpu_ratio = "–" if cpu_ratio is None else f"{cpu_ratio:.2f}"
            print(f"| {row['conns']} | {name} | {c['rps']:,.0f} | {c['rps'] / d['rps']:.2f} | "
                  f"{rps_ratio:.2f} | {us(c['p50_us'])} | {us(c['p99_us'])} | {cpu} | "
                  f"{cpu_ratio} | {c['non2xx']} |")
    print()
    print("Figures are medians over the rounds; the ratios of faastastic and of the control "
          "nginx to nginx are the medians of the rounds' ratios.")


if __name__ == "__main__":
    main()

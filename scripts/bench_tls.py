#!/usr/bin/env python3
"""Invocations to a TLS datacenter: wrk through faastastic's /function/NAME, whose datacenter
`far` is a `faastastic agent` serving TLS (a private CA made here with openssl), vs nginx as a
keep-alive reverse proxy to the same agent over TLS (session reuse, the same CA and server
name, the agent's token), interleaved rounds in one run. The function is nginx returning a
fixed body behind the watchdog in http mode, on the agent's local platform.

Everything runs on loopback and stops by itself. Prints a Markdown table and writes JSON.
Usage: scripts/bench_tls.py [--seconds 4] [--rounds 5] [--conns 16,64] [--json FILE]
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request

from bench import (BIN, ROOT, children, free_port, interleaved, nginx_function, serve_with,
                   stop_all, wait_for)
from benchrows import row as table_row, write

TOKEN = "bench-token"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def certificates(work):
    """A CA and a certificate for agent.test and 127.0.0.1 signed by it (P-256)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca-key.pem", "-out", "ca.pem", "-subj", "/CN=bench-ca", "-days", "2",
            cwd=work)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "agent-key.pem", "-out", "agent.csr", "-subj", "/CN=agent.test", cwd=work)
    with open(os.path.join(work, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:agent.test,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "agent.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "agent.pem", "-days", "2", "-extfile", "san.ext", cwd=work)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", default="16,64")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-tls.json"))
    args = ap.parse_args()
    conns_list = [int(c) for c in args.conns.split(",")]

    work = tempfile.mkdtemp(prefix="faastastic-tls-bench-")
    procs = []
    signal.signal(signal.SIGTERM, lambda *a: (stop_all(procs), sys.exit(1)))
    try:
        certificates(work)
        token = os.path.join(work, "token")
        with open(token, "w") as f:
            f.write(TOKEN)
        agent_port = free_port()
        agent = subprocess.Popen(
            [BIN, "agent", "--datacenter", "far", "--listen", f"127.0.0.1:{agent_port}",
             "--token-file", token, "--data-dir", os.path.join(work, "agent"),
             "--tls-cert", os.path.join(work, "agent.pem"),
             "--tls-key", os.path.join(work, "agent-key.pem")],
            stdout=subprocess.PIPE, stderr=open(os.path.join(work, "agent.log"), "w"),
            env={**os.environ, "RUST_LOG": "warn"})
        procs.append(agent)
        if "listening on https://" not in agent.stdout.readline().decode():
            sys.exit("the agent did not start")

        backend = nginx_function(work, constraints=["datacenter==far"])
        server, base = serve_with(work, f"""[proxy]
connection_threads = 1
[[datacenters]]
name = "home"
home = true
[[datacenters]]
name = "far"
platform = "remote"
url = "https://127.0.0.1:{agent_port}"
token_file = "{token}"
ca_file = "{work}/ca.pem"
server_name = "agent.test"
""", backend, procs)

        listen = free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream agent {{ server 127.0.0.1:{agent_port}; keepalive 64; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{listen};
    location / {{ proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Faastastic-Agent-Token {TOKEN};
      proxy_ssl_trusted_certificate {work}/ca.pem; proxy_ssl_verify on;
      proxy_ssl_name agent.test; proxy_ssl_server_name on; proxy_ssl_session_reuse on;
      proxy_pass https://agent/function/bench.openfaas-fn/; }} }} }}
""")
        nginx = subprocess.Popen(["/usr/sbin/nginx", "-c", conf, "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(nginx)
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{listen}/").status == 200,
                 10, "nginx")
        targets = {
            "nginx": (f"http://127.0.0.1:{listen}/", [nginx.pid] + children(nginx.pid)),
            "faastastic": (f"{base}/function/bench", [server.pid]),
        }
        results = interleaved(targets, conns_list, args.rounds, args.seconds)
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)

    def paired(conns, key):
        pairs = zip(results[conns]["faastastic"], results[conns]["nginx"])
        return statistics.median(f[key] / n[key] for f, n in pairs)

    def med(conns, name, key):
        return statistics.median(r[key] for r in results[conns][name])

    table = []
    print()
    print("| conns | faastastic req/s | nginx req/s | ÷ nginx | p99 faastastic / nginx | "
          "CPU per request faastastic / nginx | ÷ nginx | non-2xx |")
    print("|---|---|---|---|---|---|---|---|")
    for c in conns_list:
        rps, cpu = paired(c, "rps"), paired(c, "cpu_us_per_req")
        fr, nr = med(c, "faastastic", "rps"), med(c, "nginx", "rps")
        fp, np_ = med(c, "faastastic", "p99_us"), med(c, "nginx", "p99_us")
        fc, nc = med(c, "faastastic", "cpu_us_per_req"), med(c, "nginx", "cpu_us_per_req")
        bad = sum(r["non2xx"] for t in targets for r in results[c][t])
        print(f"| {c} | {fr:,.0f} | {nr:,.0f} | {rps:.2f} | {fp / 1000:.2f} / {np_ / 1000:.2f} ms "
              f"| {fc:.0f} / {nc:.0f} µs | {cpu:.2f} | {bad} |")
        table.append(table_row("tls", f"invocation to a TLS datacenter, {c} connections: req/s",
                               f"{fr:,.0f}", f"nginx over TLS {nr:,.0f}", rps,
                               "≥ nginx (≥ 1.00)", rps >= 1.0))
        table.append(table_row("tls", f"invocation to a TLS datacenter, {c} connections: proxy "
                               "CPU per request", f"{fc:.0f} µs", f"nginx {nc:.0f} µs", cpu,
                               "≤ nginx", cpu <= 1.0))
    write(args.json, table, results={str(c): results[c] for c in conns_list})


if __name__ == "__main__":
    main()

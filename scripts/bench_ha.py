#!/usr/bin/env python3
"""High availability benchmark, in one run: three faastastic instances on one PostgreSQL
database (Debian's, initdb into a temporary directory, a free loopback port, run as the
`postgres` user) against one instance on its SQLite file, both with the same `remote`
datacenter (a faastastic agent):

* webhook throughput: Alertmanager payloads of 50 firing alerts each, for functions already
  at their max (so every alert is decided and recorded, and no platform is called), sent with
  4 connections: round robin over the three instances, or all to the one;
* deploy throughput: new functions (initial replicas 0, so no replica starts) deployed with 4
  connections, round robin or to the one;
* failover: `kill -9` of the leader to the first pass of the new leader's ticker (its first
  chance to decide), in rounds (the killed instance is started again between them).
Usage: scripts/bench_ha.py [--payloads 200] [--deploys 300] [--failovers 3] [--json FILE]
"""
import argparse
import concurrent.futures
import datetime
import glob
import itertools
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench import BIN, ROOT, free_port, stop_all, wait_for
from benchrows import row, write

CONNS = 4
ALERTS_PER_PAYLOAD = 50
FUNCTIONS = 50


def pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        sys.exit("PostgreSQL is missing: apt-get install -y postgresql")
    return os.path.dirname(found[-1])


def start_postgres(work, procs):
    """A fresh cluster with trust authentication on loopback; its URL."""
    bindir = pg_bin()
    data = os.path.join(work, "pg")
    os.makedirs(data)
    user = None
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(work, pw.pw_uid, pw.pw_gid)
        os.chown(data, pw.pw_uid, pw.pw_gid)
        user = "postgres"
    subprocess.run([os.path.join(bindir, "initdb"), "--no-sync", "-U", "postgres",
                    "--auth=trust", "-D", data], check=True, user=user,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    pg = subprocess.Popen([os.path.join(bindir, "postgres"), "-D", data, "-p", str(port),
                           "-c", "listen_addresses=127.0.0.1", "-c",
                           f"unix_socket_directories={work}", "-c", "max_connections=200"],
                          user=user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(pg)
    wait_for(lambda: subprocess.run([os.path.join(bindir, "pg_isready"), "-h", "127.0.0.1",
                                     "-p", str(port)], capture_output=True).returncode == 0,
             30, "PostgreSQL")
    return f"postgres://postgres@127.0.0.1:{port}/postgres"


def start_agent(work, procs):
    port = free_port()
    token = os.path.join(work, "token")
    with open(token, "w") as f:
        f.write("bench-agent-token")
    agent = subprocess.Popen([BIN, "agent", "--datacenter", "lon", "--listen",
                              f"127.0.0.1:{port}", "--token-file", token, "--data-dir",
                              os.path.join(work, "agent")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(agent)
    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200,
             30, "the agent")
    return (f"[[datacenters]]\nname = \"lon\"\nplatform = \"remote\"\n"
            f"url = \"http://127.0.0.1:{port}\"\ntoken_file = \"{token}\"\n")


class Instance:
    def __init__(self, work, name, config, procs):
        self.work, self.name, self.config, self.procs = work, name, config, procs
        self.start()

    def start(self):
        self.port = free_port()
        path = os.path.join(self.work, f"{self.name}.toml")
        with open(path, "w") as f:
            f.write(self.config)
        self.proc = subprocess.Popen(
            [BIN, "serve", "--no-auth", "--listen", f"127.0.0.1:{self.port}", "--data-dir",
             os.path.join(self.work, self.name), "--config", path],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.work, f"{self.name}.log"), "a"),
            env={**os.environ, "RUST_LOG": "warn"})
        self.procs.append(self.proc)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: urllib.request.urlopen(self.base + "/healthz").status == 200, 30,
                 f"instance {self.name}")

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.load(r)

    def post(self, path, body):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status

    def leads(self):
        try:
            return self.get("/system/overview")["instance"]["leader"]
        except Exception:
            return False


def functions(instance):
    for i in range(FUNCTIONS):
        instance.post("/system/functions", {
            "service": f"hot-{i}", "image": "local/echo", "envProcess": "cat",
            "labels": {"com.openfaas.scale.min": "0", "com.openfaas.scale.max": "1",
                       "com.faastastic.scale.initial": "0"}})


def payload(n):
    return {"version": "4", "status": "firing", "receiver": "faastastic", "alerts": [
        {"status": "firing", "fingerprint": f"{n:08x}{i:04x}",
         "startsAt": "2026-01-01T00:00:00Z",
         "labels": {"alertname": "APIHighInvocationRate",
                    "function_name": f"hot-{(n * ALERTS_PER_PAYLOAD + i) % FUNCTIONS}"}}
        for i in range(ALERTS_PER_PAYLOAD)]}


def timed(instances, count, make, path):
    """Sends `count` bodies round robin over `instances` with CONNS connections; per second."""
    targets = itertools.cycle(instances)
    jobs = [(next(targets), make(n)) for n in range(count)]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CONNS) as pool:
        codes = list(pool.map(lambda job: job[0].post(path, job[1]), jobs))
    took = time.monotonic() - started
    bad = [c for c in codes if c >= 300]
    if bad:
        sys.exit(f"{len(bad)} requests to {path} failed")
    return count / took


def deploy(prefix):
    def make(n):
        return {"service": f"{prefix}-{n}", "image": "local/echo", "envProcess": "cat",
                "labels": {"com.faastastic.scale.initial": "0"}}
    return make


def ticker_pass(instance):
    """When the instance's ticker last finished a pass (Unix seconds), or None."""
    try:
        for loop in instance.get("/system/overview")["loops"]:
            if loop["name"] == "ticker":
                at = loop["lastEvaluation"].replace("Z", "+00:00")
                return datetime.datetime.fromisoformat(at).timestamp()
    except Exception:
        pass
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--payloads", type=int, default=200)
    ap.add_argument("--deploys", type=int, default=300)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-ha.json"))
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="faastastic-bench-ha-")
    procs = []
    signal.signal(signal.SIGTERM, lambda *a: (stop_all(procs), sys.exit(1)))
    try:
        url = start_postgres(work, procs)
        datacenter = start_agent(work, procs)
        # The tick every 100 ms, so that a new leader's first pass is seen when it happens.
        common = "[autoscale]\ntick_interval_ms = 100\n" + datacenter
        shared = f"[store]\nurl = \"{url}\"\n" + common
        cluster = [Instance(work, n, shared, procs) for n in ("a", "b", "c")]
        single = [Instance(work, "single", common, procs)]
        functions(cluster[0])
        functions(single[0])
        wait_for(lambda: all(len(i.get("/system/functions")) == FUNCTIONS for i in cluster),
                 10, "the functions on every instance")
        results = {"webhook": {"cluster": [], "single": []},
                   "deploy": {"cluster": [], "single": []}, "failover": []}
        rounds = 3
        for rnd in range(rounds):
            order = [("cluster", cluster), ("single", single)]
            if rnd % 2:
                order.reverse()
            for name, instances in order:
                rate = timed(instances, args.payloads // rounds,
                             lambda n, r=rnd: payload(r * 100000 + n), "/system/alert")
                results["webhook"][name].append(rate * ALERTS_PER_PAYLOAD)
                rate = timed(instances, args.deploys // rounds, deploy(f"d{rnd}"),
                             "/system/functions")
                results["deploy"][name].append(rate)
                print(f"round {rnd + 1} {name:<7} webhook {results['webhook'][name][-1]:>7.0f}"
                      f" alerts/s  deploy {rate:>6.0f}/s", flush=True)

        for rnd in range(args.failovers):
            wait_for(lambda: sum(i.leads() for i in cluster) == 1, 30, "one leader")
            leader = next(i for i in cluster if i.leads())
            rest = [i for i in cluster if i is not leader]
            leader.proc.send_signal(signal.SIGKILL)
            leader.proc.wait()
            killed = time.time()
            first = None
            while time.time() - killed < 15 and first is None:
                for i in rest:
                    at = ticker_pass(i)
                    if i.leads() and at is not None and at > killed:
                        first = at - killed
                        break
                time.sleep(0.02)
            if first is None:
                sys.exit("no new leader's tick within 15 s of the leader's death")
            results["failover"].append(first)
            print(f"failover {rnd + 1}: the new leader's first tick {first:.2f} s after kill -9",
                  flush=True)
            leader.start()
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)

    def ratio(kind):
        return statistics.median(a / b for a, b in zip(results[kind]["cluster"],
                                                       results[kind]["single"]))
    med = {k: {n: statistics.median(v) for n, v in results[k].items()}
           for k in ("webhook", "deploy")}
    table = [
        row("ha", f"webhook: alerts decided and recorded per second, {ALERTS_PER_PAYLOAD} a "
            f"payload, {CONNS} connections round robin over 3 instances on PostgreSQL",
            f"{med['webhook']['cluster']:,.0f}/s",
            f"one instance on SQLite: {med['webhook']['single']:,.0f}/s", ratio("webhook")),
        row("ha", f"deploys per second, {CONNS} connections round robin over 3 instances on "
            f"PostgreSQL (no replica started)", f"{med['deploy']['cluster']:,.0f}/s",
            f"one instance on SQLite: {med['deploy']['single']:,.0f}/s", ratio("deploy")),
        row("ha", "failover: kill -9 of the leader → the new leader's first tick (lease 2 s; "
            f"median of {len(results['failover'])})",
            f"{statistics.median(results['failover']):.2f} s", None, None, "≤ 3 s",
            statistics.median(results["failover"]) <= 3.0),
    ]
    write(args.json, table, **results)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Datacenter benchmark, one run:

* fan-out: one function in three datacenters (stage local; lon and syd as agents behind relays
  that add 20 ms and 60 ms to every read, as a WAN would); the time of a scale across all
  three vs a scale of the slowest alone (syd). Target: within 10 %.
* docker and swarm: time from a scale request 1 -> 4 to 4 ready replicas (rounds, median),
  for an image running faastastic's watchdog and for one built as OpenFaaS templates build
  them (serves on 8080 whatever it is told, binds 8081 too).

Needs a running dockerd in a swarm (scripts/test.sh sets both up) and busybox-static.
Usage: scripts/bench_datacenters.py [--rounds 10] [--json FILE]
"""
import argparse
import asyncio
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
from benchrows import row, write  # noqa: E402


def relay(listen_port, target_port, delay_s):
    """A TCP relay on loopback that holds every chunk `delay_s` before passing it on."""
    async def pipe(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await asyncio.sleep(delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()


# What an image from the OpenFaaS templates does (as tests/common/docker.rs builds it).
STOCK_ENTRYPOINT = """#!/bin/sh
httpd -p 8081 -h /www || exit 2
exec env faastastic_listen=0.0.0.0:8080 port=8080 /faastastic watchdog
"""


def build_image(tag, work, stock=False):
    root = os.path.join(work, "rootfs-stock" if stock else "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "tmp"))
    shutil.copy(BIN, os.path.join(root, "faastastic"))
    for word in subprocess.run(["ldd", BIN], capture_output=True, text=True).stdout.split():
        if word.startswith("/"):
            target = os.path.join(root, word.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(word, target)
    shutil.copy(shutil.which("busybox"), os.path.join(root, "bin", "busybox"))
    for applet in ("sh", "cat", "env", "httpd"):
        os.symlink("busybox", os.path.join(root, "bin", applet))
    entrypoint = '["/faastastic", "watchdog"]'
    if stock:
        os.makedirs(os.path.join(root, "www"))
        with open(os.path.join(root, "www", "index.html"), "w") as f:
            f.write("metrics\n")
        with open(os.path.join(root, "entrypoint.sh"), "w") as f:
            f.write(STOCK_ENTRYPOINT)
        os.chmod(os.path.join(root, "entrypoint.sh"), 0o755)
        entrypoint = '["/entrypoint.sh"]'
    tar = root + ".tar"
    subprocess.run(["tar", "-C", root, "-cf", tar, "."], check=True)
    subprocess.run(["docker", "import", "--change", f"ENTRYPOINT {entrypoint}", tar, tag],
                   check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-datacenters.json"))
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="faastastic-dc-bench-")
    token = os.path.join(work, "token")
    with open(token, "w") as f:
        f.write("bench-token")
    procs = []
    tag = f"faastastic-bench/echo:{os.getpid()}"
    stock_tag = f"faastastic-bench/stock:{os.getpid()}"
    suffix = str(os.getpid())
    try:
        build_image(tag, work)
        build_image(stock_tag, work, stock=True)
        agents = {}
        for dc, delay in (("lon", 0.020), ("syd", 0.060)):
            port, front = free_port(), free_port()
            procs.append(subprocess.Popen(
                [BIN, "agent", "--datacenter", dc, "--listen", f"127.0.0.1:{port}",
                 "--token-file", token, "--data-dir", os.path.join(work, dc)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200,
                     30, f"agent {dc}")
            relay(front, port, delay)
            agents[dc] = front
        port = free_port()
        with open(os.path.join(work, "faastastic.toml"), "w") as f:
            f.write(f"""[[datacenters]]
name = "stage"
[[datacenters]]
name = "lon"
platform = "remote"
url = "http://127.0.0.1:{agents['lon']}"
token_file = "{token}"
[[datacenters]]
name = "syd"
platform = "remote"
url = "http://127.0.0.1:{agents['syd']}"
token_file = "{token}"
[[datacenters]]
name = "dock{suffix}"
platform = "docker"
pull = false
[[datacenters]]
name = "swarm{suffix}"
platform = "swarm"
""")
        server = subprocess.Popen(
            [BIN, "serve", "--no-auth", "--listen", f"127.0.0.1:{port}", "--data-dir",
             os.path.join(work, "data"), "--config", os.path.join(work, "faastastic.toml")],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "serve.log"), "w"),
            env={**os.environ, "RUST_LOG": "warn"})
        procs.append(server)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: urllib.request.urlopen(base + "/healthz").status == 200, 30, "faastastic")

        def api(method, path, body=None):
            req = urllib.request.Request(base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                text = r.read()
                return json.loads(text) if text.strip() else None

        def status(name):
            return api("GET", f"/system/function/{name}")

        placements = {"spread": ["stage", "lon", "syd"], "docker": [f"dock{suffix}"],
                      "swarm": [f"swarm{suffix}"], "docker-stock": [f"dock{suffix}"],
                      "swarm-stock": [f"swarm{suffix}"]}
        for name, dcs in placements.items():
            api("POST", "/system/functions", {
                "service": name, "image": stock_tag if name.endswith("-stock") else tag,
                "envProcess": "cat", "constraints": [f"datacenter=={dc}" for dc in dcs]})
        for name, dcs in placements.items():
            wait_for(lambda: status(name)["availableReplicas"] == len(dcs), 120, name)

        def timed_scale(body):
            started = time.perf_counter()
            api("POST", "/system/scale-function/spread", body)
            return time.perf_counter() - started

        # Each round changes every datacenter in the fan-out, then syd alone (measured) and
        # back (not measured), so the next fan-out changes all three again.
        fan, single = [], []
        for i in range(args.rounds):
            a, b = (2, 1) if i % 2 == 0 else (1, 2)
            fan.append(timed_scale({"serviceName": "spread", "replicas": 3 * a}))
            single.append(timed_scale({"serviceName": "spread", "datacenter": "syd",
                                       "replicas": b}))
            timed_scale({"serviceName": "spread", "datacenter": "syd", "replicas": a})

        to_four = {}
        for name in ("docker", "swarm", "docker-stock", "swarm-stock"):
            times = []
            for _ in range(min(3, args.rounds)):
                started = time.perf_counter()
                api("POST", f"/system/scale-function/{name}", {"serviceName": name, "replicas": 4})
                wait_for(lambda: status(name)["availableReplicas"] == 4, 120, f"{name} at 4")
                times.append(time.perf_counter() - started)
                api("POST", f"/system/scale-function/{name}", {"serviceName": name, "replicas": 1})
                wait_for(lambda: status(name)["availableReplicas"] == 1, 120, f"{name} at 1")
            to_four[name] = times
        for name in placements:
            api("DELETE", "/system/functions", {"functionName": name})
    finally:
        stop_all(procs, timeout=20)
        subprocess.run(["docker", "rmi", "-f", tag, stock_tag], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)

    f_med, s_med = statistics.median(fan), statistics.median(single)
    ratio = f_med / s_med
    table = [row("datacenters", f"scale across stage + lon (20 ms) + syd (60 ms), median of "
                 f"{len(fan)}", f"{f_med * 1000:.1f} ms", f"syd alone {s_med * 1000:.1f} ms",
                 ratio, "≤ 1.10", ratio <= 1.10)]
    def what(name):
        platform = name.split("-")[0]
        image = ("an OpenFaaS-style image (8080 and 8081 bound inside)" if name.endswith("-stock")
                 else "faastastic's watchdog image")
        return f"{platform}, {image}: scale request 1 → 4 ready"

    for name, times in to_four.items():
        table.append(row("datacenters", f"{what(name)}, median of {len(times)}",
                         f"{statistics.median(times):.2f} s"))
    write(args.json, table, fan_out_s=fan, slowest_single_s=single, to_four_s=to_four)
    print()
    print("| what | faastastic | baseline | ratio | target | pass |")
    print("|---|---|---|---|---|---|")
    print(f"| scale across stage + lon (20 ms) + syd (60 ms), median of {len(fan)} | "
          f"{f_med * 1000:.1f} ms | syd alone: {s_med * 1000:.1f} ms | {ratio:.2f} | ≤ 1.10 | "
          f"{'pass' if ratio <= 1.10 else 'FAIL'} |")
    for name, times in to_four.items():
        print(f"| {what(name)}, median of {len(times)} | "
              f"{statistics.median(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)}) "
              f"| – | – | – | – |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Classic-mode benchmark: invocations of a classic function (`cat`: one process per request)
through faastastic against the floor, a minimal loop that starts the same command once per
request with its streams piped (examples/spawn_floor.rs), on as many threads as wrk has
connections. Interleaved rounds in one run; figures are medians over the rounds and the ratio
is the median of the rounds' ratios.

faastastic's CPU per request counts the server, the replica's watchdog and the processes the
watchdog ran (reaped children); the floor's counts the loop and the processes it ran. Both
are also reported split, so the cost of the hop (server and watchdog) shows beside the loop's.
Usage: scripts/bench_classic.py [--seconds 4] [--rounds 5] [--conns 1,16] [--json FILE]
"""
import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

from bench import ROOT, TICKS, serve_with, stop_all, us, watchdog_under, wrk
from benchrows import row as table_row, write

FLOOR = os.path.join(ROOT, "target", "release", "examples", "spawn_floor")
BODY = "hello"


def cpu_split(pid):
    """A process's own CPU seconds, and its reaped children's."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = sum(int(v) for v in fields[11:13]) / TICKS  # utime, stime
    return own, sum(int(v) for v in fields[13:15]) / TICKS  # cutime, cstime


def cpu_with_children(pid):
    """A process's CPU seconds and its reaped children's."""
    return sum(cpu_split(pid))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", default="1,16")
    ap.add_argument("--json", default=os.path.join(ROOT, "target", "bench-classic.json"))
    args = ap.parse_args()
    conns_list = [int(c) for c in args.conns.split(",")]
    if not os.access(FLOOR, os.X_OK):
        sys.exit(f"{FLOOR} is missing: cargo build --release --example spawn_floor")

    work = tempfile.mkdtemp(prefix="faastastic-bench-classic-")
    procs = []
    signal.signal(signal.SIGTERM, lambda *a: (stop_all(procs), sys.exit(1)))
    post = os.path.join(work, "post.lua")
    with open(post, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = "{BODY}"\n'
                'wrk.headers["Content-Type"] = "text/plain"\n')
    results = {c: {"faastastic": [], "floor": []} for c in conns_list}
    try:
        function = {"service": "cat", "image": "local/cat", "envProcess": "cat"}
        server, base = serve_with(work, "[proxy]\nconnection_threads = 1\n", function, procs)
        watchdog = watchdog_under(server.pid)
        if watchdog is None:
            sys.exit("no replica watchdog found under the server")
        url = f"{base}/function/cat"
        wrk(url, 16, 1, post)  # warm up

        def faastastic(conns):
            server_before = cpu_with_children(server.pid)
            (wd_before, fn_before) = cpu_split(watchdog)
            r = wrk(url, conns, args.seconds, post)
            per = lambda seconds: seconds / r["requests"] * 1e6
            (wd_after, fn_after) = cpu_split(watchdog)
            server_us = per(cpu_with_children(server.pid) - server_before)
            watchdog_us, processes_us = per(wd_after - wd_before), per(fn_after - fn_before)
            return {"rps": r["rps"], "cpu_us_per_req": server_us + watchdog_us + processes_us,
                    "server_us": server_us, "watchdog_us": watchdog_us,
                    "processes_us": processes_us,
                    "p99_us": r["p99_us"], "non2xx": r["non2xx"]}

        def floor(conns):
            out = subprocess.run([FLOOR, str(conns), str(args.seconds), BODY, "cat"],
                                 capture_output=True, text=True, check=True).stdout.split()
            runs, secs, cpu, loop = int(out[0]), float(out[1]), float(out[2]), float(out[3])
            return {"rps": runs / secs, "cpu_us_per_req": cpu / runs * 1e6,
                    "loop_us": loop / runs * 1e6, "processes_us": (cpu - loop) / runs * 1e6}

        for rnd in range(args.rounds):
            order = [("faastastic", faastastic), ("floor", floor)]
            if rnd % 2:
                order.reverse()
            for conns in conns_list:
                for name, run in order:
                    r = run(conns)
                    results[conns][name].append(r)
                    print(f"round {rnd + 1} c={conns:<3} {name:<10} {r['rps']:>8.0f} inv/s "
                          f"cpu/inv {r['cpu_us_per_req']:.0f} us", flush=True)
    finally:
        stop_all(procs)
        shutil.rmtree(work, ignore_errors=True)

    table = []
    summary = []
    for conns in conns_list:
        f, fl = results[conns]["faastastic"], results[conns]["floor"]
        med = lambda rows, k: statistics.median(r[k] for r in rows)
        ratio = statistics.median(a["rps"] / b["rps"] for a, b in zip(f, fl))
        cpu_ratio = statistics.median(a["cpu_us_per_req"] / b["cpu_us_per_req"]
                                      for a, b in zip(f, fl))
        non2xx = sum(r["non2xx"] for r in f)
        summary.append({"conns": conns,
                        "faastastic": {k: med(f, k) for k in
                                       ("rps", "cpu_us_per_req", "p99_us", "server_us",
                                        "watchdog_us", "processes_us")},
                        "floor": {k: med(fl, k) for k in
                                  ("rps", "cpu_us_per_req", "loop_us", "processes_us")},
                        "ratio": ratio, "cpu_ratio": cpu_ratio, "non2xx": non2xx})
        table.append(table_row(
            "classic", f"classic `cat`, {conns} connections: invocations/s (CPU per invocation "
            f"{us(med(f, 'cpu_us_per_req'))} vs the floor's {us(med(fl, 'cpu_us_per_req'))}; "
            f"p99 {us(med(f, 'p99_us'))}; non-2xx {non2xx})",
            f"{med(f, 'rps'):,.0f}", f"floor {med(fl, 'rps'):,.0f}", ratio,
            "≥ 0.9 × the floor", ratio >= 0.9 and non2xx == 0))
    print()
    print("| conns | faastastic inv/s | floor inv/s | ratio | CPU/inv faastastic | floor | ratio |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['conns']} | {s['faastastic']['rps']:,.0f} | {s['floor']['rps']:,.0f} | "
              f"{s['ratio']:.2f} | {us(s['faastastic']['cpu_us_per_req'])} | "
              f"{us(s['floor']['cpu_us_per_req'])} | {s['cpu_ratio']:.2f} |")
    print()
    print("CPU per invocation, split (medians): faastastic = server + watchdog + its processes; "
          "floor = loop + its processes")
    for s in summary:
        f, fl = s["faastastic"], s["floor"]
        print(f"  {s['conns']} connections: {us(f['server_us'])} + {us(f['watchdog_us'])} + "
              f"{us(f['processes_us'])}; floor {us(fl['loop_us'])} + {us(fl['processes_us'])}")
    write(args.json, table, summary=summary, rounds=args.rounds, seconds=args.seconds)


if __name__ == "__main__":
    main()

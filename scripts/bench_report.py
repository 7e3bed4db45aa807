#!/usr/bin/env python3
"""Collects the rows of every part of the benchmark suite (target/bench-PART.json, `table`)
into one table: what, faastastic, baseline, ratio, target, pass. Prints it as Markdown and
writes target/bench-results.md and target/bench-results.json.
Usage: scripts/bench_report.py [--require PART,PART,...]
  --require: fail unless each named part produced at least one row with a figure (the smoke
  run uses it so that a part that silently stops producing results fails CI)."""
import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["invoke", "classic", "reaction", "state", "datacenters", "tls", "nats", "ha", "autoscale"]


def cell(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v).replace("|", "\\|")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--require", default="")
    args = ap.parse_args()
    rows, missing = [], []
    for part in PARTS:
        path = os.path.join(ROOT, "target", f"bench-{part}.json")
        try:
            with open(path) as f:
                table = json.load(f).get("table", [])
        except (OSError, ValueError):
            table = []
        if not any(r.get("faastastic") not in (None, "") for r in table):
            missing.append(part)
        rows.extend(table)
    lines = ["| part | what | faastastic | baseline | ratio | target | pass |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = {True: "pass", False: "**miss**", None: "–"}[r.get("pass")]
        lines.append("| " + " | ".join(cell(r.get(k)) for k in
                                        ("part", "what", "faastastic", "baseline", "ratio",
                                         "target")) + f" | {verdict} |")
    text = "\n".join(lines) + "\n"
    print(text)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(ROOT, "target", "bench-results.md"), "w") as f:
        f.write(f"Run of {stamp} on {os.cpu_count()} cores\n\n{text}")
    with open(os.path.join(ROOT, "target", "bench-results.json"), "w") as f:
        json.dump({"time": stamp, "cores": os.cpu_count(), "rows": rows}, f, indent=2)
    required = [p for p in args.require.split(",") if p]
    absent = [p for p in required if p in missing]
    if absent:
        sys.exit(f"no results from: {', '.join(absent)}")
    print(f"{sum(r.get('pass') is True for r in rows)} rows pass, "
          f"{sum(r.get('pass') is False for r in rows)} miss their target")


if __name__ == "__main__":
    main()

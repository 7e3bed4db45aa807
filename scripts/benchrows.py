"""Rows of the benchmark summary, shared by every part of the suite.

Each part writes its raw figures plus `table` (its rows) into target/bench-PART.json; scripts/bench_report.py
collects the rows of all parts into one table. A row: what was measured, faastastic's figure,
the baseline measured in the same run (or None), their ratio, the target and whether it passed
(None when the row is informational)."""
import json


def row(part, what, faastastic, baseline=None, ratio=None, target=None, passed=None):
    return {"part": part, "what": what, "faastastic": faastastic, "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 3), "target": target,
            "pass": passed}


def write(path, rows, **raw):
    with open(path, "w") as f:
        json.dump({"table": rows, **raw}, f, indent=2)


def ms(seconds):
    return f"{seconds * 1000:.1f} ms"

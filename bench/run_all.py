"""Runs the benchmarks one after the other and prints a summary table.

    python -m bench.run_all [--quick] [--only throughput,concurrency,cpu,startup,growth,engine,cluster]

Each benchmark runs as its own `python -m bench.NAME` (with `--quick` passed through), its
output shown as it comes; the figures are collected from the `RESULT {json}` lines each prints
(bench.throughput, which has no target, is read from its text). Exit status 0 when every
target holds, 1 otherwise (or when a benchmark failed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from typing import Any

from bench.harness import REPO

ORDER = ("throughput", "concurrency", "cpu", "startup", "growth", "engine", "cluster")


def run(name: str, quick: bool) -> tuple[list[dict[str, Any]], int, float]:
    cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    print(f"=== {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    results: list[dict[str, Any]] = []
    text: list[str] = []
    for line in proc.stdout:
        if line.startswith("RESULT "):
            results.append(json.loads(line[len("RESULT "):]))
            continue
        if "running as root" in line:  # the daemon's start-up warning, once per daemon
            continue
        text.append(line)
        print(line, end="", flush=True)
    code = proc.wait()
    if name == "throughput":
        results += _throughput(" ".join(text))
    if code != 0:
        results.append({"measure": f"{name}: exit status", "target": "0", "figure": str(code), "ok": False})
    return results, code, time.perf_counter() - t


def _throughput(text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if m := re.search(r"ratio poold / bare: (\S+)", text):
        out.append({"measure": "throughput: no-op batch, poold / bare PPE", "target": "-",
                    "figure": m.group(1), "ok": None})
    if m := re.search(r"round trip \((\d+)\): p50 (\S+) ms, p99 (\S+) ms", text):
        out.append({"measure": "throughput: submit -> ?wait round trip p50 / p99", "target": "-",
                    "figure": f"{m.group(2)} / {m.group(3)} ms", "ok": None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", default=",".join(ORDER), help="comma-separated subset, in this order")
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    for n in names:
        if n not in ORDER:
            ap.error(f"--only: unknown benchmark {n!r} (known: {', '.join(ORDER)})")
    rows: list[dict[str, Any]] = []
    took: list[str] = []
    for name in names:
        results, _, seconds = run(name, a.quick)
        rows += results
        took.append(f"{name} {seconds:.0f} s")
        print(flush=True)
    w_measure = max([len(r["measure"]) for r in rows] + [7])
    w_target = max([len(str(r["target"])) for r in rows] + [6])
    w_figure = max([len(str(r["figure"])) for r in rows] + [6])
    print(f"summary{' (--quick)' if a.quick else ''}: {', '.join(took)}")
    print(f"{'measure':{w_measure}} | {'target':{w_target}} | {'figure':{w_figure}} | ok?")
    print(f"{'-' * w_measure}-|-{'-' * w_target}-|-{'-' * w_figure}-|-----")
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r["ok"]]
        print(f"{r['measure']:{w_measure}} | {r['target']!s:{w_target}} | {r['figure']!s:{w_figure}} | {ok}")
    sys.exit(0 if all(r["ok"] is not False for r in rows) else 1)


if __name__ == "__main__":
    main()

"""`service.client.Executor.map` beside a bare `ProcessPoolExecutor.map`, in one run.

    python -m bench.executor [--jobs 10000] [--workers 2] [--chunksize 100] [--quick]

Both map a no-op (`bench.jobs:noop`) over N items with the same chunksize and
the same number of workers, after a warm-up (processes started, function
imported, connections open), and take every result in order. Prints both
times, jobs/s, the speed ratio poold / bare (bare time / poold time) and the
CPU seconds the poold run cost the client and the daemon with its workers.

The bare executor sends a chunk to a worker as one task; the Executor makes
one durable poold job per item (a chunk is one batch request), so the ratio
is far below 1 by design: it measures what a job costs, not parallelism.

Profile the client side with py-spy, which samples this process only, not
the daemon it starts:

    py-spy record --gil -o executor.svg -- python -m bench.executor
"""

from __future__ import annotations

import argparse
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor

import psutil

from bench.harness import daemon
from bench.jobs import noop
from service.client import Executor


def bare_ppe(n: int, workers: int, chunksize: int) -> float:
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(noop, range(workers * 4)))  # warm: processes started, function imported
        t = time.perf_counter()
        out = list(ex.map(noop, range(n), chunksize=chunksize))
        dt = time.perf_counter() - t
    assert out == list(range(n))
    return dt


def cpu_seconds(proc: subprocess.Popen[bytes]) -> tuple[float, float]:
    """CPU seconds used so far by this process (the client) and by the daemon with its workers."""
    mine = psutil.Process().cpu_times()
    root = psutil.Process(proc.pid)
    theirs = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        theirs += t.user + t.system
    return mine.user + mine.system, theirs


def poold_map(port: int, n: int, chunksize: int, max_pending: int, timeout: float) -> float:
    ex = Executor(f"http://127.0.0.1:{port}", max_pending=max_pending)
    ok = False
    try:
        assert list(ex.map(noop, range(50), chunksize=10)) == list(range(50))  # warm
        t = time.perf_counter()
        out = list(ex.map(noop, range(n), chunksize=chunksize, timeout=timeout))
        dt = time.perf_counter() - t
        assert out == list(range(n))
        ok = True
    finally:  # a daemon that stopped answering must not hang the benchmark at exit
        ex.shutdown(wait=ok, cancel_futures=not ok)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunksize", type=int, default=100)
    ap.add_argument("--max-pending", type=int, default=1000, help="the Executor's (its default: 1000)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat both (same daemon); keep the best")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up on the poold run after this")
    ap.add_argument("--quick", action="store_true", help="2000 jobs")
    a = ap.parse_args()
    if a.quick:
        a.jobs = 2000
    ppe: list[float] = []
    ours: list[tuple[float, float, float]] = []  # seconds, client CPU, daemon + workers CPU
    with daemon(a.workers) as (port, proc):
        for _ in range(a.rounds):
            ppe.append(bare_ppe(a.jobs, a.workers, a.chunksize))
            before = cpu_seconds(proc)
            dt = poold_map(port, a.jobs, a.chunksize, a.max_pending, a.timeout)
            after = cpu_seconds(proc)
            ours.append((dt, after[0] - before[0], after[1] - before[1]))
    bare = min(ppe)
    mine, client_cpu, daemon_cpu = min(ours)
    print(f"map of {a.jobs} no-op calls, chunksize {a.chunksize}, {a.workers} workers"
          f" (Executor max_pending {a.max_pending})")
    print(f"  bare ProcessPoolExecutor.map: {bare:.3f} s  {a.jobs / bare:,.0f} jobs/s")
    print(f"  poold Executor.map          : {mine:.3f} s  {a.jobs / mine:,.0f} jobs/s"
          f"  (CPU: client {client_cpu:.2f} s, daemon + workers {daemon_cpu:.2f} s)")
    print(f"  ratio poold / bare (speed = bare time / poold time): {bare / mine:.4f}"
          f" (1/{mine / bare:.0f})")


if __name__ == "__main__":
    main()

"""`service.client.Executor.map` beside a bare `ProcessPoolExecutor.map`, in one run.

    python -m bench.executor [--jobs 10000] [--workers 2] [--chunksize 100] [--quick]

Both map a no-op (`bench.jobs:noop`) over N items with the same chunksize and
the same number of workers, after a warm-up (processes started, function
imported), and consume every result in order. Prints both times, jobs/s and the
speed ratio poold / bare (bare time / poold time). With `--profile FILE` the
client side of the poold run is profiled with pyinstrument (text to FILE).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

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


def poold_map(port: int, n: int, chunksize: int, max_pending: int, profile: str | None) -> float:
    with Executor(f"http://127.0.0.1:{port}", max_pending=max_pending) as ex:
        assert list(ex.map(noop, range(50), chunksize=10)) == list(range(50))  # warm: connections
        profiler: Any = None
        if profile:
            from pyinstrument import Profiler  # only when asked for: it is a dev tool

            profiler = Profiler(interval=0.0005, async_mode="disabled")
        ctx: AbstractContextManager[Any] = profiler if profiler is not None else nullcontext()
        with ctx:
            t = time.perf_counter()
            out = list(ex.map(noop, range(n), chunksize=chunksize))
            dt = time.perf_counter() - t
    assert out == list(range(n))
    if profiler is not None and profile:
        with open(profile, "w") as f:
            f.write(profiler.output_text(unicode=True, show_all=False))
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunksize", type=int, default=100)
    ap.add_argument("--max-pending", type=int, default=1000, help="the Executor's (its default: 1000)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat both and keep each one's best")
    ap.add_argument("--profile", metavar="FILE", help="pyinstrument text profile of the poold run")
    ap.add_argument("--quick", action="store_true", help="2000 jobs")
    a = ap.parse_args()
    if a.quick:
        a.jobs = 2000
    ppe: list[float] = []
    ours: list[float] = []
    with daemon(a.workers) as (port, _proc):
        for _ in range(a.rounds):
            ppe.append(bare_ppe(a.jobs, a.workers, a.chunksize))
            ours.append(poold_map(port, a.jobs, a.chunksize, a.max_pending, a.profile))
    bare, mine = min(ppe), min(ours)
    print(f"Executor.map over {a.jobs} no-op calls, chunksize {a.chunksize}, workers {a.workers}"
          f" (max_pending {a.max_pending})")
    print(f"  bare ProcessPoolExecutor.map: {bare:.3f} s  {a.jobs / bare:,.0f} jobs/s")
    print(f"  poold Executor.map          : {mine:.3f} s  {a.jobs / mine:,.0f} jobs/s")
    print(f"  ratio poold / bare (speed, bare time / poold time): {bare / mine:.2f}")


if __name__ == "__main__":
    main()

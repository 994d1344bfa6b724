"""No-op throughput, round-trip latency and idle memory of poold beside a bare ProcessPoolExecutor.

    python -m bench.throughput [--jobs 10000] [--workers 2] [--quick]

Prints, from one run: a bare ProcessPoolExecutor running N no-op jobs (submitted one by one)
and poold running the same N jobs (HTTP batch submit → all results, durable in SQLite), their
ratio; the p50/p99 of one client's submit → ?wait round trip; the idle USS of the daemon and
its workers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, wait

from bench.harness import Conn, daemon, uss_mib
from bench.jobs import noop


def bare_ppe(n: int, workers: int) -> float:
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(noop, range(workers * 4)))  # warm: processes started
        t = time.perf_counter()
        futs = [ex.submit(noop, i) for i in range(n)]
        wait(futs)
        dt = time.perf_counter() - t
    return dt


def poold_batch(port: int, n: int, chunk: int = 10000) -> float:
    c = Conn(port)
    c.call("POST", "/v1/jobs/wait", {"ids": [c.call("POST", "/v1/jobs", {"fn": "bench.jobs:noop"})[1]["id"]],
                                     "timeout": 10, "all": True})  # warm: the function is known
    t = time.perf_counter()
    ids: list[str] = []
    for i in range(0, n, chunk):
        specs = [{"fn": "bench.jobs:noop", "args": [j]} for j in range(i, min(n, i + chunk))]
        status, body = c.call("POST", "/v1/jobs/batch", {"jobs": specs})
        assert status == 202, (status, body)
        ids += [j["id"] for j in body["jobs"]]
    done: set[str] = set()
    while len(done) < n:
        pending = [i for i in ids if i not in done][:1000]  # the most one wait takes
        _, body = c.call("POST", "/v1/jobs/wait", {"ids": pending, "timeout": 30, "all": True})
        done.update(j["id"] for j in body["jobs"])
    dt = time.perf_counter() - t
    c.close()
    return dt


def round_trips(port: int, n: int) -> list[float]:
    c = Conn(port)
    out = []
    for i in range(n):
        t = time.perf_counter()
        _, job = c.call("POST", "/v1/jobs", {"fn": "bench.jobs:noop", "args": [i]})
        _, job = c.call("GET", f"/v1/jobs/{job['id']}?wait=10")
        out.append(time.perf_counter() - t)
        assert job["state"] == "succeeded", job
    c.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trips", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds, interleaved; the best of each side counts (a shared, noisy machine)")
    ap.add_argument("--quick", action="store_true", help="fewer jobs and round trips")
    a = ap.parse_args()
    if a.quick:
        a.jobs, a.trips, a.repeat = 2000, 300, 1
    with daemon(a.workers) as (port, proc):
        time.sleep(0.5)
        mem = uss_mib(proc.pid)
        ppe = ours = float("inf")
        for _ in range(a.repeat):
            ppe = min(ppe, bare_ppe(a.jobs, a.workers))
            ours = min(ours, poold_batch(port, a.jobs))
        trips = sorted(round_trips(port, a.trips))
    print(f"no-op jobs: {a.jobs}, workers: {a.workers}, best of {a.repeat} interleaved rounds")
    print(f"  bare ProcessPoolExecutor (submit one by one): {ppe:.3f} s  {a.jobs / ppe:,.0f} jobs/s")
    print(f"  poold (HTTP batch → all results, durable)   : {ours:.3f} s"
          f"  {a.jobs / ours:,.0f} jobs/s")
    print(f"  ratio poold / bare: {ppe / ours:.2f}")
    p50 = statistics.median(trips) * 1e3
    p99 = trips[int(len(trips) * 0.99) - 1] * 1e3
    print(f"submit → ?wait round trip ({a.trips}): p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    workers_uss = sum(v for k, v in mem.items() if k.startswith("poold: worker"))
    print(f"idle USS: daemon {mem['daemon']:.1f} MiB + workers {workers_uss:.1f} MiB"
          f" = {mem['daemon'] + workers_uss:.1f} MiB"
          f" (forkserver {mem.get('forkserver', 0):.1f},"
          f" resource tracker {mem.get('resource_tracker', 0):.1f})")


if __name__ == "__main__":
    main()

"""Supervision of poold beside a bare ProcessPoolExecutor: timeouts, crashes, leftovers.

    python -m bench.supervision [--quick]

Prints, from one run, poold (2 workers, forkserver, the default supervisor settings) next to a
bare concurrent.futures.ProcessPoolExecutor (2 workers, the default start method):

- timeout: how long after a job's deadline its process tree (worker, child, grandchild,
  detached setsid grandchild) is gone. poold only: a bare ProcessPoolExecutor has no per-job
  timeout (future.result(timeout) stops waiting, the worker runs on), which it shows;
- a worker SIGKILLed mid-job: kill -> the next job on that slot done (poold), kill ->
  BrokenProcessPool -> a new executor ran a job (bare);
- jobs disturbed by one job's worker death, with 6 jobs in flight on 2 workers;
- a detached grandchild left by a job that returned: how long until it is ended, against
  supervisor.interval + supervisor.kill_grace (a bare ProcessPoolExecutor never ends it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench import jobs as bench_jobs
from bench.harness import Conn, daemon
from tests.support import jobs as test_jobs
from tests.support.supervision import ended, when_ended

WORKERS = 2
INTERVAL, KILL_GRACE = 1.0, 3.0  # the contract's defaults
TIMEOUT = 1.0
TREE = ("child", "grandchild", "detached")  # what tests.support.jobs:spawn_tree starts
FINAL = {"succeeded", "failed", "timed_out", "cancelled"}

_started: list[psutil.Process] = []  # every job process this run learnt of: none may outlive it


# -- helpers


def ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def watch(pid: int) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    _started.append(p)
    return p


def read_pid(path: Path, timeout: float = 10) -> int:
    end = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > end:
            raise RuntimeError(f"{path} was never written")
        time.sleep(0.005)
    return int(path.read_text())


def submit(c: Conn, fn: str, *args: Any, **spec: Any) -> str:
    status, job = c.call("POST", "/v1/jobs", {"fn": fn, "args": list(args), **spec})
    assert status == 202, (status, job)
    return str(job["id"])


def finished(c: Conn, jid: str, timeout: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        _, job = c.call("GET", f"/v1/jobs/{jid}?wait=10")
        if job["state"] in FINAL:
            return dict(job)
        if time.monotonic() > end:
            raise RuntimeError(f"job {jid} not finished: {job}")


def running(c: Conn, jid: str, timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        _, job = c.call("GET", f"/v1/jobs/{jid}")
        if job["state"] == "running" and job["worker"]:
            return dict(job)
        if time.monotonic() > end:
            raise RuntimeError(f"job {jid} never ran: {job}")
        time.sleep(0.005)


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f} ms"
    return f"median {statistics.median(values):.0f} ms, max {max(values):.0f} ms"


@contextlib.contextmanager
def bare(workers: int = WORKERS) -> Iterator[ProcessPoolExecutor]:
    """A bare ProcessPoolExecutor with its processes started; always shut down."""
    ex = ProcessPoolExecutor(workers)
    try:
        list(ex.map(bench_jobs.noop, range(workers * 2)))
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# -- timeouts


def poold_timeout(c: Conn, tmp: Path, rounds: int) -> dict[str, list[float]]:
    """ms past the deadline at which each process of the timed-out job's tree was gone."""
    out: dict[str, list[float]] = {k: [] for k in ("worker", *TREE, "job finished")}
    for i in range(rounds):
        d = tmp / f"timeout{i}"
        d.mkdir()
        jid = submit(c, "tests.support.jobs:spawn_tree", str(d), False, False, timeout=TIMEOUT)
        procs = {k: watch(read_pid(d / f"{k}.pid")) for k in TREE}
        job = running(c, jid)
        procs["worker"] = watch(job["worker"]["pid"])
        deadline = ts(job["started_at"]) + TIMEOUT
        seen = when_ended(procs, TIMEOUT + INTERVAL + KILL_GRACE + 10)
        for k in procs:
            out[k].append((seen.get(k, float("inf")) - deadline) * 1000)
        job = finished(c, jid)
        assert job["state"] == "timed_out", job
        out["job finished"].append((ts(job["finished_at"]) - deadline) * 1000)
    return out


def bare_timeout() -> bool:
    """Whether a bare PPE's worker still runs the job 1 s after future.result(timeout) gave up."""
    with bare(1) as ex:
        wpid = ex.submit(test_jobs.pid).result()
        fut = ex.submit(test_jobs.sleep, TIMEOUT + 1.5)
        with contextlib.suppress(FutureTimeout):
            fut.result(timeout=TIMEOUT)
        time.sleep(1.0)
        return fut.running() and not ended(watch(wpid))


# -- a worker killed mid-job


def poold_crash(c: Conn, tmp: Path, rounds: int) -> list[float]:
    """ms from SIGKILL of a busy worker to the next job on that slot done (the other slot busy)."""
    hold = submit(c, "tests.support.jobs:forever", timeout=600)
    running(c, hold)
    out = []
    for _ in range(rounds):
        victim = running(c, submit(c, "tests.support.jobs:forever", timeout=600))
        t = time.perf_counter()
        os.kill(victim["worker"]["pid"], signal.SIGKILL)
        nxt = finished(c, submit(c, "bench.jobs:noop", 1))
        out.append((time.perf_counter() - t) * 1000)
        assert nxt["state"] == "succeeded", nxt
        dead = finished(c, victim["id"])
        assert dead["error"]["type"] == "worker_died", dead
    c.call("DELETE", f"/v1/jobs/{hold}")
    return out


def bare_crash(tmp: Path, rounds: int) -> tuple[list[float], list[float]]:
    """ms from SIGKILL of a busy worker to BrokenProcessPool, and to a new executor's first result."""
    broken, again = [], []
    for i in range(rounds):
        marker = tmp / f"bare-crash{i}"
        with bare() as ex:
            fut = ex.submit(test_jobs.hang_once, str(marker))  # writes its worker's pid, then hangs
            wpid = read_pid(marker)
            t = time.perf_counter()
            os.kill(wpid, signal.SIGKILL)
            with contextlib.suppress(BrokenProcessPool):
                fut.result(timeout=30)
            broken.append((time.perf_counter() - t) * 1000)
        with ProcessPoolExecutor(WORKERS) as ex:
            ex.submit(bench_jobs.noop, 1).result()
        again.append((time.perf_counter() - t) * 1000)
    return broken, again


# -- other jobs disturbed by one job's worker death


def poold_disturbed(c: Conn) -> tuple[int, int, str]:
    specs = [{"fn": "tests.support.jobs:sleep", "args": [1.0]} for _ in range(5)]
    specs.insert(1, {"fn": "tests.support.jobs:suicide"})
    status, body = c.call("POST", "/v1/jobs/batch", {"jobs": specs})
    assert status == 202, (status, body)
    done = [finished(c, j["id"]) for j in body["jobs"]]
    others = done[:1] + done[2:]
    return sum(j["state"] != "succeeded" for j in others), len(others), done[1]["error"]["type"]


def bare_disturbed() -> tuple[int, int]:
    with bare() as ex:  # submitted in poold's order: the second job kills its worker
        futs = [ex.submit(test_jobs.suicide) if i == 1 else ex.submit(test_jobs.sleep, 1.0)
                for i in range(6)]
        failed = 0
        for i, f in enumerate(futs):
            try:
                f.result(timeout=30)
            except BrokenProcessPool:
                failed += i != 1
    return failed, 5


# -- what a job leaves behind


def leftovers(c: Conn, tmp: Path) -> tuple[dict[str, float], float]:
    """Seconds from each job's return to its detached grandchild's end (poold); and how long a
    bare PPE's one still ran, measured alongside."""
    ids = {}
    for fn in ("leak_detached", "leak_stubborn_detached"):
        ids[fn] = submit(c, f"tests.support.jobs:{fn}", str(tmp / f"{fn}.pid"))
    with bare(1) as ex:
        bare_left = watch(ex.submit(test_jobs.leak_detached, str(tmp / "bare.pid")).result())
    t_bare = time.time()
    procs, returned = {}, {}
    for fn, jid in ids.items():
        job = finished(c, jid)
        assert job["state"] == "succeeded", job
        procs[fn], returned[fn] = watch(job["result"]), ts(job["finished_at"])
    seen = when_ended(procs, INTERVAL + KILL_GRACE + 10)
    out = {fn: seen.get(fn, float("inf")) - returned[fn] for fn in procs}
    bare_ran = time.time() - t_bare if not ended(bare_left) else -1.0
    return out, bare_ran


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    a = ap.parse_args()
    if a.quick:
        a.rounds = 2
    allow = ["bench.jobs:*", "service.demo:*", "tests.support.jobs:*"]
    try:
        with tempfile.TemporaryDirectory() as tmpdir, \
                daemon(WORKERS, jobs={"allow": allow},
                       supervisor={"interval": INTERVAL, "kill_grace": KILL_GRACE}) as (port, _proc):
            tmp = Path(tmpdir)
            c = Conn(port)
            tmo = poold_timeout(c, tmp, a.rounds)
            bare_runs_on = bare_timeout()
            crash = poold_crash(c, tmp, a.rounds)
            bare_broken, bare_again = bare_crash(tmp, a.rounds)
            disturbed = poold_disturbed(c)
            bare_dist = bare_disturbed()
            left, bare_ran = leftovers(c, tmp)
            c.close()
    finally:
        for p in _started:  # nothing this run started may outlive it
            if not ended(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()

    print(f"poold: {WORKERS} workers (forkserver), supervisor.interval {INTERVAL:g} s,"
          f" kill_grace {KILL_GRACE:g} s; bare ProcessPoolExecutor: {WORKERS} workers (default start method)")
    print(f"timeout ({TIMEOUT:g} s job that started a child, a grandchild and a detached grandchild;"
          f" {a.rounds} rounds), gone this long past the deadline:")
    for k, v in tmo.items():
        print(f"  poold {k:<13}: {ms(v)}")
    print(f"  bare PPE: no per-job timeout; {TIMEOUT:g} s after future.result(timeout={TIMEOUT:g}) gave up,"
          f" the job still ran: {'yes' if bare_runs_on else 'no'}")
    print(f"worker SIGKILLed mid-job ({a.rounds} rounds):")
    print(f"  poold   kill -> next job on that slot done        : {ms(crash)}")
    print(f"  bare    kill -> BrokenProcessPool                 : {ms(bare_broken)}")
    print(f"  bare    kill -> a new executor ran a job          : {ms(bare_again)}")
    print("other jobs disturbed by one job's worker death (6 jobs in flight, 2 workers):")
    print(f"  poold: {disturbed[0]} of {disturbed[1]} (the dead one: {disturbed[2]})")
    print(f"  bare : {bare_dist[0]} of {bare_dist[1]} (BrokenProcessPool)")
    print(f"detached grandchild left by a job that returned, ended after (bound interval + kill_grace"
          f" = {INTERVAL + KILL_GRACE:g} s):")
    for fn, s in left.items():
        what = "ignores SIGTERM" if "stubborn" in fn else "plain"
        print(f"  poold ({what:<15}): {s:.2f} s")
    print(f"  bare PPE: never ended (still running {bare_ran:.1f} s after its job returned; killed here)"
          if bare_ran >= 0 else "  bare PPE: it ended on its own")


if __name__ == "__main__":
    main()

"""Many concurrent clients submitting single jobs: accepted (202, committed) jobs/s, all of them finished.

    python -m bench.concurrency [--clients 32] [--seconds 5] [--workers 2] [--gen threads,aiohttp]
                                [--repeat 2] [--profile FILE] [--quick]

For each load generator (a fresh daemon each run; `--repeat` runs each, alternating, the best
counts: on a shared machine noise only ever lowers the rate): `--clients` clients each POST /v1/jobs
(bench.jobs:noop) one after the other on their own kept-alive connection for `--seconds`;
the figure is the jobs accepted (202) per second of wall time. Then every accepted id is
checked finished through POST /v1/jobs/wait (chunks of 1,000, the most it takes).

Two generators, because the generator competes with the daemon for the same cores:
  threads  32 threads, http.client keep-alive (one Python process: the GIL serialises them)
  aiohttp  one asyncio (uvloop) process, 32 tasks on an aiohttp session (usually cheaper)
The better of the two is the figure (both are printed, with the CPU each side used: the
daemon's CPU per accepted job does not depend on the generator). For reference, the same
clients submitting to a bare ProcessPoolExecutor (no HTTP, no durability) in the same run.

Target (issue 7): >= 3,000 accepted jobs/s, and every accepted job finished.
With `--profile FILE`, py-spy samples the daemon during the (first generator's) load and
writes raw collapsed stacks to FILE (and FILE.top.txt, the functions by own and total share).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.harness import Conn, daemon
from bench.jobs import noop

TARGET_RATE = 3000.0
BODY = json.dumps({"fn": "bench.jobs:noop"}).encode()
HEADERS = {"Content-Type": "application/json"}


@dataclass
class Load:
    gen: str
    accepted: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    client_cpu: float = 0.0  # seconds of CPU the generator used
    daemon_cpu: float = 0.0  # seconds of CPU the daemon's main process used
    workers_cpu: float = 0.0
    finished: int = 0
    succeeded: int = 0
    finish_seconds: float = 0.0
    others: float = 0.0  # cores other programs used during the load
    counted: int = 0  # the daemon's succeeded counter (should equal `succeeded`)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


# -- load generators
def _thread_client(port: int, holder: dict[str, float], start: threading.Barrier, out: list[Any]) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.connect()
    ids: list[str] = []
    lat: list[float] = []
    refused: Counter[int] = Counter()
    start.wait()
    end = holder["end"]
    try:
        while (t := time.perf_counter()) < end:
            c.request("POST", "/v1/jobs", body=BODY, headers=HEADERS)
            r = c.getresponse()
            r.read()
            lat.append(time.perf_counter() - t)
            if r.status == 202:
                ids.append(r.getheader("Location", "").rsplit("/", 1)[-1])
            else:
                refused[r.status] += 1
    finally:
        c.close()
        out.append((ids, lat, refused))


def load_threads(port: int, clients: int, seconds: float) -> Load:
    out: list[Any] = []
    start = threading.Barrier(clients + 1)
    holder = {"end": 0.0}  # set once every thread is connected and waiting at the barrier
    threads = [threading.Thread(target=_thread_client, args=(port, holder, start, out))
               for _ in range(clients)]
    for th in threads:
        th.start()
    while start.n_waiting < clients:
        time.sleep(0.001)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    holder["end"] = t0 + seconds
    start.wait()
    for th in threads:
        th.join()
    load = Load("threads", seconds=time.perf_counter() - t0, client_cpu=time.process_time() - cpu0)
    for ids, lat, refused in out:
        load.ids += ids
        load.latencies += lat
        load.refused += refused
    load.accepted = len(load.ids)
    return load


async def _aiohttp_load(port: int, clients: int, seconds: float) -> Load:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/jobs"
    load = Load("aiohttp")
    conn = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as session:
        # open every connection before the clock starts
        async def warm() -> None:
            async with session.get(f"http://127.0.0.1:{port}/health") as r:
                await r.read()
        await asyncio.gather(*(warm() for _ in range(clients)))
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + seconds

        async def client() -> None:
            while (t := time.perf_counter()) < end:
                async with session.post(url, data=BODY, headers=HEADERS) as r:
                    await r.read()
                    load.latencies.append(time.perf_counter() - t)
                    if r.status == 202:
                        load.ids.append(r.headers["Location"].rsplit("/", 1)[-1])
                    else:
                        load.refused[r.status] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        load.seconds = time.perf_counter() - t0
        load.client_cpu = time.process_time() - cpu0
    load.accepted = len(load.ids)
    return load


def load_aiohttp(port: int, clients: int, seconds: float) -> Load:
    try:
        import uvloop

        return uvloop.run(_aiohttp_load(port, clients, seconds))
    except ImportError:  # pragma: no cover - uvloop is a dependency of poold
        return asyncio.run(_aiohttp_load(port, clients, seconds))


GENERATORS = {"threads": load_threads, "aiohttp": load_aiohttp}


# -- checks and reference
def _tree_cpu() -> float:
    """CPU seconds used by this process and everything under it (the daemon included)."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for p in me.children(recursive=True):
        try:
            ct = p.cpu_times()
            total += ct.user + ct.system + ct.children_user + ct.children_system
        except psutil.Error:
            pass
    return total


def _busy(t: Any) -> float:
    return float(sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal")))


def snapshot() -> tuple[float, float, float]:
    """(monotonic time, busy CPU seconds of the machine, CPU seconds of our process tree)."""
    return time.monotonic(), _busy(psutil.cpu_times()), _tree_cpu()


def others_between(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Cores other programs used between two snapshots."""
    wall = b[0] - a[0]
    return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / wall if wall > 0 else 0.0


class Neighbours:
    """How many cores other programs on the machine used while a measurement ran (a context
    manager): on a shared machine a figure is only as good as the quiet it was measured in."""

    def __enter__(self) -> Neighbours:
        self.start = snapshot()
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.cores = others_between(self.start, snapshot())

    def note(self) -> str:
        warn = " (figures disturbed: the machine was not quiet)" if self.cores > QUIET_CORES else ""
        return f"other programs used {self.cores:.2f} cores meanwhile{warn}"


QUIET_CORES = 0.15


def wait_quiet(limit: float, span: float = 1.0) -> float:
    """Waits (up to `limit` s) for a `span` in which other programs use < QUIET_CORES cores: a
    shared machine's neighbours disturb every figure. Returns the cores they used last."""
    end = time.monotonic() + limit
    said = False
    while True:
        with Neighbours() as nb:
            time.sleep(span)
        if nb.cores < QUIET_CORES or time.monotonic() >= end:
            if said or nb.cores >= QUIET_CORES:
                print(f"  (other programs use {nb.cores:.2f} cores: measuring now)", flush=True)
            return nb.cores
        if not said:
            print(f"  (other programs use {nb.cores:.2f} cores: waiting up to {limit:g} s for quiet)",
                  flush=True)
            said = True


def wait_finished(port: int, ids: list[str], budget: float = 300.0, chunk: int = 1000) -> dict[str, str]:
    """{id: final state} of the ids that finished within `budget` seconds (POST /v1/jobs/wait)."""
    c = Conn(port)
    done: dict[str, str] = {}
    end = time.monotonic() + budget
    try:
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            while time.monotonic() < end:
                pending = [j for j in part if j not in done]
                if not pending:
                    break
                status, body = c.call("POST", "/v1/jobs/wait", {"ids": pending, "timeout": 30, "all": True})
                assert status == 200, (status, body)
                done.update((j["id"], j["state"]) for j in body["jobs"])
    finally:
        c.close()
    return done


def cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of the daemon's main process, of its workers) so far."""
    t = proc.cpu_times()
    main = t.user + t.system
    workers = 0.0
    for p in proc.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("poold: worker"):
                ct = p.cpu_times()
                workers += ct.user + ct.system
        except psutil.Error:
            pass
    return main, workers


def bare_ppe(clients: int, seconds: float, workers: int) -> float:
    """Jobs/s that `clients` threads submit to a bare ProcessPoolExecutor (every one finished)."""
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(noop, range(workers * 4)))
        counts = [0] * clients
        futs: list[list[Any]] = [[] for _ in range(clients)]
        start = threading.Barrier(clients + 1)
        holder = {"end": 0.0}

        def client(k: int) -> None:
            start.wait()
            end, mine = holder["end"], futs[k]
            while time.perf_counter() < end:
                mine.append(ex.submit(noop, None))
                counts[k] += 1
                if len(mine) % 64 == 0:  # like a client waiting for its answer: bounded in flight
                    mine[-64].result()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for th in threads:
            th.start()
        t0 = time.perf_counter()
        holder["end"] = t0 + seconds
        start.wait()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t0
        for mine in futs:
            for f in mine:
                f.result()
    return sum(counts) / dt


def _profile_start(pid: int, path: str, seconds: float) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(spy), "record", "-p", str(pid), "-f", "raw", "-o", path, "-r", "250",
                             "-d", str(max(1, int(seconds))), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize_profile(path: str, top: int = 40) -> str:
    """Own and total share of each function in a py-spy raw (collapsed) file."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack:
            continue
        n = int(n_text)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    lines = [f"{samples} samples"]
    lines.append("-- own time")
    lines += [f"{n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("-- total time (inclusive)")
    lines += [f"{n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


def run_one(gen: str, clients: int, seconds: float, workers: int, profile: str | None) -> Load:
    with daemon(workers) as (port, proc):
        c = Conn(port)  # warm: bench.jobs imported in the workers, its run time known
        _, job = c.call("POST", "/v1/jobs", {"fn": "bench.jobs:noop"})
        c.call("POST", "/v1/jobs/wait", {"ids": [job["id"]], "timeout": 10, "all": True})
        c.close()
        p = psutil.Process(proc.pid)
        d0, w0 = cpu_seconds(p)
        spy = _profile_start(proc.pid, profile, seconds) if profile else None
        with Neighbours() as nb:
            load = GENERATORS[gen](port, clients, seconds)
        load.others = nb.cores
        d1, w1 = cpu_seconds(p)
        load.daemon_cpu, load.workers_cpu = d1 - d0, w1 - w0
        t = time.perf_counter()
        states = wait_finished(port, load.ids)
        load.finish_seconds = time.perf_counter() - t
        load.finished = len(states)
        load.succeeded = sum(1 for s in states.values() if s == "succeeded")
        c = Conn(port)
        c.c.request("GET", "/metrics")
        text = c.c.getresponse().read().decode()
        c.close()
        m = re.search(r'^poold_jobs_finished_total\{state="succeeded"\} (\S+)$', text, re.M)
        load.counted = int(float(m.group(1))) - 1 if m else -1  # the warm-up job is one of them
        if spy is not None:
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0:
                print(f"py-spy failed: {err.decode().strip()}", file=sys.stderr)
    return load


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gen", default="threads,aiohttp", help="load generators, comma-separated")
    ap.add_argument("--profile", default=None, help="py-spy raw output file (first generator's run)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per generator, the best counts"
                    " (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1 s of load per generator")
    a = ap.parse_args()
    if a.quick:
        a.seconds = 1.0
    gens = [g.strip() for g in a.gen.split(",") if g.strip()]
    for g in gens:
        if g not in GENERATORS:
            ap.error(f"--gen: unknown generator {g!r} (known: {', '.join(GENERATORS)})")
    wait_quiet(10 if a.quick else 60)
    ppe = bare_ppe(a.clients, a.seconds, a.workers)
    if a.repeat is None:
        a.repeat = 1 if a.quick else 2
    loads = []
    for rep in range(a.repeat):
        for k, g in enumerate(gens):
            wait_quiet(10 if a.quick else 60)
            profile = a.profile if k == 0 and rep == 0 else None
            loads.append(run_one(g, a.clients, a.seconds, a.workers, profile))
    print(f"{a.clients} concurrent clients, POST /v1/jobs (bench.jobs:noop), {a.seconds:g} s each,"
          f" {a.workers} workers, {psutil.cpu_count()} CPUs")
    print(f"  reference: bare ProcessPoolExecutor, {a.clients} threads submitting: {ppe:,.0f} jobs/s")
    for ld in loads:
        all_done = ld.finished == ld.accepted and ld.succeeded == ld.accepted
        print(f"  {ld.gen:8s}: {ld.accepted:,} accepted in {ld.seconds:.2f} s = {ld.rate:,.0f} jobs/s"
              f" (ratio to bare PPE {ld.rate / ppe:.2f}); refused: {dict(ld.refused) or 'none'}")
        p50, p99 = pct(ld.latencies, 0.5) * 1e3, pct(ld.latencies, 0.99) * 1e3
        print(f"            latency p50 {p50:.2f} ms, p99 {p99:.2f} ms; finished {ld.finished:,}/"
              f"{ld.accepted:,} ({ld.succeeded:,} succeeded), the rest within {ld.finish_seconds:.2f} s")
        per_job = ld.daemon_cpu / ld.accepted * 1e6 if ld.accepted else float("nan")
        print(f"            CPU: daemon {ld.daemon_cpu / ld.seconds:.0%} of a core ({per_job:.0f} µs/job),"
              f" workers {ld.workers_cpu / ld.seconds:.0%}, generator {ld.client_cpu / ld.seconds:.0%}"
              f", other programs {ld.others:.2f} cores")
        print(f"            -> {'all finished' if all_done else 'NOT ALL FINISHED'}; the daemon's succeeded"
              f" counter says {ld.counted:,}{'' if ld.counted == ld.succeeded else ' (MISMATCH)'}")
    best = max(loads, key=lambda ld: ld.rate)
    ok_rate = best.rate >= TARGET_RATE
    ok_done = all(ld.finished == ld.accepted == ld.succeeded for ld in loads)
    print(f"target: >= {TARGET_RATE:,.0f} accepted jobs/s: {best.rate:,.0f} ({best.gen})"
          f" -> {'HOLDS' if ok_rate else 'MISSED'}")
    print(f"target: every accepted job finished: {'HOLDS' if ok_done else 'MISSED'}")
    accepted = sum(ld.accepted for ld in loads)
    counted = sum(ld.counted for ld in loads)
    ok_once = all(ld.counted == ld.succeeded for ld in loads)
    print(f"check: the daemon counted each job's end once (poold_jobs_finished_total{{state=\"succeeded\"}}"
          f" = jobs): {counted:,} for {accepted:,} -> {'HOLDS' if ok_once else 'MISSED'}")
    if a.profile:
        summary = summarize_profile(a.profile)
        Path(a.profile + ".top.txt").write_text(summary + "\n")
        print(f"profile ({loads[0].gen} load): {a.profile}, summary in {a.profile}.top.txt")
    print("RESULT " + json.dumps({"measure": f"concurrency: {a.clients} clients, accepted jobs/s",
                                  "target": f">= {TARGET_RATE:,.0f}/s", "figure": f"{best.rate:,.0f}/s"
                                  f" ({best.gen})", "ok": ok_rate}))
    print("RESULT " + json.dumps({"measure": "concurrency: every accepted job finished", "target": "all",
                                  "figure": f"{sum(ld.succeeded for ld in loads):,}/{accepted:,}",
                                  "ok": ok_done}))
    print("RESULT " + json.dumps({"measure": "concurrency: succeeded counter = jobs (each ran once)",
                                  "target": "equal", "figure": f"{counted:,}/{accepted:,}", "ok": ok_once}))


if __name__ == "__main__":
    main()

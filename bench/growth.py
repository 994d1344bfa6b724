"""A queue that only grows: submit rate, daemon memory and request latencies from 10k to 1M queued.

    python -m bench.growth [--jobs 1000000] [--batch 5000] [--quick]

One worker, kept busy by a blocker (service.demo:sleep 3600) so nothing leaves the queue,
then `--jobs` no-op jobs submitted in batches (POST /v1/jobs/batch). Measured:
  - the submit rate of the last tenth of the jobs against the first tenth (100k each at 1M);
  - the daemon's RSS, sampled every second in a thread, throughout (drain included);
  - median latencies (50 each) of GET /v1/jobs/{id} (a queued job), GET /v1/jobs?limit=100,
    GET /v1/jobs?state=queued&limit=100, DELETE /v1/jobs/{id} (a queued job), and for
    context POST /v1/jobs, GET /health, GET /metrics: at 10k queued and at full depth;
  - then the blocker is cancelled and the queue drained: the drain rate, and that every
    job finished (GET /health "queued" and "running", /metrics counters).
Targets (issue 7): last/first submit rate >= 0.8; daemon RSS <= 300 MiB throughout; latencies
must not grow much (the ratio full depth / 10k is printed; "holds" is <= 2x); all finished.
`--quick`: 100,000 jobs (the windows are then 10k each).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from bench.concurrency import Neighbours, others_between, snapshot, wait_quiet
from bench.harness import Conn, daemon

RATE_TARGET = 0.8
RSS_TARGET_MIB = 300.0
LATENCY_GROWTH_OK = 2.0
PROBES = 50  # requests of each kind per latency probe
SAMPLE_EVERY = 50  # keep one id in this many: the queued jobs latencies are measured on


class RssSampler(threading.Thread):
    """The daemon's RSS every second (the main process, and its whole tree for context)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float, float]] = []  # (t, daemon MiB, tree MiB)
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            try:
                main = self.proc.memory_info().rss
                tree = main
                for p in self.proc.children(recursive=True):
                    try:
                        tree += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.samples.append((time.monotonic() - t0, main / 2**20, tree / 2**20))
            except psutil.Error:
                return
            self.stop.wait(1.0)

    @property
    def peak(self) -> float:
        return max((s[1] for s in self.samples), default=0.0)

    @property
    def now(self) -> float:
        return self.samples[-1][1] if self.samples else 0.0


def _median_ms(c: Conn, n: int, make: Callable[[int], tuple[str, str, Any]], want: int) -> float:
    """Median ms of n requests (the answer read whole, and decoded when it is JSON)."""
    out = []
    for i in range(n):
        method, path, body = make(i)
        data = None if body is None else json.dumps(body).encode()
        t = time.perf_counter()
        c.c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.c.getresponse()
        raw = r.read()
        if r.getheader("Content-Type", "").startswith("application/json"):
            json.loads(raw)
        out.append(time.perf_counter() - t)
        assert r.status == want, (method, path, r.status, raw[:200])
    return statistics.median(out) * 1e3


def latencies(c: Conn, sample: list[str], n: int = PROBES) -> dict[str, float]:
    """Median ms of each request, `n` of each (adds n jobs, cancels n of the sampled ones)."""
    picks = random.sample(sample, n)
    chosen = set(picks)
    doomed = random.sample([i for i in sample if i not in chosen], n)
    for d in doomed:
        sample.remove(d)
    out = {
        "GET /v1/jobs/{id} (queued)": _median_ms(c, n, lambda i: ("GET", f"/v1/jobs/{picks[i]}", None), 200),
        "GET /v1/jobs?limit=100": _median_ms(c, n, lambda i: ("GET", "/v1/jobs?limit=100", None), 200),
        "GET /v1/jobs?state=queued&limit=100": _median_ms(
            c, n, lambda i: ("GET", "/v1/jobs?state=queued&limit=100", None), 200),
        "DELETE /v1/jobs/{id} (queued)": _median_ms(
            c, n, lambda i: ("DELETE", f"/v1/jobs/{doomed[i]}", None), 200),
        "POST /v1/jobs (one job)": _median_ms(
            c, n, lambda i: ("POST", "/v1/jobs", {"fn": "bench.jobs:noop", "args": [i]}), 202),
        "GET /health": _median_ms(c, n, lambda i: ("GET", "/health", None), 200),
        "GET /metrics": _median_ms(c, n, lambda i: ("GET", "/metrics", None), 200),
    }
    return out


TARGETED = ("GET /v1/jobs/{id} (queued)", "GET /v1/jobs?limit=100", "GET /v1/jobs?state=queued&limit=100",
            "DELETE /v1/jobs/{id} (queued)")


def store_counts(pid: int) -> dict[str, int]:
    """Jobs by state, read from the daemon's store file (read-only; the harness keeps it in the
    daemon's working directory)."""
    import sqlite3
    from pathlib import Path

    path = Path(f"/proc/{pid}/cwd").resolve() / "bench.db"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {str(s): int(n) for s, n in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
    finally:
        db.close()


def metric(text: str, name: str, labels: str = "") -> float:
    pat = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pat + r"$", text, re.M)
    return float(m.group(1)) if m else 0.0


def metrics_text(port: int) -> str:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", "/metrics")
        return c.getresponse().read().decode()
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000, help="jobs per POST /v1/jobs/batch (1,000-10,000)")
    ap.add_argument("--quick", action="store_true", help="100,000 jobs")
    a = ap.parse_args()
    if a.quick:
        a.jobs = 100_000
    window = a.jobs // 10
    shallow = 10_000
    print(f"growth: {a.jobs:,} no-op jobs in batches of {a.batch:,} behind a blocker, 1 worker", flush=True)
    wait_quiet(10 if a.quick else 60)
    with daemon(1, jobs={"max_queue": 2_000_000}, supervisor={"shutdown_grace": 2.0}) as (port, proc):
        rss = RssSampler(proc.pid)
        rss.start()
        c = Conn(port)
        status, blocker = c.call("POST", "/v1/jobs", {"fn": "service.demo:sleep", "args": [3600],
                                                     "timeout": 3600})
        assert status == 202, blocker
        while c.call("GET", f"/v1/jobs/{blocker['id']}")[1]["state"] != "running":
            time.sleep(0.05)
        sample: list[str] = []
        batches: list[tuple[int, int, float]] = []  # (jobs submitted before, jobs in it, seconds)
        daemon_proc = psutil.Process(proc.pid)
        snaps = [snapshot()]  # before each batch, and after the last: what neighbours used
        written = [daemon_proc.io_counters().write_chars]  # bytes the daemon wrote (WAL, db), likewise
        lat_shallow: dict[str, float] = {}
        submitted = 0
        t_start = time.perf_counter()
        next_report = t_start + 5
        with Neighbours() as nb_submit:
            while submitted < a.jobs:
                k = min(a.batch, a.jobs - submitted)
                specs = [{"fn": "bench.jobs:noop", "args": [submitted + j]} for j in range(k)]
                t = time.perf_counter()
                status, body = c.call("POST", "/v1/jobs/batch", {"jobs": specs})
                dt = time.perf_counter() - t
                assert status == 202, (status, body)
                sample += [j["id"] for j in body["jobs"][::SAMPLE_EVERY]]
                batches.append((submitted, k, dt))
                submitted += k
                snaps.append(snapshot())
                written.append(daemon_proc.io_counters().write_chars)
                if not lat_shallow and submitted >= shallow:
                    lat_shallow = latencies(c, sample)
                if time.perf_counter() >= next_report or submitted == a.jobs:
                    recent = batches[-20:]
                    rate = sum(b[1] for b in recent) / sum(b[2] for b in recent)
                    el = time.perf_counter() - t_start
                    print(f"  submitted {submitted:>9,}  recent {rate:>8,.0f} jobs/s  daemon RSS"
                          f" {rss.now:6.1f} MiB (peak {rss.peak:.1f})  {el:6.1f} s", flush=True)
                    next_report = time.perf_counter() + 5
        lat_deep = latencies(c, sample)
        status, health = c.call("GET", "/health")
        queued_deep = health["queued"]

        def rate_of(lo: int, hi: int) -> tuple[float, float, float]:
            """Jobs/s of the batches in [lo, hi), the cores neighbours used meanwhile, and the bytes
            the daemon wrote per job (its store's write amplification)."""
            idx = [i for i, b in enumerate(batches) if lo <= b[0] < hi]
            jobs = sum(batches[i][1] for i in idx)
            rate = jobs / sum(batches[i][2] for i in idx)
            per_job = (written[idx[-1] + 1] - written[idx[0]]) / jobs
            return rate, others_between(snaps[idx[0]], snaps[idx[-1] + 1]), per_job

        first, others_first, wr_first = rate_of(0, window)
        last, others_last, wr_last = rate_of(a.jobs - window, a.jobs)
        rss_submit_peak = rss.peak
        # drain: cancel the blocker, let the worker eat the queue
        status, _ = c.call("DELETE", f"/v1/jobs/{blocker['id']}")
        assert status == 200
        t_drain = time.perf_counter()
        next_report = t_drain + 5
        with Neighbours() as nb_drain:
            while True:
                _, h = c.call("GET", "/health")
                if h["queued"] == 0 and h["running"] == 0:
                    break
                if time.perf_counter() >= next_report:
                    done = queued_deep - h["queued"]
                    el = time.perf_counter() - t_drain
                    print(f"  draining: {h['queued']:>9,} queued, {done / el:8,.0f} jobs/s  daemon RSS"
                          f" {rss.now:6.1f} MiB (peak {rss.peak:.1f})  {el:6.1f} s", flush=True)
                    next_report = time.perf_counter() + 5
                time.sleep(0.2)
        drain_s = time.perf_counter() - t_drain
        text = metrics_text(port)
        succeeded = metric(text, "poold_jobs_finished_total", 'state="succeeded"')
        cancelled = metric(text, "poold_jobs_finished_total", 'state="cancelled"')
        depth = metric(text, "poold_queue_depth")
        _, left = c.call("GET", "/v1/jobs?state=queued&limit=1")
        c.close()
        stored = store_counts(proc.pid)
        rss.stop.set()
        rss.join()
    # each of the two probe rounds adds 50 jobs (single POSTs) and cancels 50 queued ones;
    # the blocker is cancelled too
    want_succeeded = a.jobs
    want_cancelled = 2 * PROBES + 1
    all_done = (depth == 0 and not left["jobs"] and stored.get("succeeded", 0) == want_succeeded
                and stored.get("cancelled", 0) == want_cancelled and len(stored) == 2)
    once = int(succeeded) == want_succeeded and int(cancelled) == want_cancelled
    ratio = last / first
    print(f"growth: {a.jobs:,} jobs, batches of {a.batch:,}")
    print(f"  submit rate: first {window:,} {first:,.0f} jobs/s (other programs used {others_first:.2f}"
          f" cores), last {window:,} {last:,.0f} jobs/s (others {others_last:.2f} cores);"
          f" queue depth at the end {queued_deep:,}")
    print(f"  bytes the daemon wrote per job submitted: first {window:,} {wr_first / 1024:.1f} KiB,"
          f" last {window:,} {wr_last / 1024:.1f} KiB")
    print(f"  whole submission: {a.jobs / sum(b[2] for b in batches):,.0f} jobs/s; {nb_submit.note()}")
    print(f"  daemon RSS: peak {rss.peak:.1f} MiB (while submitting {rss_submit_peak:.1f}), tree peak"
          f" {max(s[2] for s in rss.samples):.1f} MiB, {len(rss.samples)} samples")
    print(f"  latency (median of 50, ms)          at {shallow // 1000}k   at {a.jobs // 1000}k   ratio")
    worst = 0.0
    for k, v in lat_shallow.items():
        r = lat_deep[k] / v
        if k in TARGETED:
            worst = max(worst, r)
        print(f"    {k:36s} {v:7.2f} {lat_deep[k]:8.2f} {r:7.2f}{'' if k in TARGETED else '  (context)'}")
    print(f"  drain: {a.jobs:,} jobs in {drain_s:.1f} s = {a.jobs / drain_s:,.0f} jobs/s; succeeded"
          f" {int(succeeded):,} (want {want_succeeded:,}), cancelled {int(cancelled)}"
          f" (want {want_cancelled}), queue depth {depth:g}; {nb_drain.note()}")
    print(f"  in the store (read from its file) by state: {stored}; the finished counters counted each"
          f" job once: {'yes' if once else 'NO'}")
    ok_rate, ok_rss, ok_lat = ratio >= RATE_TARGET, rss.peak <= RSS_TARGET_MIB, worst <= LATENCY_GROWTH_OK
    print(f"target: last/first submit rate >= {RATE_TARGET}: {ratio:.2f}"
          f" -> {'HOLDS' if ok_rate else 'MISSED'}")
    print(f"target: daemon RSS <= {RSS_TARGET_MIB:.0f} MiB throughout: {rss.peak:.1f} MiB"
          f" -> {'HOLDS' if ok_rss else 'MISSED'}")
    print(f"target: latencies at {a.jobs // 1000}k / at 10k <= {LATENCY_GROWTH_OK:g}x: worst {worst:.2f}x"
          f" -> {'HOLDS' if ok_lat else 'MISSED'}")
    print(f"target: every job finished after the drain (store): {'HOLDS' if all_done else 'MISSED'};"
          f" finished counters = jobs: {'HOLDS' if once else 'MISSED'}")
    res = [(f"growth {a.jobs // 1000}k: submit rate last/first {window // 1000}k", f">= {RATE_TARGET}",
            f"{ratio:.2f}", ok_rate),
           ("growth: daemon RSS peak", f"<= {RSS_TARGET_MIB:.0f} MiB", f"{rss.peak:.1f} MiB", ok_rss),
           (f"growth: worst latency ratio {a.jobs // 1000}k/10k", f"<= {LATENCY_GROWTH_OK:g}x",
            f"{worst:.2f}x", ok_lat),
           ("growth: drain, all finished (store)", "all", f"{a.jobs / drain_s:,.0f} jobs/s", all_done),
           ("growth: finished counter = jobs", "equal", f"{int(succeeded):,}/{want_succeeded:,}", once)]
    for measure, target, figure, ok in res:
        print("RESULT " + json.dumps({"measure": measure, "target": target, "figure": figure, "ok": ok}))


if __name__ == "__main__":
    main()

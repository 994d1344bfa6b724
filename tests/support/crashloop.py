"""The crash loop under load, shared by bench and tests: no accepted job is lost.

`run()` drives any daemon with the `Controller` shape: submitter threads send jobs (single and
batched, some with retries, some with idempotency keys) while the daemon is SIGKILLed and started
again on the same store, then checks every invariant; `report()` prints its `Result`.
`python -m bench.crashloop` runs it against its own daemon, tests/e2e/test_reliability.py
against the test suite's `Daemon`.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

FN = "bench.jobs:record"


class Controller(Protocol):
    """What the crash loop needs of a daemon: tests/conftest.py's Daemon has the same shape."""

    port: int
    store: str

    def start(self) -> Any: ...  # returns once /health answers 200

    def kill(self) -> None: ...  # SIGKILL of the daemon process alone

    def stop(self) -> Any: ...  # SIGTERM, wait


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Http:
    """One keep-alive connection to the current daemon (reconnects after any failure)."""

    def __init__(self, ctl: Controller, timeout: float = 30) -> None:
        self.ctl, self.timeout = ctl, timeout
        self.c: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int | None, Any]:
        """(status, parsed body); (None, the exception) when no answer came."""
        try:
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.ctl.port, timeout=self.timeout)
            data = None if body is None else json.dumps(body).encode()
            self.c.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = self.c.getresponse()
            raw = r.read()
            try:
                return r.status, json.loads(raw) if raw else None
            except ValueError:
                return r.status, raw
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return None, e

    def close(self) -> None:
        if self.c is not None:
            self.c.close()
            self.c = None


@dataclass
class Job:
    id: str
    tag: str  # unique per spec: the record job's argument, so executions map to jobs
    retries: int
    key: str | None


@dataclass
class Book:
    """What the submitters and the poller saw (guarded by `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: dict[str, Job] = field(default_factory=dict)  # id -> the job the daemon answered for
    by_tag: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    by_key: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    first_final: dict[str, tuple[str, str, float]] = field(default_factory=dict)  # state, finished_at, seen
    requests: int = 0
    ambiguous: int = 0  # a submission without a key that got no answer (may or may not exist)
    refused: collections.Counter[int] = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)

    def note(self, job: dict[str, Any], spec: dict[str, Any]) -> None:
        tag = spec["args"][1]
        j = Job(job["id"], tag, spec.get("retries", 0), spec.get("key"))
        self.jobs.setdefault(j.id, j)
        self.by_tag[tag].add(j.id)
        if j.key is not None:
            self.by_key[j.key].add(j.id)
        if job.get("fn") != FN:
            self.unexpected.append(f"answer for {tag} names fn {job.get('fn')!r}")


def _spin(rng: random.Random) -> float:
    """Mostly instant jobs (the queue drains), some long enough that a kill finds them running."""
    r = rng.random()
    return 0.0 if r < 0.9 else 0.005 if r < 0.98 else 0.1


def _submitter(
    n: int, ctl: Controller, book: Book, stop: threading.Event, seed: int, record: str, must: int, run_id: str
) -> None:
    rng = random.Random(seed * 1000 + n)
    h = Http(ctl)
    seq = 0

    def spec(keyed: bool, retried: bool) -> dict[str, Any]:
        nonlocal seq
        seq += 1
        tag = f"{run_id}-{n}-{seq}"
        s: dict[str, Any] = {"fn": FN, "args": [record, tag, _spin(rng)]}
        if retried:
            s["retries"] = must
        if keyed:
            s["key"] = f"k-{tag}"
        return s

    try:
        while not stop.is_set():
            r = rng.random()
            if r < 0.8:
                keyed = 0.6 <= r
                specs = [spec(keyed, retried=rng.random() < (0.5 if keyed else 0.3))]
                path, body = "/v1/jobs", specs[0]
            else:
                keyed = rng.random() < 0.4
                specs = [spec(keyed, rng.random() < 0.3) for _ in range(rng.randint(2, 12))]
                path, body = "/v1/jobs/batch", {"jobs": specs}
            while True:  # keyed submissions are re-sent with the same keys until answered
                with book.lock:
                    book.requests += 1
                status, answer = h.call("POST", path, body)
                if status in (200, 202):
                    jobs = answer["jobs"] if path.endswith("batch") else [answer]
                    with book.lock:
                        if len(jobs) != len(specs):
                            book.unexpected.append(f"{len(specs)} specs, {len(jobs)} jobs answered")
                        for job, s in zip(jobs, specs, strict=False):
                            book.note(job, s)
                    break
                if status is not None and status != 503:
                    with book.lock:
                        book.unexpected.append(f"{path} answered {status}: {str(answer)[:300]}")
                    break
                with book.lock:
                    if status is not None:
                        book.refused[status] += 1
                    if not keyed:
                        book.ambiguous += status is None
                if not keyed or stop.is_set():
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.03))
    finally:
        h.close()


def _fetch_final(h: Http, ids: list[str], chunk: int = 1000) -> dict[str, dict[str, Any]] | None:
    """The finished jobs among ids (POST /v1/jobs/wait with timeout 0), or None when no answer."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), chunk):
        status, body = h.call("POST", "/v1/jobs/wait", {"ids": ids[i : i + chunk], "timeout": 0})
        if status != 200:
            return None
        for j in body["jobs"]:
            out[j["id"]] = j
    return out


def _poller(ctl: Controller, book: Book, stop: threading.Event) -> None:
    """Notes when a client first sees each job final (to date any execution after it)."""
    h = Http(ctl)
    try:
        while not stop.wait(0.2):
            with book.lock:
                pending = [i for i in book.jobs if i not in book.first_final]
            found = _fetch_final(h, pending)
            if not found:
                continue
            seen = time.time()
            with book.lock:
                for jid, j in found.items():
                    book.first_final.setdefault(jid, (j["state"], j["finished_at"], seen))
    finally:
        h.close()


@dataclass
class Result:
    accepted: int = 0
    keys: int = 0
    lost: list[str] = field(default_factory=list)  # answered for, then missing or never final
    ran_after_success: list[str] = field(default_factory=list)
    changed_after_final: list[str] = field(default_factory=list)
    retried_not_succeeded: list[str] = field(default_factory=list)
    key_duplicates: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    integrity: str = ""
    states: collections.Counter[str] = field(default_factory=collections.Counter)
    executions: int = 0
    reruns: int = 0  # jobs executed more than once (interrupted attempts): allowed
    over_retries: list[str] = field(default_factory=list)  # executed more than 1 + retries times
    orphan_executions: int = 0  # executions that started just after their daemon was SIGKILLed
    double_runs: list[str] = field(default_factory=list)  # a job's executions under way at once
    unknown_executions: int = 0  # executions of specs no answer named (ambiguous submissions)
    ambiguous: int = 0
    requests: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    restarts: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    load_seconds: float = 0.0
    settle_seconds: float = 0.0
    total_seconds: float = 0.0

    def ok(self) -> bool:
        return (
            not (
                self.lost
                or self.ran_after_success
                or self.changed_after_final
                or self.retried_not_succeeded
                or self.key_duplicates
                or self.unexpected
                or self.over_retries
                or self.double_runs
            )
            and self.integrity == "ok"
        )

    def problems(self) -> str:
        out = []
        for name in (
            "lost",
            "ran_after_success",
            "changed_after_final",
            "retried_not_succeeded",
            "key_duplicates",
            "unexpected",
            "over_retries",
            "double_runs",
        ):
            v = getattr(self, name)
            if v:
                out.append(f"{name} ({len(v)}): {v[:5]}")
        if self.integrity != "ok":
            out.append(f"integrity_check: {self.integrity}")
        return "; ".join(out)


def _double_runs(spans: dict[str, list[tuple[float, float | None]]], kills: list[float],
                 ended_by: float) -> list[str]:
    """Jobs with two executions under way at once. An execution with neither an end line nor a
    known length was cut off by the disruption that followed its start: it ended by that time +
    `ended_by` at the latest (0.25 s for a SIGKILL, whose workers die with it; a host's lease
    for a SIGSTOP)."""
    out = []
    for tag, runs in spans.items():
        if len(runs) < 2:
            continue
        closed = []
        for start, end in runs:
            if end is None:
                end = min((k for k in kills if k >= start), default=float("inf")) + ended_by
            closed.append((start, end))
        closed.sort()
        busy_until = closed[0][1]
        for start, end in closed[1:]:
            if start < busy_until:
                out.append(f"{tag}: a run until {busy_until:.3f}, another from {start:.3f}")
                break
            busy_until = max(busy_until, end)
    return out


def integrity(path: str) -> str:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return "; ".join(str(r[0]) for r in con.execute("PRAGMA integrity_check").fetchall())
    finally:
        con.close()


def run(
    ctl: Controller,
    *,
    record: str,
    submitters: int = 32,
    restarts: int = 20,
    up: tuple[float, float] = (1.0, 3.0),
    settle: float = 180.0,
    seed: int = 1,
    say: Callable[[str], None] = lambda s: None,
    ended_by: float = 0.25,
) -> Result:
    """The crash loop against a started daemon `ctl`; leaves it stopped. See the module docstring."""
    res = Result(restarts=restarts)
    book = Book()
    stop_submit, stop_poll = threading.Event(), threading.Event()
    must = restarts + 2  # retries a job needs to outlive every kill (each kill costs at most one attempt)
    run_id = uuid.uuid4().hex[:8]
    rng = random.Random(seed)
    kills: list[float] = []
    t0 = time.monotonic()
    threads = [
        threading.Thread(
            target=_submitter,
            name=f"submitter-{n}",
            daemon=True,
            args=(n, ctl, book, stop_submit, seed, record, must, run_id),
        )
        for n in range(submitters)
    ]
    poller = threading.Thread(target=_poller, args=(ctl, book, stop_poll), name="poller", daemon=True)
    for t in threads:
        t.start()
    poller.start()
    try:
        for i in range(restarts):
            time.sleep(rng.uniform(*up))
            kills.append(time.time())
            ctl.kill()
            t_kill = time.monotonic()
            ctl.start()
            res.restart_seconds.append(time.monotonic() - t_kill)
            say(f"restart {i + 1}/{restarts}: {len(book.jobs)} jobs answered for so far")
        time.sleep(rng.uniform(*up))
    finally:
        stop_submit.set()
        for t in threads:
            t.join(60)
    res.load_seconds = time.monotonic() - t0

    # every job answered for reaches a final state
    t1 = time.monotonic()
    h = Http(ctl)
    ids = list(book.jobs)
    final: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + settle
    while time.monotonic() < end:
        found = _fetch_final(h, [i for i in ids if i not in final])
        final.update(found or {})
        if len(final) == len(ids):
            break
        say(f"settling: {len(final)}/{len(ids)} jobs final")
        time.sleep(1.0)
    stop_poll.set()
    poller.join(30)
    res.settle_seconds = time.monotonic() - t1
    # ... and stays so across one more clean restart
    h.close()
    ctl.stop()
    ctl.start()
    after = _fetch_final(h, ids) or {}
    for jid in ids:
        if jid not in after:
            status, body = h.call("GET", f"/v1/jobs/{jid}")
            res.lost.append(f"{jid}: {status} {body if status != 200 else body.get('state')}")
    h.close()
    ctl.stop()
    # a PostgreSQL store has no file to check (the database keeps its own consistency)
    res.integrity = "ok" if ctl.store.startswith("postgresql") else integrity(ctl.store)

    # executions, one line each: "<job id> <start time> <pid> <tag> <spin>", and
    # "<job id> <end time> <pid> <tag> end" when it ended
    execs: dict[str, list[float]] = collections.defaultdict(list)
    spans: dict[str, list[tuple[float, float | None]]] = collections.defaultdict(list)
    with contextlib.suppress(FileNotFoundError), open(record) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5 and parts[4] != "end":
                execs[parts[3]].append(float(parts[1]))
                # a run cut off before its end line ended by its spin's end at the latest
                spans[parts[3]].append((float(parts[1]), float(parts[1]) + float(parts[4]) + 0.05))
            elif len(parts) == 5 and parts[4] == "end":
                runs = spans[parts[3]]
                for i in range(len(runs) - 1, -1, -1):  # the latest run of that job, ended here
                    if runs[i][1] is None or runs[i][0] <= float(parts[1]):
                        runs[i] = (runs[i][0], float(parts[1]))
                        break
    res.double_runs = _double_runs(spans, kills, ended_by)
    res.executions = sum(len(v) for v in execs.values())
    # no new daemon runs a job this soon after the kill (it is still importing): such an execution
    # is a worker of the killed daemon still going
    res.orphan_executions = sum(1 for v in execs.values() for s in v if any(k <= s < k + 0.25 for k in kills))
    res.unknown_executions = sum(len(v) for tag, v in execs.items() if tag not in book.by_tag)

    res.accepted, res.keys = len(ids), len(book.by_key)
    res.requests, res.ambiguous, res.refused = book.requests, book.ambiguous, dict(book.refused)
    res.unexpected = list(book.unexpected)
    for jid, j in book.jobs.items():
        job = after.get(jid)
        if job is None:
            continue
        res.states[
            job["state"] if job["state"] != "failed" else f"failed ({(job.get('error') or {}).get('type')})"
        ] += 1
        first = book.first_final.get(jid)
        if first is None and jid in final:
            first = (final[jid]["state"], final[jid]["finished_at"], 0.0)
        if first is not None and (first[0], first[1]) != (job["state"], job["finished_at"]):
            res.changed_after_final.append(f"{jid}: {first[:2]} then {job['state']} {job['finished_at']}")
        starts = execs.get(j.tag, [])
        res.reruns += len(starts) > 1
        if len(starts) > 1 + j.retries:
            res.over_retries.append(
                f"{jid}: retries {j.retries}, executed {len(starts)} times,"
                f" attempts {job['attempts']}, {job['state']}"
            )
        if job["state"] == "succeeded":
            done = epoch(job["finished_at"])
            seen = first[2] if first is not None and first[0] == "succeeded" and first[2] else float("inf")
            late = [s for s in starts if s > done or s > seen]
            if late:
                res.ran_after_success.append(
                    f"{jid} ({j.tag}): finished {job['finished_at']}, executions started at {sorted(starts)}"
                )
            if not starts:
                res.unexpected.append(f"{jid} ({j.tag}) succeeded without any recorded execution")
        if j.retries >= restarts + 1 and job["state"] != "succeeded":
            res.retried_not_succeeded.append(f"{jid}: {job['state']} {job.get('error')}")
    for key, kids in book.by_key.items():
        if len(kids) != 1:
            res.key_duplicates.append(f"{key}: {sorted(kids)}")
    res.total_seconds = time.monotonic() - t0
    return res


def report(res: Result) -> str:
    rs = sorted(res.restart_seconds) or [0.0]
    lines = [
        f"restarts (SIGKILL + start):       {res.restarts}",
        f"submit requests:                  {res.requests}"
        f" (refused: {res.refused or 'none'}, no answer without a key: {res.ambiguous})",
        f"jobs accepted (202, or 200 by key): {res.accepted} ({res.keys} idempotency keys)",
        f"jobs lost:                        {len(res.lost)}",
        f"run again after success:          {len(res.ran_after_success)}",
        f"changed after final:              {len(res.changed_after_final)}",
        f"retried jobs not succeeded:       {len(res.retried_not_succeeded)}",
        f"keys answered with two jobs:      {len(res.key_duplicates)}",
        f"final states:                     {dict(res.states)}",
        f"executions:                       {res.executions} ({res.reruns} jobs ran more than once,"
        f" {res.unknown_executions} of unanswered submissions)",
        f"executed more than 1 + retries times: {len(res.over_retries)} {res.over_retries[:3]}",
        f"executions by a killed daemon's worker (within 0.25 s of the kill): {res.orphan_executions}",
        f"jobs run twice at once:           {len(res.double_runs)} {res.double_runs[:3]}",
        f"integrity_check:                  {res.integrity}",
        f"time: load {res.load_seconds:.1f} s, settle {res.settle_seconds:.1f} s,"
        f" total {res.total_seconds:.1f} s;"
        f" restart (kill -> healthy) median {rs[len(rs) // 2]:.2f} s, max {rs[-1]:.2f} s",
    ]
    if not res.ok():
        lines.append("PROBLEMS: " + res.problems())
    return "\n".join(lines)

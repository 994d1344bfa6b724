"""A JobStore in plain dicts: the store's semantics without SQLite, for unit tests.

Every write is "committed" at once and nothing survives the process (`path` is
":memory:", so no start ledger is kept). Job JSON comes from the SQLite
backend's `job_json` over a row of the same shape, so both answer alike.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.model import FINAL_STATES, STATES, ErrorType, job_error
from service.store.base import Claimed, JobStore, NewJob, new_id
from service.store.sqlite.jobjson import job_json


@dataclass(slots=True)
class _Job:
    """One job, its fields in the SQLite table's column order (see row)."""

    seq: int
    id: str
    fn: str
    args: str
    kwargs: str
    state: str
    priority: int
    timeout: float
    retries: int
    attempts: int
    key: str | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    result: str | None = None
    error: str | None = None
    progress: str | None = None

    def row(self) -> tuple[Any, ...]:
        """The SQLite row shape that job_json splices."""
        return (self.seq, self.id, self.fn, self.args, self.kwargs, self.state, self.priority, self.timeout,
                self.retries, self.attempts, self.key, self.created_at, self.started_at, self.finished_at,
                self.worker, self.result, self.error, self.progress)

    def claimed(self) -> Claimed:
        return Claimed(self.seq, self.id, self.fn, self.args, self.kwargs, self.timeout, self.retries,
                       self.attempts, self.priority, self.key, self.created_at)


class MemoryStore:
    """service.store.base.JobStore over dicts; see the module docstring."""

    path = ":memory:"
    start_ledger = None
    claim_dequeues = False
    healthy = True
    last_error = ""

    def __init__(self) -> None:
        self._seq = 0
        self._jobs: dict[str, _Job] = {}  # by id, in seq order
        self._by_seq: dict[int, _Job] = {}
        self._keys: dict[str, _Job] = {}
        self._queue: dict[int, _Job] = {}  # the queued ones, by seq
        self._procs: list[tuple[int, float, str]] = []

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _set(self, j: _Job, state: str) -> None:
        """Every state change goes through here, so the queue index stays true."""
        j.state = state
        if state == "queued":
            self._queue[j.seq] = j
        else:
            self._queue.pop(j.seq, None)

    # -- transactions: nothing to wait for
    async def committed(self) -> None:
        return None

    def after_commit(self, cb: Callable[[], None]) -> None:
        try:
            asyncio.get_running_loop().call_soon(cb)
        except RuntimeError:  # no loop (a sync caller): nothing is pending, run it now
            cb()

    def repair(self) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def probe(self) -> bool:
        return True

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def find_key(self, key: str, progress: Any = None) -> str | None:
        j = self._keys.get(key)
        return None if j is None else self._json(j, progress)

    async def enqueue(self, jobs: list[NewJob], progress: Any = None) -> list[tuple[str, str, bool]]:
        return self.enqueue_many(jobs)

    # -- enqueue
    def by_key(self, key: str) -> tuple[Any, ...] | None:
        j = self._keys.get(key)
        return None if j is None else j.row()

    def enqueue_many(self, jobs: list[NewJob]) -> list[tuple[str, str, bool]]:
        out: list[tuple[str, str, bool]] = []
        now = time.time()
        for n in jobs:
            if n.key is not None and (old := self._keys.get(n.key)) is not None:
                out.append((old.id, job_json(old.row()), False))
                continue
            self._seq += 1
            j = _Job(self._seq, new_id(), n.fn, n.args, n.kwargs, "queued", n.priority, n.timeout, n.retries,
                     0, n.key, now)
            self._jobs[j.id] = self._by_seq[j.seq] = self._queue[j.seq] = j
            if n.key is not None:
                self._keys[n.key] = j
            out.append((j.id, job_json(j.row()), True))
        return out

    # -- the queue
    async def claim(self, limit: int, skip: set[str]) -> list[Claimed]:
        return self.next_queued(limit, skip)

    def release(self, jobs: list[Claimed]) -> None:
        pass  # still queued

    def next_queued(self, limit: int, skip: set[str]) -> list[Claimed]:
        order = sorted(self._queue.values(), key=lambda j: (-j.priority, j.seq))
        return [j.claimed() for j in order if j.id not in skip][:limit]

    def start(self, seq: int, started_at: float, worker: str) -> None:
        j = self._by_seq.get(seq)
        if j is None or j.state != "queued":
            return
        self._set(j, "running")
        j.started_at, j.worker, j.attempts = started_at, worker, j.attempts + 1
        j.progress = j.error = None

    def finish(self, c: Claimed, state: str, started_at: float, worker: str, start_written: bool, *,
               result_json: str | None = None, error: dict[str, Any] | None = None,
               progress: dict[str, Any] | None = None) -> None:
        j = self._by_seq.get(c.seq)
        # the attempt token: running with c.attempts + 1, or (start not written) queued with c.attempts
        if j is None or (j.state, j.attempts) != (("running", c.attempts + 1) if start_written
                                                   else ("queued", c.attempts)):
            return
        if not start_written:
            j.started_at, j.worker, j.attempts = started_at, worker, j.attempts + 1
        self._set(j, state)
        j.result, j.error, j.progress = result_json, _dumps(error), _dumps(progress)
        j.finished_at = time.time()

    def retry(self, seq: int, error: dict[str, Any], *, attempts: int | None = None) -> None:
        j = self._by_seq.get(seq)
        if j is None or j.state != "running" or (attempts is not None and j.attempts != attempts + 1):
            return
        self._set(j, "queued")
        j.error = json.dumps(error)

    async def cancel(self, jid: str, progress: dict[str, Any] | None = None, *,
                     queued_only: bool = False) -> str | None:
        j = self._jobs.get(jid)
        if j is None or j.state not in ("queued", "running") or (queued_only and j.state == "running"):
            return None if j is None else j.state
        left = j.state
        self._set(j, "cancelled")
        j.finished_at = time.time()
        if progress is not None:
            j.progress = json.dumps(progress)
        return left

    async def recover(self, started: dict[int, tuple[int, float]] | None = None) -> tuple[int, int]:
        for seq, (attempts, t) in (started or {}).items():
            j = self._by_seq.get(seq)
            if j is not None and j.state == "queued" and j.attempts == attempts:
                self._set(j, "running")
                j.attempts, j.started_at = j.attempts + 1, t
        err = json.dumps(job_error(ErrorType.INTERRUPTED, "the daemon stopped while the job ran"))
        retried = failed = 0
        now = time.time()
        for j in [j for j in self._jobs.values() if j.state == "running"]:
            j.error = err
            if j.attempts <= j.retries:
                self._set(j, "queued")
                retried += 1
            else:
                self._set(j, "failed")
                j.finished_at = now
                failed += 1
        return retried, failed

    async def expire(self, ttl: float) -> int:
        cutoff = time.time() - ttl
        old = [j for j in self._jobs.values() if j.finished_at is not None and j.finished_at < cutoff]
        for j in old:
            del self._jobs[j.id], self._by_seq[j.seq]
            self._queue.pop(j.seq, None)
            if j.key is not None:
                del self._keys[j.key]
        return len(old)

    # -- reads
    def _json(self, j: _Job, progress: Any) -> str:
        return job_json(j.row(), progress(j.id) if progress and j.state == "running" else None)

    async def get_json(self, jid: str, progress: Any = None) -> tuple[str, str] | None:
        j = self._jobs.get(jid)
        return None if j is None else (j.state, self._json(j, progress))

    async def get(self, jid: str) -> dict[str, Any] | None:
        found = await self.get_json(jid)
        return None if found is None else dict(json.loads(found[1]))

    async def list_json(self, state: str | None, limit: int, progress: Any = None) -> list[str]:
        out: list[str] = []
        for j in reversed(self._jobs.values()):
            if len(out) == limit:
                break
            if state is None or j.state == state:
                out.append(self._json(j, progress))
        return out

    async def states(self, ids: list[str]) -> dict[str, str]:
        return {i: self._jobs[i].state for i in ids if i in self._jobs}

    async def finished_json(self, ids: list[str]) -> list[str]:
        found = (self._jobs.get(i) for i in dict.fromkeys(ids))
        return [job_json(j.row()) for j in found if j is not None and j.state in FINAL_STATES]

    def state_of(self, jid: str) -> str | None:
        j = self._jobs.get(jid)
        return None if j is None else j.state

    async def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for j in self._jobs.values():
            out[j.state] = out.get(j.state, 0) + 1
        return out

    # -- process records
    async def record_processes(self, procs: list[tuple[int, float, str]]) -> None:
        self._procs = [(p, c, r) for (p, c), r in {(p, c): r for p, c, r in procs}.items()]

    async def recorded_processes(self) -> list[tuple[int, float, str]]:
        return list(self._procs)


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


if TYPE_CHECKING:  # mypy holds the backend to the protocol
    _check: JobStore = MemoryStore()

"""The protocol every job store backend implements, and the records it trades in.

The queue, HTTP and daemon layers talk to the store only through `JobStore`.
SQLite (service.store.sqlite) is the embedded default; memory
(service.store.memory) is for unit tests; PostgreSQL comes next. Every
backend passes tests/unit/test_store_contract.py.

The operations that may need the network are coroutines. The writes of a
running job (start, finish, retry, release) are plain calls: they are
gathered and committed together, and readers see them once committed, which
`committed()` and `after_commit()` wait for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol


class StoreError(Exception):
    """The store cannot be written or reached (read-only, full, gone, the database down)."""


def new_id() -> str:
    """32 hex digits, time-ordered (nanoseconds, then random): inserts land at the end of the id
    index instead of on a random page, so submitting stays fast however many jobs are kept."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


class NewJob(NamedTuple):
    """A validated JobSpec, ready to enqueue."""

    fn: str
    args: str  # JSON text
    kwargs: str
    timeout: float
    priority: int = 0
    retries: int = 0
    key: str | None = None


class Claimed(NamedTuple):
    """What a worker needs to run one job."""

    seq: int
    id: str
    fn: str
    args: str  # JSON text, decoded by the worker
    kwargs: str
    timeout: float
    retries: int
    attempts: int  # attempts before this one: the job holds attempts + 1 once started (the attempt token)
    priority: int
    key: str | None
    created_at: float


class JobStore(Protocol):
    """Named operations on the jobs; a backend keeps their meaning, not their SQL."""

    @property
    def path(self) -> str:
        """Where the jobs live; ":memory:" when nothing survives the process (no start ledger)."""
        ...

    @property
    def start_ledger(self) -> str | None:
        """Where the workers' start ledger lives (service.engine.ledger), None without one: a
        backend that writes each start before the job reaches a worker needs none."""
        ...

    @property
    def claim_dequeues(self) -> bool:
        """True when a claim takes the job out of `queued` at once (PostgreSQL); False when a
        claimed job counts as queued until it starts (SQLite)."""
        ...

    @property
    def queued(self) -> int:
        """How many jobs are queued, as this process last wrote them (admission and batch sizes)."""
        ...

    # -- transactions and health
    @property
    def healthy(self) -> bool:
        """False while writes are refused (they wait and are replayed)."""
        ...

    @property
    def last_error(self) -> str:
        """Why the last write was refused ("" when healthy)."""
        ...

    async def committed(self) -> None:
        """Returns once everything written so far is durable (raises StoreError if it failed)."""
        ...

    def after_commit(self, cb: Callable[[], None]) -> None:
        """Runs cb once what was written so far is durable."""
        ...

    def repair(self) -> None:
        """Periodic: undoes damage from outside and replays writes that were refused."""
        ...

    def checkpoint(self) -> None:
        """Periodic, run in a thread: slow durability upkeep kept off the event loop."""
        ...

    def probe(self) -> bool:
        """Can the store be written right now?"""
        ...

    def close(self) -> None:
        """Makes pending writes durable and lets go of the store."""
        ...

    async def aclose(self) -> None:
        """close() for backends that must wait to let go (a connection pool)."""
        ...

    # -- enqueue (durable on return)
    async def find_key(self, key: str, progress: Any = None) -> str | None:
        """The Job JSON of the kept job with this idempotency key."""
        ...

    async def enqueue(self, jobs: list[NewJob], progress: Any = None) -> list[tuple[str, str, bool]]:
        """Queues jobs, or finds the kept job with the same key; (id, Job JSON, created) each,
        committed on return. A key's kept job is given as it is now."""
        ...

    # -- the queue
    async def claim(self, limit: int, skip: set[str]) -> list[Claimed]:
        """Up to `limit` queued jobs by priority (highest first) then age, now this host's to run
        until they end, are retried or released. `skip`: ids this host holds already (a backend
        whose claim leaves the job queued, SQLite's, needs them)."""
        ...

    def release(self, jobs: list[Claimed]) -> None:
        """Claimed jobs that never started go back to the queue as they were."""
        ...

    def start(self, seq: int, started_at: float, worker: str) -> None:
        """A claimed job's attempt began: running, the attempt counted (`worker` is JSON text)."""
        ...

    def finish(self, c: Claimed, state: str, started_at: float, worker: str, start_written: bool, *,
               result_json: str | None = None, error: dict[str, Any] | None = None,
               progress: dict[str, Any] | None = None) -> None:
        """The attempt `c` ends in a final state; discarded unless the job is still that attempt's.

        `start_written` False: its start was never written; the end counts the attempt too.
        """
        ...

    def retry(self, seq: int, error: dict[str, Any], *, attempts: int | None = None) -> None:
        """running → queued again (a failed attempt with retries left), keeping the error.

        `attempts`: the failed attempt's `Claimed.attempts`; the retry is discarded when the job
        holds another attempt (None: whatever attempt runs).
        """
        ...

    async def cancel(self, jid: str, progress: dict[str, Any] | None = None, *,
                     queued_only: bool = False) -> str | None:
        """queued or running → cancelled. The state it was in (a final one: nothing changed);
        None if there is no such job. `queued_only`: a job whose attempt began is left running."""
        ...

    async def recover(self, started: dict[int, tuple[int, float]] | None = None) -> tuple[int, int]:
        """At start: a previous instance's running jobs are retried or failed as interrupted;
        (retried, failed). `started`: seq → (attempts, time) of attempts begun but maybe unrecorded."""
        ...

    async def expire(self, ttl: float) -> int:
        """Forgets jobs that finished more than ttl seconds ago; how many."""
        ...

    # -- reads (committed data only)
    async def get_json(self, jid: str, progress: Any = None) -> tuple[str, str] | None:
        """(state, Job JSON) of one job; `progress(id)` may give live progress JSON for a running one."""
        ...

    async def get(self, jid: str) -> dict[str, Any] | None:
        """One job as a dict (tests and tools)."""
        ...

    async def list_json(self, state: str | None, limit: int, progress: Any = None) -> list[str]:
        """Up to `limit` jobs (of `state`, if given) newest first, as Job JSON texts."""
        ...

    async def states(self, ids: list[str]) -> dict[str, str]:
        """{id: state} for the known ids among `ids`."""
        ...

    async def finished_json(self, ids: list[str]) -> list[str]:
        """The finished jobs among `ids`, as Job JSON texts (in no particular order)."""
        ...

    async def counts(self) -> dict[str, int]:
        """Jobs per state, every state present."""
        ...

    # -- process records (a previous instance's leftovers)
    async def record_processes(self, procs: list[tuple[int, float, str]]) -> None:
        """Replaces the recorded (pid, create time, role) of this instance's processes."""
        ...

    async def recorded_processes(self) -> list[tuple[int, float, str]]:
        """The processes recorded last, maybe by a previous instance."""
        ...


class Cluster(Protocol):
    """The hosts sharing one store (PostgreSQL): what GET /v1/hosts and /v1/workers?all=true show."""

    async def listing(self) -> list[dict[str, Any]]:
        """Every host: name, started_at, last_seen, workers, running, state."""
        ...

    async def workers(self) -> list[dict[str, Any]]:
        """The workers of every live host, as each last reported them."""
        ...

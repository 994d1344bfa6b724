"""The protocol every job store backend implements, and the records it trades in.

The queue, HTTP and daemon layers talk to the store only through `JobStore`.
SQLite (service.store.sqlite) is the embedded default, PostgreSQL
(service.store.postgres) the shared one. Every backend passes
tests/unit/test_store_contract.py.

The operations that may need the network are coroutines. The writes of a
running job (start, finish, retry, release) are plain calls: they are
gathered and committed together, and readers see them once committed, which
`committed()` and `after_commit()` wait for.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from service.model import FINAL_STATES, ErrorType, State, job_error


class StoreError(Exception):
    """The store cannot be written or reached (read-only, full, gone, the database down)."""


def new_id() -> str:
    """32 hex digits, time-ordered (nanoseconds, then random): inserts land at the end of the id
    index instead of on a random page, so submitting stays fast however many jobs are kept."""
    return f"{time.time_ns():016x}{os.urandom(8).hex()}"


class Fired(NamedTuple):
    """The schedule tick that made a job (Job.schedule)."""

    name: str
    fire_at: float


class NewJob(NamedTuple):
    """A validated JobSpec, ready to enqueue."""

    fn: str
    args: str  # JSON text
    kwargs: str
    timeout: float
    priority: int = 0
    retries: int = 0
    key: str | None = None
    run_at: float | None = None  # epoch seconds; None (or a time past): due at once
    after: tuple[str, ...] = ()  # job ids, or "#N": the job of the call's N-th NewJob
    after_failure: str = "fail"  # or "run"
    retry_delay: float = 0.0
    unique_while: str = "kept"  # or "active"
    schedule: Fired | None = None


class Cap(NamedTuple):
    """`[jobs] concurrency`: at most `limit` jobs of the functions `pattern` matches run at once.
    `held`: how many of them this host holds (claimed or running)."""

    pattern: str  # "module:name", or "module:*"
    limit: int
    held: int = 0

    def matches(self, fn: str) -> bool:
        return fn == self.pattern or (self.pattern.endswith(":*") and fn.startswith(self.pattern[:-1]))


class Resolved(NamedTuple):
    """What a pass over ended dependencies changed: jobs now queued, jobs failed without running."""

    queued: int
    failed: list[str]


class ScheduleRow(NamedTuple):
    """A periodic schedule as the store keeps it: the definition (canonical JSON text, written by
    the latest start or reload), and what was decided: ticks up to `last_tick` are fired or
    skipped."""

    name: str
    definition: str
    paused: bool
    last_tick: float
    last_fire_at: float | None
    last_job: str | None


class Fire(StrEnum):
    """The outcome of one tick."""

    FIRED = "fired"
    TAKEN = "taken"  # decided already (by another host, or before a restart)
    OVERLAP = "overlap"  # skipped: the schedule's last job has not ended


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
    retry_delay: float = 0.0
    # shown in the Job (its JSON is made from this once it ends)
    scheduled_at: float | None = None
    after: str | None = None  # JSON text
    after_failure: str = "fail"
    unique_while: str = "kept"
    schedule_name: str | None = None
    schedule_fire_at: float | None = None

    def shown(self) -> tuple[Any, ...]:
        """The Job columns after `progress` (service.store.jobjson.COLUMNS)."""
        return (self.scheduled_at, self.after, self.after_failure, self.retry_delay, self.unique_while,
                self.schedule_name, self.schedule_fire_at)


CLAIMED = ("seq, id, fn, args, kwargs, timeout, retries, attempts, priority, key, created_at, retry_delay,"
           " scheduled_at, after, after_failure, unique_while, schedule_name, schedule_fire_at")


class UnknownDependency(Exception):
    """`after` names a job the store does not have (422 naming it)."""

    def __init__(self, index: int, jid: str) -> None:
        super().__init__(f"after: no job {jid[:200]!r}")
        self.index, self.jid = index, jid


def first_state(i: int, j: NewJob, after: list[str], states: dict[str, str],
                now: float) -> tuple[str, list[str], str | None]:
    """A new job's state, the dependencies it waits for, and its error (JSON text) when one of
    them has failed already. `i`: its index in the enqueue call; `states`: those of `after`."""
    pending = []
    for d in after:
        st = states.get(d)
        if st is None:
            raise UnknownDependency(i, d)
        if st == State.SUCCEEDED or (st in FINAL_STATES and j.after_failure == "run"):
            continue
        if st in FINAL_STATES:
            return State.FAILED, [], json.dumps(job_error(ErrorType.DEPENDENCY_FAILED,
                                                          f"dependency {d} ended {st}"))
        pending.append(d)
    if pending:
        return State.WAITING, pending, None
    if j.run_at is not None and j.run_at > now:
        return State.SCHEDULED, [], None
    return State.QUEUED, [], None


def admit(jobs: list[Claimed], caps: list[Cap], limit: int) -> tuple[list[Claimed], list[Cap], bool]:
    """Of `jobs` (in claim order), the first `limit` that no cap refuses; the caps counting them
    too; whether a cap refused one."""
    taken: list[Claimed] = []
    refused = False
    for c in jobs:
        if len(taken) >= limit:
            break
        hit = [i for i, cap in enumerate(caps) if cap.matches(c.fn)]
        if any(caps[i].held >= caps[i].limit for i in hit):
            refused = True
            continue
        for i in hit:
            caps[i] = caps[i]._replace(held=caps[i].held + 1)
        taken.append(c)
    return taken, caps, refused


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
    async def find_key(self, key: str, progress: Any = None, active_only: bool = False) -> str | None:
        """The Job JSON of the job holding this idempotency key: the newest kept one, or with
        `active_only` the one not ended (unique_while = "active")."""
        ...

    async def enqueue(self, jobs: list[NewJob], progress: Any = None) -> list[tuple[str, str, bool]]:
        """Queues jobs (or schedules them, or makes them wait for `after`), or finds the job
        holding the same key; (id, Job JSON, created) each, committed on return. A key's job is
        given as it is now. An unknown id in `after` is ApiError 422 naming it."""
        ...

    # -- the queue
    async def claim(self, limit: int, skip: set[str], caps: Sequence[Cap] = ()) -> list[Claimed]:
        """Up to `limit` queued jobs by priority (highest first) then age, now this host's to run
        until they end, are retried or released. `skip`: ids this host holds already (a backend
        whose claim leaves the job queued, SQLite's, needs them). `caps`: no claim takes a
        function past its concurrency limit (on a shared store, counted over every host)."""
        ...

    async def promote(self, now: float) -> int:
        """scheduled → queued for the jobs due by `now`; how many."""
        ...

    async def resolve(self) -> Resolved:
        """Waiting jobs whose dependencies ended: queued (or scheduled), or failed
        `dependency_failed`, down the graph."""
        ...

    async def next_due(self) -> float | None:
        """When the earliest scheduled job is due (None: none is)."""
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

    def retry(self, seq: int, error: dict[str, Any], *, attempts: int | None = None,
              due: float | None = None) -> None:
        """running → queued again (a failed attempt with retries left), keeping the error; with
        `due`, scheduled until then (retry_delay).

        `attempts`: the failed attempt's `Claimed.attempts`; the retry is discarded when the job
        holds another attempt (None: whatever attempt runs).
        """
        ...

    async def cancel(self, jid: str, progress: dict[str, Any] | None = None, *,
                     queued_only: bool = False) -> str | None:
        """scheduled, waiting, queued or running → cancelled. The state it was in (a final one:
        nothing changed); None if there is no such job. `queued_only`: a job whose attempt began
        is left running."""
        ...

    # -- periodic schedules
    async def sync_schedules(self, defs: dict[str, str], now: float) -> None:
        """Makes `defs` (name → definition) the schedules: a new or changed one is decided up to
        `now` (it first fires at its next tick) and unpaused; one not in `defs` is dropped."""
        ...

    async def schedules(self) -> list[ScheduleRow]:
        """Every schedule, by name."""
        ...

    async def fire(self, name: str, tick: float, job: NewJob, overlap: bool) -> tuple[Fire, str | None]:
        """Decides tick `tick` of schedule `name` once, whatever the hosts and restarts: enqueues
        `job` (unless `overlap` is False and the schedule's last job has not ended) in the same
        transaction as the record of the tick. The outcome and the new job's id."""
        ...

    async def skip_ticks(self, name: str, upto: float) -> None:
        """Ticks up to `upto` are decided: skipped."""
        ...

    async def pause(self, name: str, paused: bool, now: float) -> bool:
        """Pauses or resumes a schedule (a resumed one first fires at its next tick); False if
        there is no such schedule."""
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

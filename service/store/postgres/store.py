"""The job store on PostgreSQL: several hosts, one queue (service.store.base.JobStore).

A job is claimed (`queued → running` under this instance's id, FOR UPDATE SKIP
LOCKED) before it is handed to a worker, and every end of its attempt is written
`WHERE claim = this instance AND attempts = that attempt`: a host that lost the job
(declared dead, its job rescued by another host) has its late answer discarded.
The writes of running jobs (start, finish, retry, release) are gathered and
committed together, as SQLite's group commit does, and kept for the next try when
the database cannot be reached. Other hosts hear of new, ended and cancelled jobs
by NOTIFY (service.store.postgres.listener).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from service.model import FINAL_STATES, STATES, ErrorType, job_error
from service.store.base import Claimed, JobStore, NewJob, StoreError, new_id
from service.store.postgres import notices
from service.store.postgres import queries as q
from service.store.postgres.hosts import Hosts
from service.store.postgres.schema import connect_pool, migrate
from service.store.postgres.writes import Op, Writes
from service.store.sqlite.jobjson import job_json

log = logging.getLogger("poold.store")
# the pool's own retries while the database is away would log a traceback each: the store says it once
logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)

# the database cannot be reached (down, restarting, cut off) or refused for now (a deadlock, a
# serialization failure, too many connections, read-only): 503 store_unavailable, retried
_FAILURES = (OSError, asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError,
             asyncpg.InterfaceError, TimeoutError, asyncpg.TransactionRollbackError,
             asyncpg.InsufficientResourcesError, asyncpg.ReadOnlySQLTransactionError,
             asyncpg.InternalClientError)  # (a connection cut in mid-transaction can end in this)


class PgStore:
    """See the module docstring. `open()` before use; `instance` is this start's claim token."""

    start_ledger = None  # every start is in the database before the job reaches a worker
    claim_dequeues = True  # a claimed job is running in the database at once

    def __init__(self, url: str, schema: str, where: str, host_name: str) -> None:
        self._url, self.schema, self.path, self.host_name = url, schema, where, host_name
        self.instance = new_id()
        self.channel = notices.channel(schema)
        self.pool: asyncpg.Pool | None = None
        self.beats: asyncpg.Pool | None = None  # heartbeats' own connection: never queued behind requests
        self.healthy, self.last_error = True, ""
        self._queued = 0
        self.writes = Writes(self.tx, self.channel, self.instance, self._set_queued)
        self.hosts = Hosts(self)
        self._claiming = self._claims = 0  # claims in flight, and made so far (unstarted_claims)

    # -- life
    async def open(self) -> None:
        try:
            self.pool = await connect_pool(self._url, self.schema)
            self.beats = await connect_pool(self._url, self.schema, size=1)
            await migrate(self.pool, self.schema)
            await self.refresh_queued()
            await self.hosts.register()
        except _FAILURES as e:
            for pool in (self.pool, self.beats):
                if pool is not None:
                    await pool.close()
            raise StoreError(f"cannot use the database {self.path}: {_say(e)}") from None

    @property
    def queued(self) -> int:
        return self._queued

    def _set_queued(self, n: int) -> None:
        self._queued = n

    async def refresh_queued(self) -> None:
        """The cluster's queued count (another host's submits are not seen otherwise)."""
        self._queued = int(await self.fetchval(q.COUNT_QUEUED))

    def _failed(self, e: BaseException) -> StoreError:
        if self.healthy:
            log.error("the database cannot be reached: %s", _say(e))
        self.healthy, self.last_error = False, _say(e)
        return StoreError(self.last_error)

    def _ok(self) -> None:
        if not self.healthy:
            log.info("the database is reachable again")
        self.healthy, self.last_error = True, ""

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        assert self.pool is not None
        try:
            rows: list[asyncpg.Record] = await self.pool.fetch(sql, *args)
        except _FAILURES as e:
            raise self._failed(e) from None
        self._ok()
        return rows

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def tx(self, body: Callable[[asyncpg.Connection], Any], *, beats: bool = False) -> Any:
        """Runs `await body(conn)` in one transaction; a failure to reach the database is StoreError.
        `beats`: on the heartbeats' connection."""
        pool = self.beats if beats else self.pool
        assert pool is not None
        try:
            async with pool.acquire() as conn, conn.transaction():
                out = await body(conn)
        except _FAILURES as e:
            raise self._failed(e) from None
        self._ok()
        return out

    # -- gathered writes (service.store.postgres.writes)
    async def committed(self) -> None:
        await self.writes.committed()

    def after_commit(self, cb: Callable[[], None]) -> None:
        self.writes.after_commit(cb)

    def repair(self) -> None:
        pass  # the pool reconnects by itself; pending writes retry on their own

    def checkpoint(self) -> None:
        pass

    def probe(self) -> bool:
        return self.healthy

    def close(self) -> None:
        pass  # see aclose

    async def settle(self, patience: float) -> bool:
        """Waits up to `patience` seconds for every write so far to commit; whether they did."""
        return await self.writes.settle(patience)

    async def aclose(self) -> None:
        if not await self.settle(10.0):
            log.error("%d job changes could not be written before the store closed", self.writes.pending)
        await self.writes.close()
        for pool in (self.pool, self.beats):
            if pool is not None:
                await pool.close()

    # -- enqueue
    async def find_key(self, key: str, progress: Any = None) -> str | None:
        rows = await self.fetch(q.BY_KEYS, [key])
        return _json(rows[0], progress) if rows else None

    async def enqueue(self, jobs: list[NewJob], progress: Any = None) -> list[tuple[str, str, bool]]:
        now = time.time()
        first: dict[str, int] = {}  # key -> index of its first job in this call (it wins)
        fresh: list[tuple[int, str, NewJob]] = []
        for i, j in enumerate(jobs):
            if j.key is not None and j.key in first:
                continue
            if j.key is not None:
                first[j.key] = i
            fresh.append((i, new_id(), j))
        cols = list(zip(*[(jid, j.fn, j.args, j.kwargs, "queued", j.priority, j.timeout, j.retries, j.key,
                           now) for _, jid, j in fresh], strict=True))

        async def body(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
            made = await conn.fetch(q.INSERT_JOBS, *cols)
            if made:
                await conn.execute(q.NOTIFY, self.channel, "q")
            made_ids = {r["id"] for r in made}
            lost = [j.key for _, jid, j in fresh if jid not in made_ids and j.key is not None]
            kept = await conn.fetch(q.BY_KEYS, lost) if lost else []
            return made, kept

        if not fresh:
            return []
        made, kept = await self.tx(body)
        self._queued += len(made)
        by_id = {r["id"]: _json(r) for r in made}
        by_key = {r["key"]: (r["id"], _json(r, progress)) for r in kept}
        out: list[tuple[str, str, bool]] = [("", "", False)] * len(jobs)
        for i, jid, j in fresh:
            if jid in by_id:
                out[i] = (jid, by_id[jid], True)
            elif j.key in by_key:  # kept by another job (maybe another host's, a moment ago)
                out[i] = (*by_key[j.key], False)
            else:  # its key's job expired between the two statements: rare; say it plainly
                raise StoreError(f"the job with key {j.key!r} changed while it was submitted; submit again")
        for i, j in enumerate(jobs):
            if j.key is not None and first[j.key] != i:
                jid, text, _ = out[first[j.key]]
                out[i] = (jid, text, False)
        return out

    # -- the queue
    async def claim(self, limit: int, skip: set[str]) -> list[Claimed]:
        self._claiming += 1
        self._claims += 1
        try:
            if self.writes.requeued:  # this host's pending retries and releases first: claimable again
                await self.committed()
            rows = await self.fetch(q.CLAIM, limit, self.instance)
        finally:
            self._claiming -= 1
        self._queued = max(0, self._queued - len(rows))
        return sorted((Claimed(*r) for r in rows), key=lambda c: (-c.priority, c.seq))

    async def unstarted_claims(self) -> list[Claimed] | None:
        """This instance's claimed jobs that never started, for the caller to release those it
        does not hold: a claim the database took whose answer was lost on the way (the
        connection cut) would hold them for good. None when a claim ran meanwhile (its jobs
        may be on their way to a worker), or a write was pending (a job that ended may not show
        its start yet): ask again later."""
        before = (self._claims, self.writes.written)
        if self._claiming or self.writes.pending:
            return None
        rows = await self.fetch(q.UNSTARTED, self.instance)
        if self._claiming or (self._claims, self.writes.written) != before:
            return None
        return [Claimed(*r) for r in rows]

    def release(self, jobs: list[Claimed]) -> None:
        for c in jobs:
            self.writes.add(Op(q.RELEASE, (c.seq, c.attempts + 1, self.instance)), requeues=True)

    def start(self, seq: int, started_at: float, worker: str) -> None:
        self.writes.add(Op(q.START, (seq, started_at, worker, self.instance)))

    def finish(self, c: Claimed, state: str, started_at: float, worker: str, start_written: bool, *,
               result_json: str | None = None, error: dict[str, Any] | None = None,
               progress: dict[str, Any] | None = None) -> None:
        self.writes.add(Op(q.FINISH, (state, result_json, _dumps(error), _dumps(progress), time.time(),
                                      started_at, worker, c.seq, c.attempts + 1, self.instance)), ended=c.id)

    def retry(self, seq: int, error: dict[str, Any], *, attempts: int | None = None) -> None:
        token = None if attempts is None else attempts + 1
        self.writes.add(Op(q.RETRY, (seq, json.dumps(error), self.instance, token)), requeues=True)

    async def cancel(self, jid: str, progress: dict[str, Any] | None = None, *,
                     queued_only: bool = False) -> str | None:
        await self.committed()  # an end of the job written here a moment ago comes first

        async def body(conn: asyncpg.Connection) -> str | None:
            row = await conn.fetchrow(q.CANCEL_LOCK, jid)
            if row is None:
                return None
            seq, state, began, _ = row
            if state not in ("queued", "running") or (queued_only and state == "running" and began):
                return str(state)
            await conn.execute(q.CANCEL, seq, time.time(), _dumps(progress))
            for payload in notices.encode("c" if state == "running" else "e", [jid]):
                await conn.execute(q.NOTIFY, self.channel, payload)
            return str(state)

        left: str | None = await self.tx(body)
        if left == "queued":
            self._queued = max(0, self._queued - 1)
        return left

    async def recover(self, started: dict[int, tuple[int, float]] | None = None) -> tuple[int, int]:
        """Claims no live host holds (a previous instance's, once its row was taken over)."""
        err = json.dumps(job_error(ErrorType.INTERRUPTED, "the daemon stopped while the job ran"))
        rows = await self.fetch(q.RESCUE_ORPHANS, err, time.time())
        return _tally(rows)

    async def expire(self, ttl: float) -> int:
        return int((await self.fetchval(
            "WITH gone AS (" + q.EXPIRE + " RETURNING 1) SELECT count(*) FROM gone", time.time() - ttl)) or 0)

    # -- reads
    async def get_json(self, jid: str, progress: Any = None) -> tuple[str, str] | None:
        rows = await self.fetch(q.GET, jid)
        return (rows[0]["state"], _json(rows[0], progress)) if rows else None

    async def get(self, jid: str) -> dict[str, Any] | None:
        found = await self.get_json(jid)
        return None if found is None else dict(json.loads(found[1]))

    async def list_json(self, state: str | None, limit: int, progress: Any = None) -> list[str]:
        if state is None:
            rows = await self.fetch(q.LIST, limit)
        else:
            rows = await self.fetch(q.LIST_STATE, state, limit)
        return [_json(r, progress) for r in rows]

    async def states(self, ids: list[str]) -> dict[str, str]:
        return {r[0]: r[1] for r in await self.fetch(q.STATES, ids)} if ids else {}

    async def finished_json(self, ids: list[str]) -> list[str]:
        return [_json(r) for r in await self.fetch(q.FINISHED, ids, list(FINAL_STATES))] if ids else []

    async def counts(self) -> dict[str, int]:
        return dict.fromkeys(STATES, 0) | {r[0]: int(r[1]) for r in await self.fetch(q.COUNTS)}

    async def not_running_here(self, ids: list[str]) -> list[str]:
        """Those of `ids` this instance no longer holds as running (cancelled, rescued elsewhere)."""
        return [r[0] for r in await self.fetch(q.NOT_RUNNING, ids, self.instance)] if ids else []

    # -- process records: kept per host, in its row (see service.store.postgres.hosts)
    async def record_processes(self, procs: list[tuple[int, float, str]]) -> None:
        await self.fetch(q.SET_PROCESSES, self.host_name, self.instance, json.dumps(procs))

    async def recorded_processes(self) -> list[tuple[int, float, str]]:
        text = await self.fetchval(q.GET_PROCESSES, self.host_name)
        return [(int(p), float(c), str(r)) for p, c, r in json.loads(text)] if text else []


def _json(row: asyncpg.Record, progress: Any = None) -> str:
    return job_json(tuple(row), progress(row["id"]) if progress and row["state"] == "running" else None)


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


def _tally(rows: list[asyncpg.Record]) -> tuple[int, int]:
    retried = sum(1 for r in rows if r[1] == "queued")
    return retried, len(rows) - retried


def _say(e: BaseException) -> str:
    """An error for logs and /health: its type and text, never the URL (which may hold a password)."""
    text = str(e).strip() or "no answer"
    return f"{type(e).__name__}: {text}"


if TYPE_CHECKING:  # mypy holds the backend to the protocol
    _check: JobStore = PgStore("", "", "", "")

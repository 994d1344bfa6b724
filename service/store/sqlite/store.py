"""The job store: every SQL statement poold runs, as named operations.

SQLite in WAL mode, one connection used from the event loop's thread. Writes
run at once inside an open transaction, and the transaction is committed at
the end of the loop iteration (`call_soon`), so every write made in the same
iteration shares one commit (group commit). Callers that must not answer
before the data is durable `await store.committed()`. It implements
service.store.base.JobStore, as every backend does.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service.model import FINAL_STATES, STATES
from service.store.base import Claimed, JobStore, NewJob, StoreError, new_id
from service.store.sqlite.database import Database
from service.store.sqlite.jobjson import job_json

__all__ = ["FINAL_STATES", "STATES", "Claimed", "NewJob", "Store", "StoreError"]

log = logging.getLogger("poold.store")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    fn TEXT NOT NULL,
    args TEXT NOT NULL,
    kwargs TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    timeout REAL NOT NULL,
    retries INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    key TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker TEXT,
    result TEXT,
    error TEXT,
    progress TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (priority DESC, seq) WHERE state = 'queued';
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs (key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER NOT NULL,
    create_time REAL NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (pid, create_time)
);
"""

_RECENT = 20000  # finished jobs whose JSON is kept in memory for fast reads

_COLUMNS = ("seq, id, fn, args, kwargs, state, priority, timeout, retries, attempts, key, created_at, "
            "started_at, finished_at, worker, result, error, progress")


class Store:
    """Named operations on the job table; see the module docstring for commits."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start_ledger = None if path == ":memory:" else path
        self.claim_dequeues = False  # a claimed job is queued until its worker starts it
        self._d = Database(path, _SCHEMA)
        self._d.on_reset = self._recount
        self.queued = 0
        self._recount()
        self._finished: list[tuple[Any, ...]] = []  # job ends not written yet (see finish)
        self._finished_started: list[tuple[Any, ...]] = []
        self._fresh: list[tuple[str, str, float, str]] = []
        self._recent: dict[str, tuple[str, float, str]] = {}  # id -> (state, finished_at, Job JSON)

    def _recount(self) -> None:
        row = self._d.rw.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
        self.queued = int(row[0])

    # -- transactions (see service.store.sqlite.database)
    @property
    def healthy(self) -> bool:
        return self._d.healthy

    @property
    def last_error(self) -> str:
        return self._d.last_error

    async def committed(self) -> None:
        """Returns once everything written so far is committed (raises StoreError if it failed)."""
        await self._d.committed()

    def after_commit(self, cb: Callable[[], None]) -> None:
        """Runs cb once what was written so far is committed."""
        self._d.after_commit(cb)

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        cur = self._d.write(sql, params)
        assert cur is not None
        return cur

    def _keep(self, sql: str, params: tuple[Any, ...]) -> int:
        """A write that must not be lost: kept and replayed when the disk refuses it now."""
        cur = self._d.write(sql, params, keep=True)
        return 0 if cur is None else cur.rowcount

    def repair(self) -> None:
        self._d.repair()

    def checkpoint(self) -> None:
        """Thread-safe: run it in a thread (see Database.checkpoint)."""
        self._d.checkpoint()

    def probe(self) -> bool:
        return self._d.probe()

    def close(self) -> None:
        self._d.close()

    async def aclose(self) -> None:
        self._d.close()

    # -- enqueue
    def by_key(self, key: str) -> tuple[Any, ...] | None:
        """The kept job with this idempotency key (uncommitted ones included), as a row."""
        self._flush()
        row: tuple[Any, ...] | None = self._d.rw.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
        return row

    def enqueue_many(self, jobs: list[NewJob]) -> list[tuple[str, str, bool]]:
        """Inserts jobs (or finds the kept job with the same key); (id, Job JSON, created) each."""
        out: list[tuple[str, str, bool]] = []
        rows = []
        by_key: dict[str, int] = {}  # keys seen in this call: the first one wins
        now = time.time()
        for j in jobs:
            if j.key is not None:
                if j.key in by_key:
                    jid, text, _ = out[by_key[j.key]]
                    out.append((jid, text, False))
                    continue
                if (existing := self.by_key(j.key)) is not None:
                    out.append((existing[1], job_json(existing), False))
                    continue
                by_key[j.key] = len(out)
            jid = new_id()
            args, kwargs = j.args, j.kwargs
            rows.append((jid, j.fn, args, kwargs, j.priority, j.timeout, j.retries, j.key, now))
            out.append((jid, job_json((0, jid, j.fn, args, kwargs, "queued", j.priority, j.timeout,
                                       j.retries, 0, j.key, now, None, None, None, None, None, None)), True))
        if rows:
            self._d.write_many("INSERT INTO jobs (id, fn, args, kwargs, state, priority, timeout, retries,"
                               " key, created_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)", rows)
            self.queued += len(rows)
        return out

    async def find_key(self, key: str, progress: Any = None) -> str | None:
        row = self.by_key(key)
        if row is None:
            return None
        await self.committed()  # it may be a job enqueued a moment ago, not yet committed
        found = await self.get_json(row[1], progress)
        return None if found is None else found[1]

    async def enqueue(self, jobs: list[NewJob], progress: Any = None) -> list[tuple[str, str, bool]]:
        out = self.enqueue_many(jobs)
        await self.committed()
        for i, (jid, _, created) in enumerate(out):
            if not created and (found := await self.get_json(jid, progress)) is not None:
                out[i] = (jid, found[1], False)  # the kept job as it is now
        return out

    # -- the queue
    async def claim(self, limit: int, skip: set[str]) -> list[Claimed]:
        """The claim is the caller's `skip` set: the jobs stay queued here until they start."""
        return self.next_queued(limit, skip)

    def release(self, jobs: list[Claimed]) -> None:
        pass  # still queued in the table

    def next_queued(self, limit: int, skip: set[str]) -> list[Claimed]:
        """The next `limit` queued jobs by priority then age, leaving out those in `skip`."""
        self._flush()
        rows = self._d.rw.execute(
            "SELECT seq, id, fn, args, kwargs, timeout, retries, attempts, priority, key, created_at"
            " FROM jobs INDEXED BY jobs_queue WHERE state = 'queued' ORDER BY priority DESC, seq LIMIT ?",
            (limit + len(skip),)).fetchall()
        out = []
        for row in rows:
            if row[1] not in skip:
                out.append(Claimed(*row))
                if len(out) == limit:
                    break
        return out

    def start(self, seq: int, started_at: float, worker: str) -> None:
        """queued → running, counting the attempt (`worker` is JSON text)."""
        self._flush()
        self.queued -= self._keep(
            "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1,"
            " worker = ?, progress = NULL, error = NULL WHERE seq = ? AND state = 'queued'",
            (started_at, worker, seq))

    def finish(self, c: Claimed, state: str, started_at: float, worker: str, start_written: bool, *,
               result_json: str | None = None, error: dict[str, Any] | None = None,
               progress: dict[str, Any] | None = None) -> None:
        """running (or still queued in the store, when its start is not written) → a final state.

        Only while the job is still this attempt's (the attempt token: it holds c.attempts + 1
        once started, c.attempts before): an end from an attempt that lost the job (cancelled,
        retried and started again, recovered) is discarded. The writes are gathered and run as
        one statement per kind just before anything else touches the store; the finished Job's
        JSON is kept in memory once committed, so fresh results are read without SQL.
        """
        now = time.time()
        err, prog = _dumps(error), _dumps(progress)
        if start_written:
            self._finished.append((state, result_json, err, prog, now, c.seq, c.attempts + 1))
        else:
            self._finished_started.append((state, result_json, err, prog, now, started_at, worker, c.seq,
                                           c.attempts))
        text = job_json((c.seq, c.id, c.fn, c.args, c.kwargs, state, c.priority, c.timeout, c.retries,
                         c.attempts + 1, c.key, c.created_at, started_at, now, worker, result_json, err,
                         prog))
        self._fresh.append((c.id, state, now, text))
        if len(self._finished) + len(self._finished_started) == 1:
            self._d.before_commit(self._flush)

    def _flush(self) -> None:
        """Writes the gathered job ends (see finish); their JSON is cached once they commit."""
        # rows changed against rows asked: a discarded end (or one kept for replay) is not cached
        changed = asked = 0
        if self._finished_started:
            rows, self._finished_started = self._finished_started, []
            n = self._d.write_many(
                "UPDATE jobs SET state = ?, result = ?, error = ?, progress = ?, finished_at = ?,"
                " started_at = ?, worker = ?, attempts = attempts + 1"
                " WHERE seq = ? AND state = 'queued' AND attempts = ?", rows, keep=True)
            self.queued -= n
            changed, asked = changed + n, asked + len(rows)
        if self._finished:
            rows, self._finished = self._finished, []
            changed += self._d.write_many("UPDATE jobs SET state = ?, result = ?, error = ?, progress = ?,"
                                          " finished_at = ? WHERE seq = ? AND state = 'running'"
                                          " AND attempts = ?", rows, keep=True)
            asked += len(rows)
        if self._fresh:
            fresh, self._fresh = self._fresh, []
            if changed == asked:
                self._d.after_commit(lambda: self._remember(fresh))

    def _remember(self, fresh: list[tuple[str, str, float, str]]) -> None:
        recent = self._recent
        for jid, state, t, text in fresh:
            recent[jid] = (state, t, text)
        while len(recent) > _RECENT:
            del recent[next(iter(recent))]

    def retry(self, seq: int, error: dict[str, Any], *, attempts: int | None = None) -> None:
        """running → queued again (a failed attempt with retries left); the error is kept.

        `attempts`: the failed attempt's Claimed.attempts, so a retry from an attempt that lost
        the job is discarded (None: whichever attempt holds it).
        """
        self._flush()
        sql = "UPDATE jobs SET state = 'queued', error = ? WHERE seq = ? AND state = 'running'"
        params: tuple[Any, ...] = (json.dumps(error), seq)
        if attempts is not None:
            sql, params = sql + " AND attempts = ?", (*params, attempts + 1)
        self.queued += self._keep(sql, params)

    async def cancel(self, jid: str, progress: dict[str, Any] | None = None, *,
                     queued_only: bool = False) -> str | None:
        """queued or running → cancelled; returns the state it was in (None if not found).
        `progress`: a running job's last report, which lives in memory until its end."""
        self._flush()
        row = self._d.rw.execute("SELECT state FROM jobs WHERE id = ?", (jid,)).fetchone()
        if row is None or row[0] not in ("queued", "running") or (queued_only and row[0] == "running"):
            return None if row is None else str(row[0])
        self._keep("UPDATE jobs SET state = 'cancelled', finished_at = ?, progress = COALESCE(?, progress)"
                   " WHERE id = ? AND state IN ('queued', 'running')", (time.time(), _dumps(progress), jid))
        if row[0] == "queued":
            self.queued -= 1
        return str(row[0])

    async def recover(self, started: dict[int, tuple[int, float]] | None = None) -> tuple[int, int]:
        """At start: running jobs of a previous instance are retried, or failed as interrupted.

        `started` (service.engine.ledger.read) holds the attempts workers began: one the store still has
        as queued, with the same attempt count, ran unrecorded and counts as running too.
        """
        self._flush()
        if started:  # queued → running: no longer counted as queued
            self.queued -= self._d.write_many(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?"
                " WHERE seq = ? AND state = 'queued' AND attempts = ?",
                [(t, seq, attempts) for seq, (attempts, t) in started.items()])
        err = json.dumps({"type": "interrupted", "message": "the daemon stopped while the job ran",
                          "exception": None, "traceback": None})
        retried = self._write("UPDATE jobs SET state = 'queued', error = ? WHERE state = 'running'"
                              " AND attempts <= retries", (err,)).rowcount
        failed = self._write("UPDATE jobs SET state = 'failed', error = ?, finished_at = ?"
                             " WHERE state = 'running'", (err, time.time())).rowcount
        self.queued += retried
        return retried, failed

    async def expire(self, ttl: float) -> int:
        """Deletes finished jobs older than ttl seconds."""
        self._flush()
        cutoff = time.time() - ttl
        for jid in [j for j, (_, t, _) in self._recent.items() if t < cutoff]:
            del self._recent[jid]
        row = self._d.rw.execute("SELECT 1 FROM jobs WHERE finished_at < ? LIMIT 1", (cutoff,)).fetchone()
        if row is None:
            return 0
        return self._write("DELETE FROM jobs WHERE finished_at < ?", (cutoff,)).rowcount

    # -- reads (committed data only, as Job JSON text)
    async def get_json(self, jid: str, progress: Any = None) -> tuple[str, str] | None:
        """(state, Job JSON) of one job; `progress(id)` may give live progress JSON for a running one."""
        if (hit := self._recent.get(jid)) is not None:
            return hit[0], hit[2]
        row = self._d.ro.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (jid,)).fetchone()
        if row is None:
            return None
        return row[5], job_json(row, progress(jid) if progress and row[5] == "running" else None)

    async def get(self, jid: str) -> dict[str, Any] | None:
        found = await self.get_json(jid)
        return None if found is None else dict(json.loads(found[1]))

    async def list_json(self, state: str | None, limit: int, progress: Any = None) -> list[str]:
        """Jobs newest first, as JSON texts."""
        if state is None:
            rows = self._d.ro.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._d.ro.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?", (state, limit))
        return [job_json(r, progress(r[1]) if progress and r[5] == "running" else None) for r in rows]

    async def states(self, ids: list[str]) -> dict[str, str]:
        """{id: state} for the known ids among `ids`."""
        recent = self._recent
        out: dict[str, str] = {i: recent[i][0] for i in ids if i in recent}
        ids = [i for i in ids if i not in out]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._d.ro.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", chunk)
            out.update(rows.fetchall())
        return out

    async def finished_json(self, ids: list[str]) -> list[str]:
        """The finished jobs among `ids`, as JSON texts (in no particular order)."""
        recent = self._recent
        out: list[str] = [recent[i][2] for i in ids if i in recent]
        ids = [i for i in ids if i not in recent]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            out += [job_json(r) for r in self._d.ro.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks}) AND state IN {FINAL_STATES!r}", chunk)]
        return out

    def state_of(self, jid: str) -> str | None:
        """The state as this process last wrote it (uncommitted included)."""
        self._flush()
        row = self._d.rw.execute("SELECT state FROM jobs WHERE id = ?", (jid,)).fetchone()
        return None if row is None else str(row[0])

    async def counts(self) -> dict[str, int]:
        rows = self._d.ro.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {str(s): int(n) for s, n in rows}

    # -- process records (a previous instance's leftovers)
    async def record_processes(self, procs: list[tuple[int, float, str]]) -> None:
        self._flush()
        self._write("DELETE FROM processes")
        for pid, ctime, role in procs:
            self._write("INSERT OR REPLACE INTO processes VALUES (?, ?, ?)", (pid, ctime, role))

    async def recorded_processes(self) -> list[tuple[int, float, str]]:
        return [(int(p), float(c), str(r)) for p, c, r in
                self._d.rw.execute("SELECT pid, create_time, role FROM processes").fetchall()]


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


if TYPE_CHECKING:  # mypy holds the backend to the protocol
    _check: JobStore = Store(":memory:")

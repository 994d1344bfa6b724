"""The gathered writes of running jobs on PostgreSQL (start, finish, retry, release).

They are committed together, one transaction at a time, as soon as the previous one is in:
what a loop iteration writes joins one commit, as SQLite's group commit does. Each kind goes
as one statement (`UPDATE … FROM unnest()`, queries.MANY) or an executemany, in order. A
failed commit keeps them for the next try, backing off, whatever the error was: a job's end
must not be lost, nor its waiters left waiting.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import asyncpg

from service.store.base import StoreError
from service.store.postgres import notices
from service.store.postgres import queries as q

log = logging.getLogger("poold.store")


class Op(NamedTuple):
    """One gathered write: its statement and arguments (this instance's id last)."""

    sql: str
    args: tuple[Any, ...]


Tx = Callable[[Callable[[asyncpg.Connection], Awaitable[Any]]], Awaitable[Any]]


class Writes:
    def __init__(self, tx: Tx, channel: str, instance: str, recount: Callable[[int], None]) -> None:
        """`tx(body)` runs body in a transaction (StoreError when the database is away);
        `recount(n)` is told the queue's length after writes that put jobs back in it."""
        self._tx, self._channel, self._instance, self._recount = tx, channel, instance, recount
        self._pending: list[Op | None] = []  # None: a START its job's FINISH made needless
        self._starts: dict[int, int] = {}  # seq -> index in _pending of its START not yet written
        self._ended: list[str] = []  # ids ended by the pending writes (NOTIFY "e")
        self.requeued = False  # the pending writes put jobs back in the queue (NOTIFY "q")
        self.written = self.done = 0  # writes asked for, and committed, so far
        self._waiters: list[tuple[int, asyncio.Future[None] | Callable[[], None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return self.written - self.done

    def add(self, op: Op, *, ended: str | None = None, requeues: bool = False) -> None:
        """Gathers a write; `ended`: the job it ends; `requeues`: it may put a job back."""
        if op.sql is q.START:
            self._starts[op.args[0]] = len(self._pending)
        elif op.sql is q.FINISH and (k := self._starts.pop(op.args[7], None)) is not None:
            self._pending[k] = None  # started and ended before either was written: the FINISH says both
        self._pending.append(op)
        if ended is not None:
            self._ended.append(ended)
        self.requeued = self.requeued or requeues
        self.written += 1
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(),
                                                                   name="poold store writes")

    async def _flush_loop(self) -> None:
        """Commits what is pending, again and again, until nothing is; backs off while down."""
        pause = 0.0
        try:
            while self._pending:
                await asyncio.sleep(pause)  # 0 the first time: what this loop iteration writes joins
                ops = [o for o in self._pending if o is not None]
                ended, requeued, upto = self._ended, self.requeued, self.written
                self._pending, self._ended, self.requeued, self._starts = [], [], False, {}
                try:
                    await self._tx(functools.partial(self._write, ops=ops, ended=ended, requeued=requeued))
                except Exception as e:  # kept and tried again, whatever it was: a job's end must not be
                    if not isinstance(e, StoreError):  # lost, nor its waiters left waiting
                        log.exception("writing %d job changes failed; trying again", len(ops))
                        e = StoreError(f"{type(e).__name__}: {e}")
                    self._pending, self._ended = [*ops, *self._pending], ended + self._ended
                    self._starts = {o.args[0]: i for i, o in enumerate(self._pending)
                                    if o is not None and o.sql is q.START}
                    self.requeued = self.requeued or requeued
                    self._settle(upto, e)
                    pause = min(max(2 * pause, 0.1), 2.0)
                    continue
                pause = 0.0
                self.done = upto
                self._settle(upto, None)
        finally:
            self._flusher = None

    async def _write(self, conn: asyncpg.Connection, *, ops: list[Op], ended: list[str],
                     requeued: bool) -> None:
        i = 0
        while i < len(ops):  # runs of one statement go together, in their order
            j = i
            while j < len(ops) and ops[j].sql is ops[i].sql:
                j += 1
            rows = [o.args for o in ops[i:j]]
            if (many := q.MANY.get(ops[i].sql)) is not None and len(rows) > 1:
                # one statement for them all: each argument but the last (the instance) an array
                await conn.execute(many, *[list(col) for col in zip(*[r[:-1] for r in rows], strict=True)],
                                   self._instance)
            else:
                await conn.executemany(ops[i].sql, rows)
            i = j
        for payload in notices.encode("e", ended) + (["q"] if requeued else []):
            await conn.execute(q.NOTIFY, self._channel, payload)
        if requeued:  # a discarded retry or release must not count: counted afresh
            self._recount(int(await conn.fetchval(q.COUNT_QUEUED)))

    def _settle(self, upto: int, error: StoreError | None) -> None:
        """Wakes committed() callers (with the error, if it failed) and runs after_commit callbacks."""
        keep: list[tuple[int, asyncio.Future[None] | Callable[[], None]]] = []
        for target, w in self._waiters:
            if isinstance(w, asyncio.Future):
                if w.done():
                    continue
                if error is not None:
                    w.set_exception(StoreError(str(error)))
                elif target <= upto:
                    w.set_result(None)
                else:
                    keep.append((target, w))
            elif error is None and target <= upto:
                w()
            else:
                keep.append((target, w))
        self._waiters = keep

    async def committed(self) -> None:
        if self.done >= self.written:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self.written, fut))
        await fut

    def after_commit(self, cb: Callable[[], None]) -> None:
        if self.done >= self.written:
            asyncio.get_running_loop().call_soon(cb)
        else:
            self._waiters.append((self.written, cb))

    async def settle(self, patience: float) -> bool:
        """Waits up to `patience` seconds for every write so far to commit, through failures
        (the flush retries on its own); whether they all did."""
        end = time.monotonic() + patience
        while self.done < self.written and time.monotonic() < end:
            try:
                await asyncio.wait_for(self.committed(), max(0.01, end - time.monotonic()))
            except (StoreError, TimeoutError):
                await asyncio.sleep(0.1)
        return self.done >= self.written

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

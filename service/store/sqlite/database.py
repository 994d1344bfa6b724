"""The SQLite connection under the store: group commit, a backlog for bad times, self-repair.

Writes run at once inside an open transaction that commits at the end of the
loop iteration (`call_soon`): every write of one iteration shares one commit.
When the disk refuses (read-only, full, I/O error), the transaction is rolled
back: writes that must not be lost (`keep=True`: a job's start, end, retry,
cancel) wait in a backlog and are replayed, in order, before anything else
once the disk takes writes again; callers that must answer only after a
commit (a 202) see StoreError. A database file deleted under the daemon is
written back from the open connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from service.store.base import StoreError

CHECKPOINT_COMMITS = 200
CHECKPOINT_SECONDS = 10.0

log = logging.getLogger("poold.store")

_MIN_FREE = 64 * 1024  # bytes free below which the store counts as full


class Database:
    def __init__(self, path: str, schema: str) -> None:
        self.path, self._schema = path, schema
        self.healthy, self.last_error = True, ""
        self.on_reset: Callable[[], None] = lambda: None  # after a rollback: recount derived state
        self._commit: asyncio.Future[None] | None = None
        self._after: list[Callable[[], None]] = []
        self._before: list[Callable[[], None]] = []
        self._kept: list[tuple[str, tuple[Any, ...]]] = []  # keep=True writes in the open transaction
        self._backlog: list[tuple[str, tuple[Any, ...]]] = []
        self._backlog_after: list[Callable[[], None]] = []
        self._commits = 0  # commits so far, and at the last checkpoint (see checkpoint)
        self._checkpointed: tuple[int, float] = (0, time.monotonic())
        self._open()

    def _open(self) -> None:
        self.rw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.rw.execute("PRAGMA journal_mode=WAL")
        self.rw.execute("PRAGMA synchronous=NORMAL")
        self.rw.execute("PRAGMA busy_timeout=5000")
        # checkpoints (which fsync the database) run off the event loop: see checkpoint()
        self.rw.execute("PRAGMA wal_autocheckpoint=0")
        self.rw.executescript(self._schema)
        # reads through a second connection see committed data only: nobody is shown a job
        # (or its result) before the commit that holds it
        memory = self.path == ":memory:"
        self.ro = self.rw if memory else sqlite3.connect(self.path, isolation_level=None,
                                                          check_same_thread=False)
        self._inode = None if memory else os.stat(self.path).st_ino

    # -- transactions
    def begin(self) -> None:
        """Opens the shared transaction (replaying the backlog first) unless one is open."""
        if self._commit is not None:
            return
        try:
            self._check_disk()
            self.rw.execute("BEGIN IMMEDIATE")
            for sql, params in self._backlog:
                self.rw.execute(sql, params)
        except sqlite3.Error as e:
            self._rollback()
            self._failed(e)
            raise StoreError(str(e)) from e
        self._kept, self._backlog = self._backlog, []
        self._after, self._backlog_after = self._backlog_after, []
        loop = asyncio.get_running_loop()
        self._commit = fut = loop.create_future()
        loop.call_soon(self._do_commit, fut)

    def write(self, sql: str, params: tuple[Any, ...] = (), keep: bool = False) -> sqlite3.Cursor | None:
        """Runs one statement in the open transaction. A `keep` write that fails is kept for later
        (None is returned); any other failure raises StoreError."""
        try:
            self.begin()
            cur = self.rw.execute(sql, params)
        except Exception as e:
            if self._commit is not None:
                self._abort(e)
            if keep:
                self._backlog.append((sql, params))
                return None
            raise e if isinstance(e, StoreError) else StoreError(str(e)) from e
        if keep:
            self._kept.append((sql, params))
        return cur

    def write_many(self, sql: str, rows: list[tuple[Any, ...]], keep: bool = False) -> int:
        """One statement over many rows (one call into SQLite); the rows it changed. A failure
        raises StoreError, or, with `keep`, keeps the rows for later (0 is returned)."""
        try:
            self.begin()
            cur = self.rw.executemany(sql, rows)
        except Exception as e:
            if self._commit is not None:
                self._abort(e)
            if keep:
                self._backlog += [(sql, r) for r in rows]
                return 0
            raise e if isinstance(e, StoreError) else StoreError(str(e)) from e
        if keep:
            self._kept += [(sql, r) for r in rows]
        return cur.rowcount

    def before_commit(self, cb: Callable[[], None]) -> None:
        """Runs cb (once) just before the next commit: writes gathered until then go in with it."""
        self._before.append(cb)
        if self._commit is None:
            loop = asyncio.get_running_loop()
            loop.call_soon(self._run_before)

    def _run_before(self) -> None:
        """Gathered writes with no transaction open yet: run them now (they open one)."""
        if self._commit is None:
            callbacks, self._before = self._before, []
            for cb in callbacks:
                cb()

    def _do_commit(self, fut: asyncio.Future[None]) -> None:
        if fut is not self._commit:
            return  # aborted already
        while self._before:
            callbacks, self._before = self._before, []
            for cb in callbacks:
                cb()
            if fut is not self._commit:
                return  # a gathered write failed and aborted the transaction
        try:
            self.rw.execute("COMMIT")
        except sqlite3.Error as e:
            self._abort(e)
            return
        self._commit = None
        self._commits += 1
        callbacks, self._after, self._kept = self._after, [], []
        if not self.healthy:
            log.warning("store %s can be written again", self.path)
            self.on_reset()
        self.healthy, self.last_error = True, ""
        fut.set_result(None)
        for cb in callbacks:
            cb()

    def _abort(self, e: Exception) -> None:
        """The open transaction failed: roll back; kept writes and their callbacks wait."""
        fut, self._commit = self._commit, None
        self._rollback()
        self._backlog = self._kept + self._backlog
        self._backlog_after = self._after + self._backlog_after
        self._kept, self._after = [], []
        self._failed(e)
        self.on_reset()
        if fut is not None and not fut.done():
            fut.set_exception(StoreError(str(e)))
            fut.exception()  # retrieved: awaiting callers get it

    def _check_disk(self) -> None:
        """Refuses early when the directory went read-only (a mount over it: the open files would
        still take writes that a restart could not find) or has no room left."""
        if self._inode is None:
            return
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        if st.f_flag & os.ST_RDONLY:
            raise sqlite3.OperationalError("the store's directory is on a read-only file system")
        if st.f_bavail * st.f_frsize < _MIN_FREE:
            raise sqlite3.OperationalError("no space left on the store's file system")

    def _rollback(self) -> None:
        try:
            if self.rw.in_transaction:
                self.rw.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _failed(self, e: Exception) -> None:
        if self.healthy:
            log.error("store %s cannot be written: %s", self.path, e)
        self.healthy, self.last_error = False, str(e)

    async def committed(self) -> None:
        """Returns once everything written so far is committed (raises StoreError if it failed)."""
        if self._before:
            self._run_before()
        if self._commit is not None:
            await asyncio.shield(self._commit)
        elif self._backlog:
            raise StoreError(self.last_error or "the store cannot be written")

    def after_commit(self, cb: Callable[[], None]) -> None:
        """Runs cb once what was written so far (gathered writes included) is committed."""
        if self._before:
            self._run_before()
        if self._commit is not None:
            self._after.append(cb)
        elif self._backlog:
            self._backlog_after.append(cb)
        else:
            cb()

    def checkpoint(self) -> None:
        """Copies the WAL into the database, in a thread of its own with its own connection, so
        the fsync it costs never stalls a request (the loop's connection never checkpoints).

        Asked every housekeeping round, it runs only when CHECKPOINT_COMMITS commits have
        gathered, or some have and CHECKPOINT_SECONDS passed: under load as often as before, and
        otherwise not every second, where its fsync slowed CPU-bound jobs by a few per cent.
        """
        commits, (done, when) = self._commits, self._checkpointed
        if self._inode is None or commits == done or (
                commits - done < CHECKPOINT_COMMITS and time.monotonic() - when < CHECKPOINT_SECONDS):
            return
        try:
            with sqlite3.connect(self.path, timeout=5) as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as e:
            log.debug("checkpoint of %s: %s", self.path, e)
            return
        self._checkpointed = (commits, time.monotonic())

    # -- health and repair
    def repair(self) -> None:
        """Periodic: writes back a deleted database file; replays the backlog."""
        if self._commit is not None:
            return
        self._restore_if_deleted()
        if self._backlog:
            try:
                self.begin()
            except StoreError:
                pass

    def _restore_if_deleted(self) -> None:
        if self._inode is None:
            return
        try:
            if os.stat(self.path).st_ino == self._inode:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        tmp = self.path + ".restore"
        try:
            self.rw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if os.path.exists(tmp):
                os.unlink(tmp)
            self.rw.execute("VACUUM INTO ?", (tmp,))
            self.ro.close()
            self.rw.close()
            os.replace(tmp, self.path)
            self._open()
        except (sqlite3.Error, OSError) as e:
            self._failed(OSError(f"the database file was removed and cannot be written back: {e}"))
            return
        log.warning("store %s was removed while in use: written back from the open database", self.path)

    def probe(self) -> bool:
        """Can the database be written right now? (A tiny real write, so a read-only or full
        disk shows.)"""
        if self._commit is not None or self._backlog:
            return self.healthy and not self._backlog
        self._restore_if_deleted()
        try:
            self._check_disk()
            self.rw.execute("BEGIN IMMEDIATE")
            self.rw.execute("INSERT OR REPLACE INTO meta VALUES ('probe', strftime('%s','now'))")
            self.rw.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback()
            self._failed(e)
            return False
        if not self.healthy:
            log.warning("store %s can be written again", self.path)
        self.healthy, self.last_error = True, ""
        return True

    def close(self) -> None:
        self._run_before()
        if self._commit is not None:
            self._do_commit(self._commit)
        if self.ro is not self.rw:
            self.ro.close()
        self.rw.close()

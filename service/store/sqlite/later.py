"""What waits, on SQLite: due jobs made queued, ended dependencies resolved, schedule ticks
decided once. A mixin of service.store.sqlite.store.Store: it shares its connection and its
group commit, so a tick's record and its job, or a job's end and its dependents' release,
commit together."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from service.store.base import Fire, NewJob, Resolved, ScheduleRow
from service.store.sqlite import queries as q

if TYPE_CHECKING:
    from service.store.sqlite.database import Database

PROMOTE_CHUNK = 5000  # due jobs made queued per statement: the loop stays responsive


class Later:
    _d: Database
    queued: int
    on_change: Callable[[Resolved], None]

    def _flush(self) -> None: ...

    def enqueue_many(self, jobs: list[NewJob]) -> list[tuple[str, str, bool]]:
        raise NotImplementedError

    async def committed(self) -> None: ...

    # -- due jobs
    async def promote(self, now: float) -> int:
        self._flush()
        n = self._d.write(q.PROMOTE, (now, PROMOTE_CHUNK))
        changed = 0 if n is None else n.rowcount
        self.queued += changed
        return changed

    async def next_due(self) -> float | None:
        row = self._d.rw.execute(q.NEXT_DUE).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- dependencies
    def _resolve_ended(self) -> Resolved:
        """Goes through the `ended` work list in the open transaction, down the graph: a
        dependent failed here ends too, and is filed in `ended` by the trigger."""
        rw, queued, failed = self._d.rw, 0, []
        while True:
            upto = rw.execute(q.ENDED_UPTO).fetchone()[0]
            if upto is None:
                break
            args: dict[str, Any] = {"upto": upto, "now": time.time()}
            failed += [r[0] for r in self._d.write(q.FAIL_DEPENDENTS, args) or []]
            self._d.write(q.COUNT_DOWN, {"upto": upto})
            released = [r[0] for r in self._d.write(q.RELEASE_WAITING, args) or []]
            queued += sum(1 for s in released if s == "queued")
            self._d.write(q.DROP_ENDED, {"upto": upto})
        self.queued += queued
        out = Resolved(queued, failed)
        if queued or failed:
            self._d.after_commit(lambda: self.on_change(out))
        return out

    def _resolve_soon(self) -> None:
        self._d.before_commit(self._resolve_ended_now)

    def _resolve_ended_now(self) -> None:
        self._resolve_ended()

    async def resolve(self) -> Resolved:
        self._flush()
        return self._resolve_ended()

    # -- periodic schedules
    async def sync_schedules(self, defs: dict[str, str], now: float) -> None:
        self._flush()
        rw = self._d.rw
        for name, definition in defs.items():
            row = rw.execute(q.SCHEDULE_DEF, (name,)).fetchone()
            if row is None:
                self._d.write(q.SCHEDULE_ADD, (name, definition, now))
            elif row[0] != definition:
                self._d.write(q.SCHEDULE_CHANGE, (definition, now, name))
        for (name,) in rw.execute(q.SCHEDULE_NAMES).fetchall():
            if name not in defs:
                self._d.write(q.SCHEDULE_DROP, (name,))
        await self.committed()

    async def schedules(self) -> list[ScheduleRow]:
        self._flush()
        return [ScheduleRow(n, d, bool(p), float(t), f, j)
                for n, d, p, t, f, j in self._d.rw.execute(q.SCHEDULES).fetchall()]

    async def fire(self, name: str, tick: float, job: NewJob, overlap: bool) -> tuple[Fire, str | None]:
        self._flush()
        cur = self._d.write(q.FIRE, (name, tick))
        if cur is None or cur.rowcount == 0:
            return Fire.TAKEN, None
        if not overlap and self._d.rw.execute(q.LAST_JOB_ACTIVE, (name,)).fetchone() is not None:
            self._d.write(q.DECIDED, (tick, name))
            await self.committed()
            return Fire.OVERLAP, None
        [(jid, _, _)] = self.enqueue_many([job])
        self._d.write(q.FIRED, (jid, name, tick))
        self._d.write(q.FIRED_JOB, (tick, tick, jid, name))
        await self.committed()
        return Fire.FIRED, jid

    async def skip_ticks(self, name: str, upto: float) -> None:
        self._flush()
        self._d.write(q.DECIDED, (upto, name))
        await self.committed()

    async def pause(self, name: str, paused: bool, now: float) -> bool:
        self._flush()
        cur = self._d.write(q.PAUSE, (int(paused), int(paused), now, name))
        await self.committed()
        return cur is not None and cur.rowcount > 0

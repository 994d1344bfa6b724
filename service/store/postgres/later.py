"""What waits, on PostgreSQL: due jobs made queued, ended dependencies resolved, schedule
ticks decided once across every host. A mixin of service.store.postgres.store.PgStore.

Every host runs these; each statement takes rows with SKIP LOCKED or under a row lock, so
two hosts never make the same job due twice, nor count one dependency's end twice. A tick is
a row of `fires` (its primary key is the schedule and the tick), inserted in the transaction
that enqueues its job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncpg

from service.store.base import Fire, NewJob, Resolved, ScheduleRow
from service.store.postgres import enqueue, notices
from service.store.postgres import queries as q

PROMOTE_CHUNK = 5000


class Later:
    channel: str
    _queued: int
    tx: Callable[..., Any]
    fetch: Callable[..., Any]
    fetchval: Callable[..., Any]

    async def promote(self, now: float) -> int:
        async def body(conn: asyncpg.Connection) -> int:
            n = int((await conn.execute(q.PROMOTE, now, PROMOTE_CHUNK)).split()[-1])
            if n:
                await conn.execute(q.NOTIFY, self.channel, "q")
            return n

        n: int = await self.tx(body)
        self._queued += n
        return n

    async def next_due(self) -> float | None:
        v = await self.fetchval(q.NEXT_DUE)
        return None if v is None else float(v)

    async def resolve(self) -> Resolved:
        """One pass over up to 1000 ended jobs; a dependent failed here is filed by the trigger
        for the next pass (the caller asks again while anything changed)."""
        async def body(conn: asyncpg.Connection) -> Resolved:
            taken = await conn.fetch(q.TAKE_ENDED)
            if not taken:
                return Resolved(0, [])
            ids, states = [r[0] for r in taken], [r[1] for r in taken]
            failed = [r[0] for r in await conn.fetch(q.FAIL_DEPENDENTS, ids, states, time.time())]
            await conn.execute(q.COUNT_DOWN, ids, states)
            released = await conn.fetch(q.RELEASE_WAITING, ids, states, time.time())
            queued = sum(1 for r in released if r[0] == "queued")
            for payload in notices.encode("e", failed) + (["q"] if queued else []):
                await conn.execute(q.NOTIFY, self.channel, payload)
            return Resolved(queued, failed)

        out: Resolved = await self.tx(body)
        self._queued += out.queued
        return out

    # -- periodic schedules
    async def sync_schedules(self, defs: dict[str, str], now: float) -> None:
        async def body(conn: asyncpg.Connection) -> None:
            for name, definition in sorted(defs.items()):
                await conn.execute(q.SCHEDULE_UPSERT, name, definition, now)
            await conn.execute(q.SCHEDULE_DROP_OTHERS, list(defs))

        await self.tx(body)

    async def schedules(self) -> list[ScheduleRow]:
        return [ScheduleRow(r[0], r[1], bool(r[2]), float(r[3]), r[4], r[5])
                for r in await self.fetch(q.SCHEDULES)]

    async def fire(self, name: str, tick: float, job: NewJob, overlap: bool) -> tuple[Fire, str | None]:
        async def body(conn: asyncpg.Connection) -> tuple[Fire, str | None, int]:
            if await conn.fetchval(q.FIRE, name, tick) is None:
                return Fire.TAKEN, None, 0
            await conn.execute(q.SCHEDULE_LOCK, name)  # the last job is read and set in one order
            if not overlap and await conn.fetchval(q.LAST_JOB_ACTIVE, name) is not None:
                await conn.execute(q.DECIDED, name, tick)
                return Fire.OVERLAP, None, 0
            out, queued = await enqueue.insert(conn, [job], self.channel, None)
            jid = out[0][0]
            await conn.execute(q.FIRED, name, tick, jid)
            await conn.execute(q.FIRED_JOB, name, tick, jid)
            return Fire.FIRED, jid, queued

        outcome, jid, queued = await self.tx(body)
        self._queued += queued
        return outcome, jid

    async def skip_ticks(self, name: str, upto: float) -> None:
        await self.fetch(q.DECIDED, name, upto)

    async def pause(self, name: str, paused: bool, now: float) -> bool:
        async def body(conn: asyncpg.Connection) -> bool:
            return bool((await conn.execute(q.PAUSE, name, paused, now)).split()[-1] != "0")

        ok: bool = await self.tx(body)
        return ok

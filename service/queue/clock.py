"""The clock: what waits in the store is made ready on time.

One task per host, woken when something may be due (a delayed job submitted, a dependency
ended, a NOTIFY from another host) and at least every POLL seconds:
- scheduled jobs whose time has come become queued (service.store.base.JobStore.promote);
- waiting jobs whose dependencies ended are released or failed (resolve);
- each schedule's latest tick is fired once, through the store, whatever the hosts and the
  restarts (fire): of the ticks missed while no daemon ran only the latest is fired, and only
  when it is less than schedule.LATE seconds late; the others are skipped and logged.
The schedules' definitions are the store's (the latest start or reload wins across hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from service.config import Config
from service.queue.dispatcher import Scheduler
from service.schedule import LATE, Schedule
from service.store.base import Fire, Fired, JobStore, NewJob, Resolved, ScheduleRow, StoreError

log = logging.getLogger("poold.clock")

POLL = 0.5  # seconds between looks when nothing wakes the clock
TICKS = 0.25  # seconds between looks at the schedules


class Clock:
    def __init__(self, cfg: Config, store: JobStore, scheduler: Scheduler) -> None:
        self.cfg, self.store, self.scheduler = cfg, store, scheduler
        self._wake = asyncio.Event()
        self._sync: tuple[Schedule, ...] | None = cfg.schedules  # to write to the store before the next look
        self._ticks_at = 0.0
        self._parsed: dict[str, tuple[str, Schedule]] = {}  # name -> (definition, parsed)
        self._seen: set[str] = set()  # schedules looked at since this start: their ticks all fire
        if hasattr(store, "on_change"):  # SQLite resolves in the commit that ended a dependency
            store.on_change = self.changed

    def poke(self) -> None:
        """Something may be due now (a delayed job, an ended dependency, another host's word)."""
        self._wake.set()

    def reconfigure(self, cfg: Config) -> None:
        """A reload: the schedules are written to the store at the next look."""
        if cfg.schedules != self.cfg.schedules:
            self._sync = cfg.schedules
        self.cfg = cfg
        self.poke()

    def changed(self, r: Resolved) -> None:
        if r.queued:
            self.scheduler.kick()
        if r.failed:
            self.scheduler.waiters.wake(r.failed)

    async def run(self) -> None:
        pause = 0.0
        while True:
            try:
                wait = await self.look()
                pause = 0.0
            except StoreError:  # the store says why (in /health); look again, backing off
                pause = min(max(2 * pause, 0.2), 2.0)
                wait = pause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def look(self) -> float:
        """One round; how long until the next is needed."""
        now = time.time()
        if self._sync is not None:
            defs = {s.name: s.definition() for s in self._sync}
            await self.store.sync_schedules(defs, now)
            self._sync = None
            self._ticks_at = 0.0
        while (n := await self.store.promote(now)) > 0:
            self.scheduler.kick()
            if n < 1000:
                break
        for _ in range(100):  # a pass per 1000 ended dependencies: down a long failed chain
            r = await self.store.resolve()
            self.changed(r)
            if not r.queued and not r.failed:
                break
        wait = POLL
        if now >= self._ticks_at:
            self._ticks_at = now + TICKS
            wait = min(wait, await self._fire_ticks(now))
        due = await self.store.next_due()
        if due is not None:
            wait = min(wait, max(0.0, due - time.time()))
        return min(wait, max(0.01, self._ticks_at - time.time()))

    async def _fire_ticks(self, now: float) -> float:
        """Fires each schedule's due tick; how long until the next tick of any."""
        soonest = POLL
        for row in await self.store.schedules():
            s = self._schedule(row)
            if s is None or row.paused:
                continue
            if row.name in self._seen:  # running all along: each tick fires (a slow loop loses none)
                for t in s.ticks(row.last_tick, now):
                    await self._decide(s, 1, t, now)
            else:  # at start: of the ticks missed while no daemon ran, the latest only
                self._seen.add(row.name)
                count, latest = s.due(row.last_tick, now)
                if latest is not None:
                    await self._decide(s, count, latest, now)
            soonest = min(soonest, max(0.0, s.next_after(max(now, row.last_tick)) - time.time()))
        return soonest

    async def _decide(self, s: Schedule, count: int, latest: float, now: float) -> None:
        if count > 1:
            log.warning("schedule %s: %d ticks missed while no daemon ran were skipped", s.name, count - 1)
        if now - latest >= LATE:
            log.warning("schedule %s: the tick of %s was skipped: %.0f s late (a tick fires only when"
                        " less than %g s late)", s.name, _when(latest), now - latest, LATE)
            await self.store.skip_ticks(s.name, latest)
            return
        outcome, jid = await self.store.fire(s.name, latest, self.job_of(s, latest), s.overlap)
        if outcome is Fire.FIRED:
            log.info("schedule %s: fired the tick of %s as job %s", s.name, _when(latest), jid)
            self.scheduler.kick()
        elif outcome is Fire.OVERLAP:
            log.info("schedule %s: the tick of %s was skipped: its last job has not ended (overlap = false)",
                     s.name, _when(latest))

    def _schedule(self, row: ScheduleRow) -> Schedule | None:
        known = self._parsed.get(row.name)
        if known is not None and known[0] == row.definition:
            return known[1]
        try:
            s = Schedule.from_definition(row.definition)
        except (ValueError, TypeError) as e:
            log.error("schedule %s: its stored definition cannot be read: %s", row.name, e)
            return None
        self._parsed[row.name] = (row.definition, s)
        return s

    def job_of(self, s: Schedule, tick: float) -> NewJob:
        return NewJob(fn=s.fn, args=json.dumps(s.args), kwargs=json.dumps(s.kwargs),
                      timeout=s.timeout or self.cfg.jobs.default_timeout, priority=s.priority,
                      retries=s.retries, retry_delay=s.retry_delay, schedule=Fired(s.name, tick))

    async def listing(self) -> list[dict[str, Any]]:
        """GET /v1/schedules."""
        from service.model import iso

        now, out = time.time(), []
        for row in await self.store.schedules():
            s = self._schedule(row)
            if s is None:
                continue
            out.append({"name": s.name, "fn": s.fn, "cron": s.cron, "every": s.every, "timezone": s.timezone,
                        "next_fire_at": None if row.paused else iso(s.next_after(max(now, row.last_tick))),
                        "last_fire_at": iso(row.last_fire_at), "last_job": row.last_job,
                        "paused": row.paused, "overlap": s.overlap})
        return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

"""The daemon's periodic duties: orphan sweeps, result expiry, process records, systemd pings.

Each runs on the event loop every `supervisor.interval`; anything that may
wait (ending a process after its grace) runs in a thread so the loop never
stalls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from service.daemon import systemd
from service.engine.procs import leftovers, supervisor
from service.http.routes import STORE_REASON, Context, health_reasons
from service.store.base import StoreError

log = logging.getLogger("poold.watch")


class Watch:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._ending: set[int] = set()  # leftovers being ended right now
        self._chasing: set[str] = set()  # ended jobs whose processes are being chased (leftovers.chase)
        self._recorded: frozenset[int] = frozenset()
        self._status = ""
        self._last_expire = 0.0
        self._loop_lag = 0.0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._housekeeping())
            if (period := systemd.watchdog_period()) is not None:
                tg.create_task(self._watchdog(period))

    async def _housekeeping(self) -> None:
        tg_tasks: set[asyncio.Task[None]] = set()
        while True:
            interval = self.ctx.cfg.supervisor.interval
            t = time.monotonic()
            await asyncio.sleep(interval)
            self._loop_lag = max(0.0, time.monotonic() - t - interval)
            self._checkpoint(tg_tasks)
            try:
                self.ctx.store.repair()
                self._sweep_orphans(tg_tasks)
                await self._expire()
                await self._record_processes()
                self._report_status()
            except StoreError:
                pass  # the store has said so already (once); the backlog is retried next round
            except Exception:  # a failed round must not end supervision: log it and go on
                log.exception("housekeeping round failed")

    def _sweep_orphans(self, tasks: set[asyncio.Task[None]]) -> None:
        pool = self.ctx.scheduler.pool
        ours = pool.helper_pids() | set(pool.processes())
        if self.ctx.allow.probe is not None:
            ours |= self.ctx.allow.probe.pids()
        known = ours | self._ending
        supervisor.reap_children(skip=ours)
        sched = self.ctx.scheduler
        workers = {s.pid: s.current for s in pool.slots.values() if s.pid is not None}
        running = {jid: r.started_at for jid, r in sched.running.items()}
        parents = tuple(workers)
        kids = leftovers.child_map(parents)
        orphans = [p for p in leftovers.find_leftovers(known, workers, running, kids)
                   if p.pid not in self._ending]
        stray = leftovers.stray_jobs(known, set(running) | set(sched.dispatched), kids) - self._chasing
        if not orphans and not stray:
            return
        pids = {p.pid for p in orphans}
        self._ending |= pids
        self._chasing |= stray

        async def end() -> None:
            try:
                await asyncio.to_thread(leftovers.sweep, orphans, self.ctx.cfg.supervisor.kill_grace, stray,
                                        parents)
            finally:
                self._ending -= pids
                self._chasing -= stray

        task = asyncio.get_running_loop().create_task(end())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _checkpoint(self, tasks: set[asyncio.Task[None]]) -> None:
        """One WAL checkpoint at a time, in a thread."""
        if any(t.get_name() == "checkpoint" for t in tasks):
            return
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.ctx.store.checkpoint),
                                                      name="checkpoint")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _expire(self) -> None:
        now = time.monotonic()
        ttl = self.ctx.cfg.jobs.result_ttl
        if now - self._last_expire < min(ttl / 4, 30.0):
            return
        self._last_expire = now
        n = await self.ctx.store.expire(ttl)
        if n:
            log.debug("expired %d finished jobs", n)

    async def _record_processes(self) -> None:
        """Keeps the store's list of our processes current, so a next instance can end them."""
        pool = self.ctx.scheduler.pool
        probe = self.ctx.allow.probe.pids() if self.ctx.allow.probe is not None else set()
        pids = frozenset({os.getpid(), *pool.processes(), *probe, *(pool.helper_pids() - {os.getpid()})})
        if pids == self._recorded:
            return
        records = []
        for pid in pids:
            ident = supervisor.identity(pid)
            if ident is not None:
                role = "daemon" if pid == os.getpid() else "worker"
                records.append((ident[0], ident[1], role))
        await self.ctx.store.record_processes(records)
        self._recorded = pids

    def _report_status(self) -> None:
        st = self.ctx.scheduler.state()
        busy = st["workers"].get("busy", 0)
        total = sum(st["workers"].values())
        status = f"STATUS={st['queued']} queued, {st['running']} running, {busy}/{total} workers busy"
        if status != self._status:
            self._status = status
            systemd.notify(status)

    async def _watchdog(self, period: float) -> None:
        """WATCHDOG=1 only while healthy: a hung loop, no live worker or a dead SQLite store stops
        the pings (a restart may mend those); a PostgreSQL database out of reach does not."""
        while True:
            await asyncio.sleep(period)
            reasons = [r for r in health_reasons(self.ctx) if not r.startswith("draining")]
            if self.ctx.cluster is not None:  # a database away is waited out (reconnecting), not
                reasons = [r for r in reasons if not r.startswith(STORE_REASON)]  # a restart's to mend
            if not reasons and self._loop_lag < period:
                systemd.notify("WATCHDOG=1")
            else:
                log.warning("watchdog ping withheld: %s", "; ".join(reasons) or "event loop lagging")

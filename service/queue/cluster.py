"""A host of a cluster (PostgreSQL): heartbeats that renew the lease, the rescue of dead
hosts' jobs, and what the other hosts NOTIFY (jobs to claim, jobs ended, jobs cancelled).

The lease is renewed only by a heartbeat the database took: it runs
`host_timeout - heartbeat_interval` from the moment that heartbeat was sent, so it runs
out here before any other host can judge this one dead (`host_timeout` after the last
heartbeat, by the database's clock), and the workers end their jobs then even while this
process is frozen (service.engine.lease).
"""

from __future__ import annotations

import asyncio
import logging

from service.config import ClusterConfig
from service.engine import lease
from service.queue.dispatcher import Scheduler
from service.store.base import StoreError
from service.store.postgres.listener import Listener
from service.store.postgres.notices import Notice
from service.store.postgres.store import PgStore

log = logging.getLogger("poold.cluster")


class HostKeeper:
    def __init__(self, cfg: ClusterConfig, store: PgStore, scheduler: Scheduler, url: str) -> None:
        self.cfg, self.store, self.scheduler = cfg, store, scheduler
        self.listener = Listener(url, store.channel, self._heard)
        self.draining = False

    def renew(self, sent: float) -> None:
        held = self.scheduler.pool.lease
        if held is None:
            return
        was = held.valid()
        held.renew(sent + self.cfg.host_timeout - self.cfg.heartbeat_interval)
        if not was:
            self.scheduler.kick()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.listener.run())
            tg.create_task(self._beats())

    async def _beats(self) -> None:
        while True:
            try:
                await self.beat()
            except StoreError:
                pass  # the store has said so (once); the lease runs out if this goes on
            except Exception:  # a failed beat must not end the heartbeats: log it and go on
                log.exception("heartbeat failed")
            await asyncio.sleep(self.cfg.heartbeat_interval)

    async def beat(self) -> None:
        sent = lease.now()
        before = await self.store.hosts.beat(self.draining, self.scheduler.workers())
        if before is None:
            log.error("this host's row was taken by another instance named %r", self.store.host_name)
            return
        self.renew(sent)
        if before == "dead":
            log.warning("this host was judged dead (silent for %g s): its jobs went to other hosts",
                        self.cfg.host_timeout)
        retried, failed = await self.store.hosts.rescue_dead()
        if retried or failed:
            log.warning("rescued the jobs of a dead host: %d requeued, %d failed as interrupted",
                        retried, failed)
            self.scheduler.kick()
        await self.store.refresh_queued()
        sched = self.scheduler
        held = {j: (sched.running.get(j), sched.dispatched.get(j))
                for j in {*sched.running, *sched.dispatched}}
        stray = await self.store.unstarted_claims()
        if stray:  # claimed in the database, unknown here (a claim's answer lost): back to the queue
            if lost := [c for c in stray if c.id not in sched.dispatched and c.id not in sched.running]:
                log.warning("%d jobs claimed here but never received go back to the queue", len(lost))
                self.store.release(lost)
        if held and (gone := await self.store.not_running_here(list(held))):
            # a cancel (or a rescue) whose notice did not reach here; not a job that ended and
            # was claimed again while the store was asked
            sched.drop([j for j in gone if (sched.running.get(j), sched.dispatched.get(j)) == held[j]])

    def _heard(self, n: Notice) -> None:
        if n.kind == "q":
            self.scheduler.kick()
        elif n.kind == "e":
            self.scheduler.waiters.wake(n.ids)
        elif n.kind == "c":
            self.scheduler.drop([i for i in n.ids if i in self.scheduler.running
                                 or i in self.scheduler.dispatched])
            self.scheduler.waiters.wake(n.ids)

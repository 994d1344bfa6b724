"""Hosts of one cluster: registration, heartbeats, and the rescue of a dead host's jobs.

A host's row holds its name, this start's instance id (the claim token of its jobs),
its machine and pid, and `last_seen`, written with the database's clock. A host
silent for `host_timeout` is dead: any live host rescues its running jobs (retried,
or failed as interrupted) in the statement that declares it dead, so two hosts
cannot rescue the same job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import psutil

from service.model import ErrorType, iso, job_error
from service.store.postgres import notices
from service.store.postgres import queries as q

if TYPE_CHECKING:
    from service.store.postgres.store import PgStore

log = logging.getLogger("poold.cluster")


def machine_id() -> str:
    """This machine (its boot, in fact): a pid means something only on the machine it ran on."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _alive(pid: int) -> bool:
    """A process of this machine runs with that pid (a zombie is dead: it only waits to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _lost(why: str) -> str:
    return json.dumps(job_error(ErrorType.INTERRUPTED, why))


class Hosts:
    """This host's row and what it knows of the others'; `timeout` is cluster.host_timeout."""

    def __init__(self, store: PgStore, timeout: float = 10.0) -> None:
        self.store = store
        self.timeout = timeout
        self.machine = machine_id()
        self.taken_over = (0, 0)  # what register() rescued of a previous instance: (retried, failed)
        self.clock: Callable[[], float] = time.monotonic  # the clock of the caller's lease
        self.registered_at = 0.0  # clock() when the registering statement was sent

    async def register(self, poll: float = 0.5) -> tuple[int, int]:
        """Takes this host's name; (retried, failed) jobs of its previous instance.

        A previous instance on this machine whose process is gone is taken over at once;
        a live one elsewhere (or a frozen one here) only once its heartbeat is `timeout` old.
        """
        s, said = self.store, False
        while True:
            async def body(conn: asyncpg.Connection) -> tuple[int, int] | float:
                row = await conn.fetchrow(q.HOST_LOCK, s.host_name, self.timeout)
                if row is not None and row[4] != "dead" and row[3] \
                        and not (row[1] == self.machine and not _alive(row[2])):
                    return poll
                rescued: list[Any] = []
                if row is not None:
                    rescued = await conn.fetch(q.RESCUE_INSTANCE, row[0],
                                               _lost("its host stopped while the job ran"), time.time())
                await conn.execute(q.HOST_UPSERT, s.host_name, s.instance, self.machine, os.getpid())
                await _tell(conn, s.channel, rescued)
                retried = sum(1 for r in rescued if r[1] == "queued")
                return retried, len(rescued) - retried

            sent = self.clock()
            out = await s.tx(body)
            if not isinstance(out, float):
                self.taken_over, self.registered_at = out, sent
                return out
            if not said:
                log.warning("host %r is alive elsewhere: waiting until its heartbeat is %g s old",
                            s.host_name, self.timeout)
                said = True
            await asyncio.sleep(out)

    async def beat(self, draining: bool, workers: list[dict[str, Any]]) -> str | None:
        """The heartbeat: this host is alive (or draining); the state its row had before (None:
        the row is another instance's now)."""
        s = self.store

        async def body(conn: asyncpg.Connection) -> str | None:
            before = await conn.fetchval(q.HEARTBEAT_LOCK, s.host_name, s.instance)
            if before is not None:
                await conn.execute(q.HEARTBEAT, s.host_name, s.instance, draining, json.dumps(workers))
            return None if before is None else str(before)

        out: str | None = await s.tx(body, beats=True)
        return out

    async def rescue_dead(self) -> tuple[int, int]:
        """Declares the silent hosts dead and takes their running jobs back; (retried, failed)."""
        s = self.store

        async def body(conn: asyncpg.Connection) -> list[Any]:
            lost = _lost("its host stopped answering while the job ran")
            rows = await conn.fetch(q.RESCUE_DEAD, self.timeout, lost, time.time())
            rows += await conn.fetch(q.RESCUE_ORPHANS, lost, time.time())  # dead hosts' late claims
            await _tell(conn, s.channel, rows)
            return rows

        rows = await s.tx(body, beats=True)
        retried = sum(1 for r in rows if r[1] == "queued")
        return retried, len(rows) - retried

    async def leave(self) -> tuple[int, int]:
        """A clean stop, once the workers are gone: what this host claimed and never started goes
        back to the queue as it was, what it ran is retried or failed as interrupted, and the
        host is gone (a restart need not wait for its heartbeat); (retried, failed)."""
        s = self.store

        async def body(conn: asyncpg.Connection) -> list[Any]:
            back = await conn.fetch(q.RELEASE_UNSTARTED, s.instance)
            rows = await conn.fetch(q.RESCUE_INSTANCE, s.instance,
                                    _lost("the daemon stopped while the job ran"), time.time())
            await conn.execute(q.HOST_GONE, s.host_name, s.instance)
            await _tell(conn, s.channel, rows + [(r[0], "queued") for r in back])
            return rows

        rows = await s.tx(body, beats=True)
        retried = sum(1 for r in rows if r[1] == "queued")
        return retried, len(rows) - retried

    async def listing(self) -> list[dict[str, Any]]:
        """GET /v1/hosts: every host the cluster knows, dead ones included."""
        out = []
        rows = await self.store.fetch(q.HOSTS, self.timeout)
        for name, started, seen, state, workers, running, stale in rows:
            live = [w for w in json.loads(workers) if w.get("state") in ("idle", "busy")]
            out.append({"name": name, "started_at": iso(float(started)), "last_seen": iso(float(seen)),
                        "workers": len(live), "running": int(running),
                        "state": "dead" if stale or state == "dead" else state})
        return out

    async def workers(self) -> list[dict[str, Any]]:
        """GET /v1/workers?all=true: the workers of every live host, as each last reported them."""
        out: list[dict[str, Any]] = []
        for _, _, _, state, workers, _, stale in await self.store.fetch(q.HOSTS, self.timeout):
            if not stale and state != "dead":
                out += json.loads(workers)
        return out


async def _tell(conn: asyncpg.Connection, channel: str, rescued: list[Any]) -> None:
    """Other hosts hear of rescued jobs: queued ones to claim, failed ones to wake waiters."""
    failed = [r[0] for r in rescued if r[1] != "queued"]
    payloads = notices.encode("e", failed) if failed else []
    if len(failed) < len(rescued):
        payloads.append("q")
    for p in payloads:
        await conn.execute(q.NOTIFY, channel, p)

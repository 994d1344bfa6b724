"""One LISTEN connection per host: what the other hosts NOTIFY reaches `on_notice` at once.

It reconnects by itself, backing off; while it is down `up` is False and the host falls
back to polling (the dispatcher and the long-polls look every second).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from service.store.postgres import notices
from service.store.postgres.schema import CONNECT_TIMEOUT

log = logging.getLogger("poold.cluster")

CHECK = 2.0  # seconds between looks at an idle connection (a silent network cut shows here)


class Listener:
    def __init__(self, url: str, channel: str, on_notice: Callable[[notices.Notice], None]) -> None:
        self._url, self.channel, self._on_notice = url, channel, on_notice
        self.up = False

    async def run(self) -> None:
        """Listens until cancelled."""
        pause, said = 0.0, False
        while True:
            await asyncio.sleep(pause)
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT)
                closed = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, closed))
                await conn.add_listener(self.channel, self._heard)
                self.up, pause = True, 0.0
                if said:
                    log.info("listening for other hosts' notices again")
                    said = False
                self._on_notice(notices.Notice("q", []))  # what was said while deaf: look once
                while not closed.is_set():
                    try:
                        await asyncio.wait_for(closed.wait(), CHECK)
                    except TimeoutError:
                        await conn.fetchval("SELECT 1", timeout=CHECK)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
                if not said:
                    log.warning("not listening for other hosts' notices (polling instead): %s: %s",
                                type(e).__name__, e)
                    said = True
            finally:
                self.up = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            pause = min(max(2 * pause, 0.2), 5.0)

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._on_notice(notices.decode(payload))


def _set(event: asyncio.Event, _conn: Any) -> None:
    event.set()

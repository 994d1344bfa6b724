"""Long-polls on job ends: `?wait` and POST /v1/jobs/wait park here until the jobs end.

One waiter object serves all the ids of one request, so a long-poll on thousands of jobs
costs one wake-up, not thousands of tasks. The scheduler calls `wake` once a job's end is
committed: a woken client always reads the final state from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class _Waiter:
    __slots__ = ("event", "left")

    def __init__(self, left: int) -> None:
        self.left = left
        self.event = asyncio.Event()

    async def until(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass


class Waiters:
    def __init__(self) -> None:
        self._by_id: dict[str, list[_Waiter]] = {}

    async def wait(self, ids: list[str], timeout: float, need_all: bool = True) -> None:
        """Returns when the jobs end (one of them, unless need_all) or after timeout seconds.
        The caller passes only jobs not yet final."""
        if not ids:
            return
        with self.watch(ids, need_all) as w:
            await w.until(timeout)

    @contextlib.contextmanager
    def watch(self, ids: list[str], need_all: bool = True) -> Iterator[_Waiter]:
        """A waiter on `ids`, registered before the caller reads their states: an end that
        comes between the read and the wait is not missed."""
        w = _Waiter(len(ids) if need_all else 1)
        for jid in ids:
            self._by_id.setdefault(jid, []).append(w)
        try:
            yield w
        finally:
            if w.left > 0:
                for jid in ids:
                    lst = self._by_id.get(jid)
                    if lst is not None and w in lst:
                        lst.remove(w)
                        if not lst:
                            del self._by_id[jid]

    def wake(self, ids: list[str]) -> None:
        for jid in ids:
            for w in self._by_id.pop(jid, ()):
                w.left -= 1
                if w.left <= 0:
                    w.event.set()

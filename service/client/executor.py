"""`Executor`: a `concurrent.futures.Executor` whose calls run in a poold daemon.

Swap it in for `ProcessPoolExecutor` and the program runs its jobs on the
daemon's cores instead: functions travel by name ("module:qualname") and
arguments as JSON, so the daemon must be able to import the function and
permit it (`jobs.allow`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from service.client.common import Fn, encode, fn_name, job_spec
from service.client.futures import JobFuture
from service.client.sync import Client
from service.client.tracker import Tracker

__all__ = ["Executor"]

_live: weakref.WeakSet[Tracker] = weakref.WeakSet()


@atexit.register
def _finish_at_exit() -> None:
    """Waits for jobs still in flight at exit, as the stdlib executors do."""
    for tracker in list(_live):
        tracker.shutdown(wait=True, cancel_futures=False)


class Executor(concurrent.futures.Executor):
    """Runs calls as poold jobs; `max_pending` bounds the jobs in flight (`submit` then blocks).

    `timeout`, `priority` and `retries` apply to every job it submits.
    `unavailable_timeout` is how long it keeps retrying while the daemon
    cannot be reached (say, during a restart) before failing the futures.
    """

    def __init__(self, url: str | None = None, token: str | None = None, max_pending: int = 1000, *,
                 timeout: float | None = None, priority: int = 0, retries: int = 0,
                 unavailable_timeout: float = 60.0, request_timeout: float = 30.0) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.client = Client(url, token, request_timeout=request_timeout, pool_size=4)
        self.max_pending = max_pending
        self._options: dict[str, Any] = {"timeout": timeout, "priority": priority, "retries": retries}
        self._spec_cache: dict[str, _Specs] = {}  # by function name
        self._tracker = Tracker(self.client, max_pending, unavailable_timeout)
        _live.add(self._tracker)

    def _specs(self, name: str) -> _Specs:
        specs = self._spec_cache.get(name)
        if specs is None:
            specs = self._spec_cache.setdefault(name, _Specs(name, self._options))
        return specs

    def submit(self, fn: Fn, /, *args: Any, **kwargs: Any) -> JobFuture:
        """Schedules fn(*args, **kwargs) as one job; fn is a module-level function or "module:name"."""
        name = fn_name(fn)
        return self._tracker.add(name, [self._specs(name)(args, kwargs)], coalesce=True)[0]

    def map(self, fn: Fn, *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Like the stdlib's map: one job per item, each chunk of `chunksize` one batch request.

        Everything is submitted before the first result is returned; results
        come in order, and leaving the loop early cancels what has not started.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else timeout + time.monotonic()
        name = fn_name(fn)
        spec = self._specs(name)
        size = min(chunksize, self.max_pending)
        items = zip(*iterables)  # noqa: B905 -- stops at the shortest, as the stdlib's map
        futures: list[JobFuture] = []
        while chunk := list(itertools.islice(items, size)):
            specs = [spec(args) for args in chunk]
            # chunksize=1 (the default) lets the executor merge items into bigger batches
            futures += self._tracker.add(name, specs, coalesce=chunksize == 1)
        return _results(futures, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As the stdlib's: no new jobs; optionally cancel queued ones; optionally wait for the rest."""
        self._tracker.shutdown(wait, cancel_futures)


class _Specs:
    """JobSpecs of one function and options: the constant parts encoded once, not per call."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self._head = encode({"fn": name})[:-1] + b',"args":'
        rest = job_spec(name, **options)
        del rest["fn"], rest["args"]
        self._tail = b"," + encode(rest)[1:] if rest else b"}"

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> bytes:
        """The spec of fn(*args, **kwargs); TypeError when they are not JSON values."""
        if kwargs:
            return self._head + encode(args) + b',"kwargs":' + encode(kwargs) + self._tail
        return self._head + encode(args) + self._tail


def _results(futures: list[JobFuture], end: float | None) -> Iterator[Any]:
    try:
        futures.reverse()  # pop from the end, so yielded futures are released as we go
        while futures:
            f = futures.pop()
            try:
                yield f.result() if end is None else f.result(end - time.monotonic())
            except BaseException:
                f.cancel()
                raise
    finally:
        for f in futures:
            f.cancel()

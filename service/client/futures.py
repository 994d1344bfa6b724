"""The futures an Executor hands out, the count of jobs it has in flight, and what the
watch threads need of the book of futures (`Book`): the tracker implements it, and the
modules below it name only this protocol, so nothing imports the tracker but the executor."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeAlias, TypeVar

from service.client.common import Job
from service.client.errors import PooldError

T = TypeVar("T")


class Canceller(Protocol):
    def cancel(self, f: JobFuture) -> bool: ...


class JobFuture(concurrent.futures.Future[Any]):
    """The Future of one poold job; `cancel()` also cancels the job while it is queued.

    The bookkeeping fields are guarded by the tracker's lock (one lock for all
    futures, none of their own: an executor makes thousands of them).
    """

    def __init__(self, tracker: Canceller, fn: str, spec: bytes) -> None:
        super().__init__()
        self.fn = fn
        self.job_id: str | None = None  # set once the daemon accepted the job
        self.job: Job | None = None  # the Job as last seen
        self._tracker = tracker
        self._spec = spec
        self._claimed = False  # one thread owns the transition to done
        self._sending = False  # in a batch request that has not been answered yet

    def cancel(self) -> bool:
        return self._tracker.cancel(self)


class Permits:
    """Counts jobs in flight; a chunk takes all its permits at once (no deadlock between maps)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = limit
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._free >= n)
            self._free -= n

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()


Outcome: TypeAlias = tuple[JobFuture, Job | None, BaseException | None]  # a future, its Job or error


class Book(Protocol):
    """The tracker's side that the watch threads use; every field is guarded by `lock`."""

    lock: threading.Lock
    changed: threading.Condition
    outstanding: dict[str, JobFuture]
    unstarted: dict[str, JobFuture]
    plain_ids: bool

    @property
    def client(self) -> Any: ...
    def idle(self) -> bool: ...
    def claim(self, items: Iterable[Outcome]) -> list[Outcome]: ...
    def resolve(self, won: list[Outcome]) -> None: ...
    def settle(self, items: Iterable[Outcome]) -> int: ...
    def observe(self, f: JobFuture, job: Job) -> int: ...
    def mark_running(self, seen: Iterable[tuple[JobFuture, Job | None]]) -> int: ...
    def patiently(self, action: Callable[[], T], retry: Callable[[PooldError], bool]) -> T: ...

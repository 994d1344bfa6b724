"""The futures an Executor hands out, and the count of jobs it has in flight."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any

from service.client.common import Job

if TYPE_CHECKING:
    from service.client.tracker import Tracker


class JobFuture(concurrent.futures.Future[Any]):
    """The Future of one poold job; `cancel()` also cancels the job while it is queued.

    The bookkeeping fields are guarded by the tracker's lock (one lock for all
    futures, none of their own: an executor makes thousands of them).
    """

    def __init__(self, tracker: Tracker, fn: str, spec: bytes) -> None:
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

"""A host's lease on its running jobs, in shared memory: the owner renews it, the workers
watch it. A worker whose lease has run out kills its job's whole tree and exits, even while
its owner is frozen (SIGSTOP) or cut off: another host may be given the job from then on.

The deadline is CLOCK_MONOTONIC seconds, one clock for every process of the machine; 0
means no lease is kept (a single host: nothing else could take the job).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

POLL = 0.05  # seconds between a worker's looks at the lease
EXPIRED_EXIT = 75  # a worker's exit status when it ended its job for an expired lease


class Lease:
    def __init__(self, ctx: Any) -> None:
        self.value = ctx.RawValue("d", 0.0)  # passed to each worker at its start

    def renew(self, until: float) -> None:
        """Until `until` (time.monotonic()) the jobs may run."""
        self.value.value = until

    def valid(self) -> bool:
        d = float(self.value.value)
        return d == 0.0 or time.monotonic() < d


def watch(value: Any, running: Callable[[], bool]) -> None:
    """In a worker: a thread that ends the running job, tree and worker, once the lease is out."""
    threading.Thread(target=_watch, args=(value, running), name="poold-lease", daemon=True).start()


def _watch(value: Any, running: Callable[[], bool]) -> None:
    while True:
        time.sleep(POLL)
        d = float(value.value)
        if d and time.monotonic() >= d and running():
            _end_tree()
            os._exit(EXPIRED_EXIT)


def _end_tree() -> None:
    try:
        import psutil

        for p in reversed(psutil.Process().children(recursive=True)):
            try:
                p.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001 - best effort on the way out: the exit follows anyway
        pass

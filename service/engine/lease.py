"""A host's lease on its running jobs, in shared memory: the owner renews it, the workers
watch it. A worker whose lease has run out kills its job's whole tree and exits, even while
its owner is frozen (SIGSTOP) or cut off: another host may be given the job from then on.

The deadline is CLOCK_BOOTTIME seconds (`now()`): one clock for every process of the
machine that, unlike CLOCK_MONOTONIC, goes on while the machine is suspended, when the other
hosts' clock does too. 0 means no lease is kept (a single host: nothing else could take the job).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

POLL = 0.05  # seconds between a worker's looks at the lease
EXPIRED_EXIT = 75  # a worker's exit status when it ended its job for an expired lease


def now() -> float:
    return time.clock_gettime(_CLOCK)


_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class Lease:
    def __init__(self, ctx: Any) -> None:
        self.value = ctx.RawValue("d", 0.0)  # passed to each worker at its start

    def renew(self, until: float) -> None:
        """Until `until` (now()) the jobs may run."""
        self.value.value = until

    def valid(self) -> bool:
        d = float(self.value.value)
        return d == 0.0 or now() < d


def watch(value: Any, running: Callable[[], str | None]) -> None:
    """In a worker: a thread that ends the running job (`running()`: its id, None between
    jobs), its whole tree and the worker, once the lease is out."""
    threading.Thread(target=_watch, args=(value, running), name="poold-lease", daemon=True).start()


def out(value: Any) -> bool:
    """In a worker: the lease has run out (checked again before each job starts: a worker
    blocked on a full pipe while its owner was frozen must not start one once it thaws)."""
    d = float(value.value)
    return bool(d) and now() >= d


def end(job: str) -> NoReturn:
    """Ends the job's tree and the worker: the lease is out."""
    _end_tree(job)
    os._exit(EXPIRED_EXIT)


def _watch(value: Any, running: Callable[[], str | None]) -> None:
    while True:
        time.sleep(POLL)
        if out(value) and (job := running()) is not None:
            end(job)


def _end_tree(job: str) -> None:
    """Kills this worker's descendants, and the job's detached ones (they carry its id in
    POOLD_JOB_ID): with the owner frozen, nobody else would."""
    try:
        import psutil

        doomed = psutil.Process().children(recursive=True)
        for p in psutil.process_iter():
            try:
                if p.environ().get("POOLD_JOB_ID") == job:
                    doomed.append(p)
            except psutil.Error:
                pass
        for p in reversed(doomed):
            if p.pid != os.getpid():
                try:
                    p.kill()
                except psutil.Error:
                    pass
    except Exception:  # noqa: BLE001 - best effort on the way out: the exit follows anyway
        pass

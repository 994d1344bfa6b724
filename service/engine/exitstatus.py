"""A multiprocessing fix: a forkserver child's exit status, read whole by one thread."""

from __future__ import annotations

import os
import threading
from typing import Any


def whole_reads() -> None:
    """Makes a forkserver child's exit status one read, whichever thread asks first.

    Under forkserver, Popen.poll() reads the status from a pipe. Two threads poll the same
    dying worker: the executor's own (joining it) and ours (Process.start() polls every child
    to prune the dead: a new worker of another slot). When both read, one gets the status and
    the other EOF, which multiprocessing records as 255, sometimes last. A lock around the read
    (never around the wait) makes the first read the only one.
    """
    from multiprocessing import forkserver, popen_forkserver
    from multiprocessing.connection import wait

    if getattr(popen_forkserver.Popen.poll, "_poold", False):
        return
    lock = threading.Lock()

    def poll(self: Any, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None:
            if not wait([self.sentinel], 0 if flag == os.WNOHANG else None):
                return None
            with lock:
                if self.returncode is None:
                    try:
                        self.returncode = forkserver.read_signed(self.sentinel)
                    except (OSError, EOFError):  # the forkserver itself is gone
                        self.returncode = 255
        return self.returncode  # type: ignore[no-any-return]

    poll._poold = True  # type: ignore[attr-defined]
    popen_forkserver.Popen.poll = poll  # type: ignore[method-assign]

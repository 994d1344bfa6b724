"""Watching processes end, shared by bench and tests.

`ended` and `when_ended` tell when a process no longer runs (exited, even if its pid was reused,
or a zombie); `python -m bench.supervision` and tests/e2e/test_supervision.py both time a job's
process tree with them.
"""

from __future__ import annotations

import time

import psutil


def ended(p: psutil.Process | None) -> bool:
    """True when the process no longer runs: exited (even if its pid was reused) or a zombie."""
    if p is None:
        return True
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def when_ended(procs: dict[str, psutil.Process | None], timeout: float) -> dict[str, float]:
    """Polls (every 5 ms) until every process has ended or `timeout` passes; returns, for each that
    ended, the wall-clock time (time.time(), comparable with a Job's timestamps) it was first seen
    ended. bench/supervision.py and tests/e2e/test_supervision.py use it."""
    seen: dict[str, float] = {}
    end = time.monotonic() + timeout
    while len(seen) < len(procs) and time.monotonic() < end:
        for k, p in procs.items():
            if k not in seen and ended(p):
                seen[k] = time.time()
        time.sleep(0.005)
    return seen

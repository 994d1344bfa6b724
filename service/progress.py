"""`service.progress()`: a job reports how far it has come.

Inside a worker the report travels over the worker's own pipe to the daemon;
elsewhere the call does nothing. It is cheap in a tight loop: at most one
report per `_MIN_GAP` seconds is sent, and the latest one is always flushed
when the job ends, so the last value a job reports is the one users see.
"""

from __future__ import annotations

import time
from typing import Any

_MIN_GAP = 0.05


class _Channel:
    """The running job's end of the progress pipe (set by service.engine.worker)."""

    send: Any = None  # a callable taking one message, or None outside a worker
    job_id: str | None = None
    last_sent = 0.0
    pending: tuple[float, float | None, str | None] | None = None


channel = _Channel()


def progress(current: float, total: float | None = None, message: str | None = None) -> None:
    """Reports progress of the running job; a no-op outside a poold worker."""
    if channel.send is None or channel.job_id is None:
        return
    report = (float(current), None if total is None else float(total),
              None if message is None else str(message))
    now = time.monotonic()
    if now - channel.last_sent < _MIN_GAP:
        channel.pending = report
        return
    channel.last_sent = now
    channel.pending = None
    channel.send(("progress", channel.job_id, report))


def flush() -> None:
    """Sends the report held back by the rate limit (called when a job ends)."""
    if channel.pending is not None and channel.send is not None and channel.job_id is not None:
        channel.send(("progress", channel.job_id, channel.pending))
    channel.pending = None

"""Waiting for a job from the command line, with a live tqdm bar on a terminal.

The bar is fed by the Job's `progress` ({"current", "total", "message"}). It
long-polls in short slices rather than one long poll so that intermediate reports
show; piped, one long poll (the client's `wait`) is enough.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

from service.cli.output import FINISHED, Job, number

if TYPE_CHECKING:
    from service.client import Client

POLL_SLICE = 0.25  # seconds between looks at a job while a bar is shown


def on_terminal() -> bool:
    """A bar only makes sense when a person watches stdout."""
    return sys.stdout.isatty()


def follow(client: Client, job: Job, seconds: float | None, bar: bool) -> Job:
    """The job once finished, or as it is after `seconds` (None: no limit)."""
    if job["state"] in FINISHED:
        return job
    if bar:
        return _follow_with_bar(client, job, seconds)
    try:
        return client.wait(job["id"], timeout=seconds)
    except TimeoutError:
        return client.get(job["id"])


def _bar_file() -> IO[str]:
    """stderr when it is the terminal too (stdout stays for the result), else stdout."""
    return sys.stderr if sys.stderr.isatty() else sys.stdout


def _follow_with_bar(client: Client, job: Job, seconds: float | None) -> Job:
    from tqdm import tqdm

    deadline = None if seconds is None else time.monotonic() + seconds
    with tqdm(total=None, desc=job["state"], file=_bar_file(), dynamic_ncols=True, leave=True,
              bar_format=_FORMAT_NONE) as bar:
        while True:
            _show(bar, job)
            if job["state"] in FINISHED:
                return job
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return job
            # a short long-poll: back at once when the job ends, else after one slice
            job = client.get(job["id"], wait=POLL_SLICE if left is None else min(POLL_SLICE, left))


_FORMAT_KNOWN = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]"
_FORMAT_UNKNOWN = "{desc}: {n_fmt} [{elapsed}]"
_FORMAT_NONE = "{desc} [{elapsed}]"  # nothing reported yet


def _show(bar: Any, job: Job) -> None:
    """Moves the bar to the job's last report; the message (or the state) is its label."""
    progress = job.get("progress") or {}
    total = number(progress.get("total"))
    current = number(progress.get("current") or 0)
    if total is not None and total > 0:
        bar.bar_format = _FORMAT_KNOWN
        bar.total = total
    else:
        bar.bar_format = _FORMAT_UNKNOWN if progress else _FORMAT_NONE
        bar.total = None
    bar.n = current
    state = job["state"]
    if state != "queued" and not getattr(bar, "poold_started", False):
        _clock_from(bar, job.get("started_at"))
    label = progress.get("message") if state == "running" else None
    bar.set_description_str(label or state, refresh=False)
    bar.refresh()


def _clock_from(bar: Any, started_at: str | None) -> None:
    """Makes the bar's elapsed time the job's own run time (same host, same clock)."""
    bar.poold_started = True
    try:
        start = datetime.fromisoformat(str(started_at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return
    if start <= time.time():
        bar.start_t = start

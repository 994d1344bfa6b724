"""What an embedded pool raises beyond the call's own exceptions."""

from __future__ import annotations


class WorkerDied(Exception):
    """The worker running the call died; the message names the signal or the exit code:
    "worker 2 (pid 1234) was sent SIGKILL — perhaps out of memory?"."""

"""Functions for the embedded Pool's tests: module level, so the workers can unpickle them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from service import progress


def add(a: Any, b: Any) -> Any:
    return a + b


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def pid() -> int:
    return os.getpid()


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def boom(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_once(marker: str) -> str:
    """SIGKILLs its worker on the first attempt, returns on the next."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died")
        die()
    return "second attempt"


def tree(pidfile: str, seconds: float) -> None:
    """A child `sleep` (a process tree to kill); both pids written to `pidfile`, then a long nap."""
    child = subprocess.Popen(["sleep", str(seconds + 60)])
    Path(pidfile + ".tmp").write_text(f"{os.getpid()} {child.pid}")
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(seconds)


def leave_child(pidfile: str) -> str:
    """Returns at once, leaving a child `sleep` running (the pool must end it)."""
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    Path(pidfile).write_text(str(child.pid))
    return "returned"


def report(n: int) -> int:
    for i in range(1, n + 1):
        progress(i, n, f"step {i}")
    return n


def unpicklable_value() -> Any:
    return lambda: None

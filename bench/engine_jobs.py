"""Job functions for bench.engine, importable by every side's workers (aiomultiprocess takes only
coroutine functions, so each job has an `a_` twin that calls it)."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def noop(x: object = None) -> object:
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def die() -> None:
    """The worker's own death, as the OOM killer would deal it."""
    os.kill(os.getpid(), signal.SIGKILL)


def hold(path: str, seconds: float) -> str:
    """Starts a child `sleep` (a process tree to kill), writes "<pid> <child pid>" to `path`, then
    appends a byte to `path`.beat every 20 ms for `seconds`: the file growing says the call runs."""
    child = subprocess.Popen(["sleep", str(seconds + 60)])
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(path + ".tmp", path)
    end = time.monotonic() + seconds
    with open(path + ".beat", "ab", buffering=0) as beat:
        while time.monotonic() < end:
            beat.write(b".")
            time.sleep(0.02)
    child.kill()
    child.wait()
    return "finished"


async def a_noop(x: object = None) -> object:
    return noop(x)


async def a_nap(seconds: float) -> float:
    return nap(seconds)


async def a_die() -> None:
    die()


async def a_hold(path: str, seconds: float) -> str:
    return hold(path, seconds)

"""Job functions for the benchmarks (importable by workers: the repo root is on PYTHONPATH)."""

from __future__ import annotations


def noop(x: object = None) -> object:
    return x


def cpu(n: int) -> int:
    """About n loop turns of pure Python."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _append(path: str, line: str) -> None:
    """One O_APPEND write: the lines of concurrent workers never mix."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record(path: str, tag: str, spin: float = 0.0) -> str:
    """Appends one line "<job id> <start time> <pid> <tag> <spin>" to `path`, busy-loops for
    `spin` seconds, appends "<job id> <end time> <pid> <tag> end", returns `tag`.

    Each start line is one execution of the job: the crash loop counts them and dates them.
    """
    import os
    import time

    jid = os.environ.get("POOLD_JOB_ID", "-")
    _append(path, f"{jid} {time.time():.6f} {os.getpid()} {tag} {spin}\n")
    end = time.monotonic() + spin
    while time.monotonic() < end:
        pass
    _append(path, f"{jid} {time.time():.6f} {os.getpid()} {tag} end\n")
    return tag

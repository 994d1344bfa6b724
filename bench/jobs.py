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


def record(path: str, tag: str, spin: float = 0.0) -> str:
    """Appends one line "<job id> <start time> <pid> <tag>" to `path` (one O_APPEND write, so the
    lines of concurrent workers never mix), busy-loops for `spin` seconds, returns `tag`.

    Each line is one execution of the job: the crash loop counts them and dates them.
    """
    import os
    import time

    line = f"{os.environ.get('POOLD_JOB_ID', '-')} {time.time():.6f} {os.getpid()} {tag}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    end = time.monotonic() + spin
    while time.monotonic() < end:
        pass
    return tag

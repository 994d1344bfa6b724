"""CPU-bound demo jobs; the default allow list (`service.demo:*`) permits exactly these."""

from __future__ import annotations

import time

from service.progress import progress

__all__ = ["fib", "primes", "sleep", "spin"]


def fib(n: int) -> int:
    """The n-th Fibonacci number, computed the slow recursive way (pure CPU)."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def spin(seconds: float) -> int:
    """A busy loop for `seconds`; returns how many turns it made."""
    end = time.monotonic() + seconds
    turns = 0
    while time.monotonic() < end:
        turns += 1
    return turns


def sleep(seconds: float) -> float:
    """Sleeps (no CPU), reporting progress each second."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        progress(seconds - left, seconds)
        time.sleep(min(1.0, left))
    progress(seconds, seconds)
    return seconds


def primes(n: int) -> list[int]:
    """The primes below n, by trial division (pure CPU)."""
    found: list[int] = []
    for k in range(2, max(2, n)):
        if all(k % p for p in found if p * p <= k):
            found.append(k)
        if k % 10000 == 0:
            progress(k, n)
    return found

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

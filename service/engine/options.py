"""The engine's own settings: what a pool of workers is, with no configuration file behind it.

The daemon builds these from its `[pool]` table; an embedded `service.Pool` from its arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

START_METHODS = ("forkserver", "spawn", "fork")


@dataclass(frozen=True)
class PoolOptions:
    """The meanings of the `[pool]` keys (CONTRACT.md), plus the name in process titles."""

    workers: int = 0  # 0 = one per CPU
    start_method: str = "forkserver"
    preload: tuple[str, ...] = ()  # imported by each worker (not by the forkserver) before any job
    max_tasks_per_worker: int = 0  # recycle a worker after N jobs; 0 = never
    max_memory_mb: int = 0  # recycle a worker whose RSS exceeds this after a job; 0 = never
    name: str = "poold"  # processes are titled "<name>: worker N"

    def __post_init__(self) -> None:
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {', '.join(START_METHODS)},"
                             f" not {self.start_method!r}")
        for key in ("workers", "max_tasks_per_worker", "max_memory_mb"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, not {value!r}")

    @property
    def size(self) -> int:
        """The number of worker slots."""
        return self.workers or os.cpu_count() or 1

"""How many jobs go to a worker at once: from each function's measured run time.

The executor's cost per submit is paid once per batch, so short functions go several at a
time (a batch takes about BATCH_SECONDS); a long or unknown function goes alone, so that
priorities and cancels stay prompt. Both faces of the engine (the daemon's dispatcher and the
embedded Pool) size their batches here.
"""

from __future__ import annotations

from collections.abc import Hashable

BATCH_SECONDS = 0.005  # aim: a batch of short jobs takes about this long
MAX_BATCH = 256


class RunTimes:
    """A moving average of each function's run time."""

    def __init__(self) -> None:
        self.seconds: dict[Hashable, float] = {}

    def update(self, fn: Hashable, seconds: float) -> None:
        old = self.seconds.get(fn)
        self.seconds[fn] = seconds if old is None else old * 0.8 + seconds * 0.2

    def batch_size(self, fn: Hashable) -> int:
        avg = self.seconds.get(fn)
        if avg is None:
            return 1
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(avg, 1e-6))))

    def short(self, fn: Hashable) -> bool:
        """Known to end in well under a batch's time: a worker may hold a second batch of it."""
        return self.batch_size(fn) > 1

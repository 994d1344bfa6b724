"""One worker slot: its state, and the protocols between the slots and their owner."""

from __future__ import annotations

import multiprocessing.connection
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.engine.frames import FrameReader
from service.engine.protocol import Event

STARTING_GRACE = 10.0  # seconds a worker being started or replaced counts as alive (/health)


class Owner(Protocol):
    """Who the slots report to."""

    def slot_events(self, slot: Slot, msgs: list[Event]) -> None: ...
    def batch_ended(self, slot: Slot, batch: list[Any], exc: BaseException | None) -> None: ...
    def slot_ready(self, slot: Slot) -> None: ...
    def slot_failed(self, slot: Slot, exc: BaseException) -> None: ...
    def slot_replaced(self, why: str) -> None: ...


@dataclass(eq=False)
class Slot:
    """One worker process and what it is doing."""

    n: int
    title: str = "poold: worker"  # "<name>: worker N"
    state: str = "starting"  # starting | idle | busy
    pid: int | None = None
    started_at: float = 0.0
    tasks_done: int = 0
    executor: ProcessPoolExecutor | None = None
    process: Any = None  # the multiprocessing.Process behind the executor (for its exit code)
    events: multiprocessing.connection.Connection | None = None
    control: multiprocessing.connection.Connection | None = None
    batches: list[list[Any]] = field(default_factory=list)  # the owner's, by id: submitted, not ended
    current: str | None = None  # the job that has started and not ended
    current_started: float = 0.0
    kill_reason: dict[str, str] = field(default_factory=dict)  # job id -> "timeout" | "cancel"
    reader: FrameReader | None = None
    killed: str = ""  # why the daemon killed it ("timeout", "cancel", …); "" while it lives
    dying: bool = False  # its death is being handled
    exit: str = "died"  # how it ended ("was sent SIGKILL", "exited with code 3")
    oom_kills: int = 0  # the kernel's OOM kill count when this worker started
    retiring: bool = False  # drop once its batches end (resizing)
    renewing: bool = False  # replace once its batches end (a reload: fresh imports)
    launched: float = field(default_factory=time.monotonic)  # this slot's worker was asked for
    generation: int = 0

    @property
    def name(self) -> str:
        return self.title

    def taking(self) -> bool:
        """Whether it may be given a batch now."""
        return not (self.retiring or self.renewing or self.killed or self.dying or self.executor is None)

    def coming(self) -> bool:
        """Starting or being replaced, recently enough to count as alive."""
        return self.state == "starting" and time.monotonic() - self.launched < STARTING_GRACE

    def pending_ids(self) -> set[str]:
        return {c.id for b in self.batches for c in b}

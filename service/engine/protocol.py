"""The messages between a worker and its parent, typed.

Parent → worker: a batch (a list of JsonJob or PickledCall) through the slot's executor, and
ids not to start on the slot's control pipe. Worker → parent, on the slot's event pipe, as they
happen: Started, Progress, Done (one job's end and the next one's start travel together).

Event messages cross as plain tuples tagged with a small integer (`encode` / `decode`): a
NamedTuple pickles by class reference, which costs three times a tuple's pickling, on the
path every job takes. Control messages are rare and go as they are.
Imported by workers: the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

# -- what a worker runs


class JsonJob(NamedTuple):
    """A daemon job: fn named "module:name", its arguments as JSON text (decoded in the worker)."""

    id: str
    fn: str
    args: str
    kwargs: str
    seq: int  # the store's sequence number and the attempts before this one: for the start ledger
    attempts: int


class PickledCall(NamedTuple):
    """An embedded pool's call: pickle.dumps((fn, args, kwargs)), made in the caller."""

    id: str
    payload: bytes


Job = JsonJob | PickledCall


@dataclass(frozen=True)
class WorkerSetup:
    """What a new worker is told once, at its start (the executor's initializer argument)."""

    slot: int
    name: str = "poold"  # titles: "<name>: worker N"
    preload: tuple[str, ...] = ()
    close_fds: tuple[int, ...] = ()  # the parent's pipe ends a fork-started worker must not keep
    ledger: str | None = None  # this slot's start ring (service.engine.ledger), daemon only
    label_output: bool = False  # prefix each output line with the running job (the daemon's log)
    end_children: bool = False  # end every child a job leaves, right after it (an embedded pool)


# -- outcomes of a job (Done.outcome)

OK = "ok"  # payload: the result, JSON text (JsonJob) or a pickle (PickledCall)
ERROR = "error"  # payload: an error dict (service.model.job_error)
RAISED = "raised"  # payload: service.engine.pickled.Raised, a PickledCall's exception


# -- worker → parent


class Started(NamedTuple):
    id: str
    t: float  # time.time() in the worker, just before the call


class Progress(NamedTuple):
    id: str
    current: float
    total: float | None
    message: str | None


class Done(NamedTuple):
    id: str
    outcome: str  # OK | ERROR | RAISED
    payload: Any
    seconds: float  # the call's run time
    next_id: str | None  # the job started right after this one (None at a batch's end)
    next_t: float


Event = Started | Progress | Done

_KINDS: tuple[type[Any], ...] = (Started, Progress, Done)
_TAGS: dict[type[Any], int] = {k: i for i, k in enumerate(_KINDS)}


def encode(msg: Event) -> tuple[Any, ...]:
    return (_TAGS[type(msg)], *msg)


def decode(raw: tuple[Any, ...]) -> Event:
    msg: Event = _KINDS[raw[0]]._make(raw[1:])
    return msg

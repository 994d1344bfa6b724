"""One vocabulary for every layer: job states, error types, the error shapes.

Each fact is written here once. The engine, the store, the queue, HTTP, the
CLI and the clients spell a state or an error type through these names, so a
new state (the schedules issue adds `scheduled` and `waiting`) is one edit.
Kept free of imports beyond the standard library: worker processes and the
clients load it too.
"""

from __future__ import annotations

import time
import traceback
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """A job's state (CONTRACT.md, "Job"): queued → running → one of the final four."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


FINAL_STATES: tuple[str, ...] = (State.SUCCEEDED.value, State.FAILED.value, State.TIMED_OUT.value,
                                 State.CANCELLED.value)
STATES: tuple[str, ...] = (State.QUEUED.value, State.RUNNING.value, *FINAL_STATES)


class ErrorType(StrEnum):
    """`error.type` of a failed or timed-out job."""

    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    WORKER_DIED = "worker_died"
    UNSERIALIZABLE_RESULT = "unserializable_result"
    RESULT_TOO_LARGE = "result_too_large"
    INTERRUPTED = "interrupted"
    FUNCTION_NOT_FOUND = "function_not_found"


def job_error(kind: ErrorType | str, message: str, exc: BaseException | None = None) -> dict[str, Any]:
    """A Job's `error` object: {type, message, exception, traceback}; the last two from `exc`."""
    tb = None
    if exc is not None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": str(kind), "message": message, "exception": type(exc).__name__ if exc else None,
            "traceback": tb}


class ApiError(Exception):
    """A refusal users see: an HTTP status, an error code of the contract's table, a message
    naming the field. Raised by any layer that judges a request; answered by service.http."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def iso(t: float | None) -> str | None:
    """2026-11-24T12:00:00.000000Z (UTC, microseconds)."""
    if t is None:
        return None
    sec = int(t)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((t - sec) * 1e6):06d}Z"

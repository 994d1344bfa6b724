"""The exceptions the clients raise.

`JobFailed` doubles as the built-in exception the job raised remotely (a
`JobFailed` for a remote `ValueError` is also a `ValueError`), so code written
for `ProcessPoolExecutor` keeps its `except ValueError:` clauses.
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = ["JobFailed", "PooldError", "PooldUnavailable", "job_failed"]

# Built-ins that must never be mixed in: generators and coroutines treat a raised
# StopIteration specially (PEP 479), and BaseException subclasses are filtered anyway.
_NEVER_MIXED = frozenset({"StopIteration", "StopAsyncIteration"})


class PooldError(Exception):
    """Base class; `status` and `code` come from the daemon's error answer (None without one)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after  # seconds, from Retry-After on 429 queue_full

    def __str__(self) -> str:
        if self.status is None:
            return self.message
        return f"{self.status} {self.code or 'error'}: {self.message}"


class PooldUnavailable(PooldError):
    """The daemon could not be reached (refused, reset, timed out, unresolvable)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class JobFailed(PooldError):
    """A job ended `failed` or `timed_out`; `.job` is the finished Job."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.error: dict[str, Any] = job.get("error") or {}
        self.remote_exception: str | None = self.error.get("exception")
        self.remote_traceback: str | None = self.error.get("traceback")
        super().__init__(_describe(job))

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message; keep one readable form for every mix-in.
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # The mixed-in classes are made at run time and cannot be pickled by name.
        return (job_failed, (self.job,))


def _describe(job: dict[str, Any]) -> str:
    """"job ID (fn) failed (exception): ValueError: message" -- what, where and why."""
    error = job.get("error") or {}
    exc, msg = error.get("exception"), str(error.get("message") or "")
    if exc and msg != exc and not msg.startswith(f"{exc}:"):
        msg = f"{exc}: {msg}" if msg else exc
    head = f"job {job.get('id')} ({job.get('fn')}) {job.get('state')} ({error.get('type', 'unknown')})"
    return f"{head}: {msg}" if msg else head


def _builtin_class(name: str | None) -> type[Exception] | None:
    """The built-in exception class named by the job's `error.exception`, if it is one."""
    if not name:
        return None
    module, _, short = name.rpartition(".")
    if module not in ("", "builtins") or short in _NEVER_MIXED:
        return None
    cls = getattr(builtins, short, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls
    return None


_MIXED: dict[type[Exception], type[JobFailed]] = {}


def _mixed(base: type[Exception]) -> type[JobFailed]:
    """`JobFailed[ValueError]`: one class per built-in, made once (a race only makes a twin)."""
    cls = _MIXED.get(base)
    if cls is None:
        made = type(f"JobFailed[{base.__name__}]", (JobFailed, base), {"__module__": __name__})
        cls = _MIXED.setdefault(base, made)
    return cls


def job_failed(job: dict[str, Any]) -> JobFailed:
    """The `JobFailed` for a finished job, also an instance of the remote built-in exception.

    Some built-ins cannot take a single message (UnicodeDecodeError needs five
    arguments), so the nearest ancestor that can is used instead.
    """
    base = _builtin_class((job.get("error") or {}).get("exception"))
    for cls in base.__mro__ if base else ():
        if not issubclass(cls, Exception) or cls is Exception:
            break
        try:
            return _mixed(cls)(job)
        except TypeError:  # a constructor or layout that does not fit: try its parent
            continue
    return JobFailed(job)

"""How an embedded pool's calls cross the process boundary: pickled, as ProcessPoolExecutor does.

The call (fn, args, kwargs) is pickled in the caller, so an argument that cannot be pickled is
refused there, at once. The value and the exception are pickled in the worker into bytes the
event pipe carries as they are: what cannot be unpickled in the parent fails that one call,
never the pipe. An exception comes back with the worker's formatted traceback as its
`__cause__`, as concurrent.futures' `_ExceptionWithTraceback` does.
Imported by workers: the standard library only.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any, NamedTuple

PROTOCOL = pickle.HIGHEST_PROTOCOL


class _RemoteTraceback(Exception):
    """The worker's traceback, as text (concurrent.futures.process._RemoteTraceback's twin)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = _RemoteTraceback(tb)
    return exc


class _WithTraceback:
    """Pickles as the exception, rebuilt with its traceback text attached as __cause__."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc, self.tb = exc, tb

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (self.exc, self.tb)


class Raised(NamedTuple):
    """A call's exception as it travels: the pickle, and what to say if it cannot be unpickled."""

    blob: bytes
    tb: str  # '\n"""\n<formatted traceback>"""', as concurrent.futures shows it
    name: str  # the exception's class name


def dump_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return pickle.dumps((fn, args, kwargs), PROTOCOL)


def dump_exception(exc: BaseException) -> Raised:
    """In the worker: the exception, pickled with its traceback. One that cannot be pickled
    comes back as the pickling error (as with ProcessPoolExecutor), naming the original."""
    tb = '\n"""\n' + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + '"""'
    exc.__traceback__ = None
    try:
        return Raised(pickle.dumps(_WithTraceback(exc, tb), PROTOCOL), tb, type(exc).__name__)
    except Exception as e:  # noqa: BLE001 - any failure to pickle is reported, not raised
        stand_in = type(e)(f"{e} (while pickling the call's exception {type(exc).__name__}: {exc})")
        try:
            blob = pickle.dumps(_WithTraceback(stand_in, tb), PROTOCOL)
        except Exception:  # noqa: BLE001 - a pickling error that cannot be pickled itself
            blob = pickle.dumps(_WithTraceback(RuntimeError(str(stand_in)), tb), PROTOCOL)
        return Raised(blob, tb, type(exc).__name__)


def load_exception(raised: Raised) -> BaseException:
    """In the caller: the call's exception, or a RuntimeError saying why it cannot be rebuilt
    here (its class is not importable, or its __init__ wants other arguments)."""
    try:
        exc = pickle.loads(raised.blob)
    except Exception as e:  # noqa: BLE001 - whatever unpickling raises is reported in the call's name
        exc = RuntimeError(f"the call raised {raised.name}, which cannot be unpickled here:"
                           f" {type(e).__name__}: {e}")
        exc.__cause__ = _RemoteTraceback(raised.tb)
    if not isinstance(exc, BaseException):
        return RuntimeError(f"the call raised {raised.name} ({exc!r})")
    return exc

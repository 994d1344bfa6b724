"""What the clients share: where the daemon is, naming functions, JobSpecs, answers.

Nothing here does I/O, so `Client` and `AsyncClient` behave the same by
construction; `ops.py` builds the requests and reads the answers.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import quote, unquote, urlsplit

from service.client.errors import PooldError, job_failed

DEFAULT_URL = "http://127.0.0.1:8321"
FINISHED = frozenset({"succeeded", "failed", "timed_out", "cancelled"})
MAX_WAIT = 60.0  # the daemon refuses ?wait= above this (422)

Job: TypeAlias = dict[str, Any]
Fn: TypeAlias = str | Callable[..., Any]


@dataclass(frozen=True)
class Target:
    """Where the daemon listens: host and port, or a Unix socket (`unix:/path`)."""

    url: str
    scheme: str  # "http", "https" or "unix"
    host: str
    port: int
    prefix: str  # a path the API is mounted under (behind a proxy), "" normally
    unix_path: str | None = None

    def path(self, path: str) -> str:
        return self.prefix + path


def resolve_url(url: str | None) -> Target:
    """The daemon's address from the argument, else $POOLD_URL, else the default."""
    raw = (url or os.environ.get("POOLD_URL") or DEFAULT_URL).strip()
    parts = urlsplit(raw)
    if parts.scheme == "unix":
        path = unquote(parts.netloc + parts.path) if parts.netloc else parts.path
        if not path:
            raise ValueError(f"no socket path in {raw!r} (use unix:/path/to/poold.sock)")
        return Target(raw, "unix", "localhost", 0, "", path)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a poold URL: {raw!r} (expected http://HOST:PORT or unix:/PATH)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Target(raw, parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def resolve_token(token: str | None) -> str | None:
    """The bearer token from the argument, else $POOLD_TOKEN; None when neither is set."""
    return token or os.environ.get("POOLD_TOKEN") or None


def headers(token: str | None) -> dict[str, str]:
    out = {"Accept": "application/json", "Content-Type": "application/json"}
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


def fn_name(fn: Fn) -> str:
    """"module:qualname" for a function the daemon's workers can import.

    The worker imports the function by name, as multiprocessing does when it
    pickles one, so only module-level functions of an importable module work.
    """
    if isinstance(fn, str):
        head, sep, tail = fn.partition(":")
        if not (sep and head and tail):
            raise ValueError(f"function name {fn!r} is not of the form 'module:name'")
        return fn
    if inspect.ismethod(fn):
        raise ValueError(f"{fn!r} is a bound method; the worker could not rebuild its instance, "
                         "use a module-level function")
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not isinstance(module, str) or not isinstance(qualname, str):
        raise ValueError(f"{fn!r} has no __module__ and __qualname__; pass a module-level "
                         "function or a 'module:name' string")
    if "<lambda>" in qualname:
        raise ValueError(f"{fn!r} is a lambda; the worker imports functions by name, "
                         "so define it with def at module level")
    if "<locals>" in qualname:
        raise ValueError(f"{module}.{qualname} is nested in another function; the worker "
                         "imports functions by name, so move it to module level")
    if module == "__main__":
        raise ValueError(f"{qualname} is defined in __main__, which the daemon's workers cannot "
                         "import; move it into a module on the daemon's PYTHONPATH")
    return f"{module}:{qualname}"


def job_spec(fn: Fn, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
             timeout: float | None = None, priority: int = 0, retries: int = 0,
             key: str | None = None) -> dict[str, Any]:
    """A JobSpec body holding only what differs from the daemon's defaults."""
    spec: dict[str, Any] = {"fn": fn_name(fn), "args": list(args)}
    if kwargs:
        spec["kwargs"] = dict(kwargs)
    if timeout is not None:
        spec["timeout"] = timeout
    if priority:
        spec["priority"] = priority
    if retries:
        spec["retries"] = retries
    if key is not None:
        spec["key"] = key
    return spec


def batch_item(item: Sequence[Any]) -> tuple[Fn, Sequence[Any], Mapping[str, Any] | None]:
    """One `(fn, args, kwargs)` entry of `submit_many` (kwargs may be left out)."""
    if isinstance(item, str) or not 1 <= len(item) <= 3:
        raise ValueError(f"submit_many takes (fn, args, kwargs) tuples, not {item!r}")
    fn = item[0]
    args = item[1] if len(item) > 1 else ()
    kwargs = item[2] if len(item) > 2 else None
    return fn, args, kwargs


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # made once: dumps() would per call


def encode(body: Any) -> bytes:
    """JSON for the wire; arguments must be JSON values (no pickles ever cross the network)."""
    try:
        return _ENCODER.encode(body).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"job arguments must be JSON values: {e}") from e


def decode(raw: bytes) -> Any:
    """The JSON of an answer, or None when it is not JSON (a proxy's error page)."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def job_path(job_id: str) -> str:
    return "/v1/jobs/" + quote(str(job_id), safe="")


def wait_param(seconds: float) -> str:
    """A `?wait=` value within the daemon's 0..60 range, without float noise."""
    s = min(MAX_WAIT, max(0.0, seconds))
    return f"{s:.3f}".rstrip("0").rstrip(".") or "0"


def error_from(status: int, data: Any, raw: bytes = b"",
               retry_after: str | None = None) -> PooldError:
    """The PooldError for an HTTP error answer `{"error": {"code", "message"}}`."""
    code: str | None = None
    message = ""
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code") if isinstance(err.get("code"), str) else None
        message = str(err.get("message") or "")
    if not message:
        message = raw[:300].decode(errors="replace").strip() or f"HTTP {status}"
    delay: float | None = None
    if retry_after:
        try:
            delay = float(retry_after)
        except ValueError:
            delay = None
    return PooldError(message, status=status, code=code, retry_after=delay)


def outcome(job: Job) -> Any:
    """The value of a finished job, or the exception its ending calls for."""
    state = job.get("state")
    if state == "succeeded":
        return job.get("result")
    if state == "cancelled":
        raise concurrent.futures.CancelledError(f"job {job.get('id')} ({job.get('fn')}) was cancelled")
    if state in ("failed", "timed_out"):
        raise job_failed(job)
    raise ValueError(f"job {job.get('id')} is not finished (state {state!r})")


class Deadline:
    """The caller's overall wait budget, cut into long-polls of at most MAX_WAIT seconds."""

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0")
        self.end = None if timeout is None else time.monotonic() + timeout

    def next_poll(self) -> float:
        if self.end is None:
            return MAX_WAIT
        return min(MAX_WAIT, max(0.0, self.end - time.monotonic()))

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

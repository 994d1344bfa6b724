"""JobSpec validation and the allow list: what may run, checked before anything is stored.

A wildcard entry ("module:*") admits only public functions defined in that
module itself, never what it imported (`os`, `subprocess`, …) nor attribute
chains; an exact entry admits exactly that name. Whether a function exists is
never found out here, by importing it, but by the probe (service.queue.allow).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from service.config import JobsConfig
from service.model import ApiError
from service.queue.allow import Allow
from service.store.sqlite.store import NewJob

__all__ = ["ApiError", "key_of", "parse"]

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_FN = re.compile(f"{_DOTTED}:{_DOTTED}")
_FIELDS = {"fn", "args", "kwargs", "timeout", "priority", "retries", "key"}


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def key_of(body: Any) -> str | None:
    """The body's idempotency key when it is a valid one, else None (parse says what is wrong):
    a kept job's key is looked up before anything else in the body is checked."""
    key = body.get("key") if isinstance(body, dict) else None
    if isinstance(key, str) and 1 <= len(key) <= 200 and _encodable(key) and "\x00" not in key:
        return key
    return None


def _kind(v: Any) -> str:
    """A JSON value's type, in JSON's words."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def _int(spec: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = spec.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _invalid(f"{name}: expected an integer from {lo} to {hi}, got {_kind(v)}")
    if not lo <= v <= hi:
        raise _invalid(f"{name}: must be from {lo} to {hi}, got {v}")
    return v


def parse(spec: Any, jobs: JobsConfig, allow: Allow) -> NewJob:
    """A validated NewJob from one JobSpec, or ApiError naming the field."""
    if not isinstance(spec, dict):
        raise _invalid("a job spec must be a JSON object")
    if not _FIELDS.issuperset(spec):
        unknown = sorted(set(spec) - _FIELDS)
        raise _invalid(f"{unknown[0]}: unknown field (fields: {', '.join(sorted(_FIELDS))})")
    fn = spec.get("fn")
    if fn is None:
        raise _invalid("fn: required")
    if not isinstance(fn, str):
        raise _invalid("fn: expected a string 'module:name'")
    if fn not in allow.ok:  # not seen (and admitted) before: check it fully
        if len(fn) > 500 or not _FN.fullmatch(fn):
            raise _invalid("fn: expected 'module:name' (a Python module path, a colon, a function name)")
        allow.admit(fn)  # the patterns only: whether fn exists is the probe's to say
    args = spec.get("args", [])
    if not isinstance(args, list):  # null too: only timeout and key may be null
        raise _invalid(f"args: expected a list, got {_kind(args)}")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise _invalid(f"kwargs: expected an object, got {_kind(kwargs)}")
    for k in kwargs:
        if not k.isidentifier():
            raise _invalid(f"kwargs: {k!r} is not a valid keyword argument name")
    timeout = spec.get("timeout")
    if timeout is None:
        timeout = jobs.default_timeout
    elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
        raise _invalid("timeout: expected a number of seconds or null")
    elif not 0 < timeout <= jobs.max_timeout:
        raise _invalid(f"timeout: must be > 0 and <= jobs.max_timeout ({jobs.max_timeout:g}), got {timeout}")
    priority = _int(spec, "priority", 0, -1000, 1000)
    retries = _int(spec, "retries", 0, 0, 100)
    key = spec.get("key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        raise _invalid("key: expected a string of 1 to 200 characters or null")
    if key is not None and not _encodable(key):
        raise _invalid("key: not valid Unicode (a lone surrogate)")
    if key is not None and "\x00" in key:  # PostgreSQL's text cannot hold it: refused on every store
        raise _invalid("key: must not contain the NUL character")
    try:  # encoded once, here: a number too large for a float (1e400) is no JSON number
        args_json = json.dumps(args, allow_nan=False) if args else "[]"
        kwargs_json = json.dumps(kwargs, allow_nan=False) if kwargs else "{}"
    except ValueError:
        raise _invalid("args/kwargs: numbers must be finite (1e400 is out of range)") from None
    except RecursionError:
        raise _invalid("args/kwargs: nested too deeply") from None
    return NewJob(fn=fn, args=args_json, kwargs=kwargs_json, timeout=float(timeout), priority=priority,
                  retries=retries, key=key)

"""Finding a job's function by its name, "module:name", and saying why when it cannot be found.

Used in a worker (a job whose function is gone fails with error type function_not_found) and
in the probe (a submit naming such a function is refused with 422): one wording for both.
"""

from __future__ import annotations

import importlib
from typing import Any


class NotFound(Exception):
    """The function cannot be found; the message says why (missing, or the import raised)."""


def resolve(fn: str) -> Any:
    """Imports fn's module and walks its attribute path; NotFound says what went wrong."""
    mod, _, name = fn.partition(":")
    try:
        obj: Any = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod == e.name or mod.startswith(e.name + ".")):
            raise NotFound(f"module {mod!r} not found ({e})") from None
        raise NotFound(f"module {mod!r} failed to import: {type(e).__name__}: {e}") from None
    except BaseException as e:  # noqa: BLE001 - whatever user code raises at import is "not found"
        raise NotFound(f"module {mod!r} failed to import: {type(e).__name__}: {e}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise NotFound(f"{mod!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    return obj

"""Python clients of a running poold daemon: `AsyncClient`, `Client` and `Executor`.

They find the daemon through `url` (else `$POOLD_URL`, else http://127.0.0.1:8321)
and send `token` (else `$POOLD_TOKEN`) as a bearer token. This package never
imports the daemon's own modules, so a program using it stays light.

`AsyncClient` (aiohttp) and `Executor` (threads, concurrent.futures) are
imported on first use, so `from service.client import Client` (the CLI) does
not pay for aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from service.client.errors import JobFailed, PooldError, PooldUnavailable
from service.client.sync import Client

if TYPE_CHECKING:
    from service.client.aio import AsyncClient
    from service.client.executor import Executor

__all__ = ["AsyncClient", "Client", "Executor", "JobFailed", "PooldError", "PooldUnavailable"]

_LAZY = {"AsyncClient": "service.client.aio", "Executor": "service.client.executor"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

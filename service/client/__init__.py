"""Python clients of a running poold daemon: `AsyncClient`, `Client` and `Executor`.

They find the daemon through `url` (else `$POOLD_URL`, else http://127.0.0.1:8321)
and send `token` (else `$POOLD_TOKEN`) as a bearer token. This package never
imports the daemon's own modules, so a program using it stays light.
"""

from __future__ import annotations

from service.client.aio import AsyncClient
from service.client.errors import JobFailed, PooldError, PooldUnavailable
from service.client.executor import Executor
from service.client.sync import Client

__all__ = ["AsyncClient", "Client", "Executor", "JobFailed", "PooldError", "PooldUnavailable"]

"""`AsyncClient`: the asyncio client, on one aiohttp session for its whole life.

One session means one connection pool: thousands of concurrent `run()` calls
from one event loop share at most `limit` connections instead of opening one
each. The session is made on first use inside the running loop (aiohttp ties
it to that loop), so use one `AsyncClient` per event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from service.client import ops
from service.client.common import Fn, Job, decode, headers, resolve_token, resolve_url
from service.client.errors import PooldUnavailable

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """asyncio-native poold client; `limit` caps the connections open at once."""

    def __init__(self, url: str | None = None, token: str | None = None, *, limit: int = 100,
                 request_timeout: float = 30.0) -> None:
        self.target = resolve_url(url)
        self.url = self.target.url
        self._headers = headers(resolve_token(token))
        self._limit = limit
        self._timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        base = "http://localhost" if self.target.scheme == "unix" else (
            f"{self.target.scheme}://{self.target.host}:{self.target.port}")
        self._base = base + self.target.prefix

    async def __aenter__(self) -> AsyncClient:
        self._open()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the session and its connections; the client cannot be used afterwards."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is not loop:
            raise RuntimeError("an AsyncClient is bound to the event loop that first used it; "
                               "make one client per event loop")
        if self._session is None:
            self._loop = loop
            connector: aiohttp.BaseConnector
            if self.target.unix_path is not None:
                connector = aiohttp.UnixConnector(path=self.target.unix_path, limit=self._limit)
            else:
                connector = aiohttp.TCPConnector(limit=self._limit)
            # No total timeout: waiting for a free pooled connection is not a failure.
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout))
        return self._session

    async def _send(self, request: ops.Request) -> ops.Response:
        session = self._open()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout,
                                        sock_read=self._timeout + request.wait)
        try:
            async with session.request(request.method, self._base + request.path, data=request.body,
                                       timeout=timeout) as answer:
                raw = await answer.read()
                return ops.Response(answer.status, decode(raw), raw, answer.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise PooldUnavailable(f"poold at {self.url} is unreachable: {e!r}") from e

    async def _do(self, op: ops.Op[T]) -> T:
        try:
            request = next(op)
            while True:
                request = op.send(await self._send(request))
        except StopIteration as stop:
            return stop.value

    # -- the API (the same methods as Client)
    async def submit(self, fn: Fn, *args: Any, kwargs: Mapping[str, Any] | None = None,
                     timeout: float | None = None, priority: int = 0, retries: int = 0,
                     key: str | None = None) -> Job:
        """Submits one job (POST /v1/jobs) and returns its Job."""
        return await self._do(ops.submit(fn, args, kwargs, timeout=timeout, priority=priority,
                                         retries=retries, key=key))

    async def run(self, fn: Fn, *args: Any, kwargs: Mapping[str, Any] | None = None,
                  timeout: float | None = None, priority: int = 0, retries: int = 0,
                  key: str | None = None, wait_timeout: float | None = None) -> Any:
        """Submits a job, waits for it and returns its result (or raises JobFailed/CancelledError)."""
        return await self._do(ops.run(fn, args, kwargs, timeout=timeout, priority=priority,
                                      retries=retries, key=key, wait_timeout=wait_timeout))

    async def wait(self, job_id: str, timeout: float | None = None,
                   raise_on_failure: bool = False) -> Job:
        """The finished Job, long-polling; TimeoutError once `timeout` seconds have passed."""
        return await self._do(ops.wait(job_id, timeout, raise_on_failure))

    async def wait_many(self, job_ids: Iterable[str], timeout: float | None = None,
                        raise_on_failure: bool = False) -> list[Job]:
        """The finished Jobs, in order, long-polling all of them at once (POST /v1/jobs/wait);
        TimeoutError once `timeout` seconds have passed, PooldError 404 for an unknown id."""
        return await self._do(ops.wait_many(job_ids, timeout, raise_on_failure))

    async def submit_many(self, items: Iterable[Sequence[Any]], *, timeout: float | None = None,
                          priority: int = 0, retries: int = 0) -> list[Job]:
        """Submits `(fn, args, kwargs)` items in one batch request; the Jobs in order."""
        return await self._do(ops.submit_many(items, timeout=timeout, priority=priority,
                                              retries=retries))

    async def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """The Job now, or (with `wait`) once finished or after `wait` seconds (at most 60)."""
        return await self._do(ops.get(job_id, wait))

    async def cancel(self, job_id: str, *, queued_only: bool = False) -> Job:
        """Cancels a job (DELETE); PooldError 409 when it had already finished (or started)."""
        return await self._do(ops.cancel(job_id, queued_only))

    async def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs newest first, optionally only those in `state`."""
        return await self._do(ops.jobs(state, limit))

    async def workers(self) -> list[dict[str, Any]]:
        """The pool's workers."""
        return await self._do(ops.workers())

    async def health(self) -> bool:
        """True when the daemon answers 200, False on 503; PooldUnavailable when unreachable."""
        return await self._do(ops.health())

    async def health_report(self) -> dict[str, Any]:
        """The /health body (status, reasons, counts), whether healthy or not."""
        return await self._do(ops.health_report())

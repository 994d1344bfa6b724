"""aiohttp's server, with one change: a client that shuts its sending side after a whole request
(`nc -N`, some proxies) still gets the answer.

aiohttp closes the connection at the client's FIN, so a request already taken (a job already
created) went unanswered. Here the FIN keeps the connection open for writing while a request it
completed is being handled, and closes it after; a FIN that cuts a request short still closes at
once, so its handler sees the body fail. The check uses aiohttp internals: when they change, the
handler falls back to aiohttp's own behaviour.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class _Handler(RequestHandler):  # type: ignore[type-arg]
    __slots__ = ()

    def eof_received(self) -> bool | None:  # type: ignore[override]
        parser: Any = getattr(self, "_parser", None)
        waiter = getattr(self, "_waiter", None)
        queued = getattr(self, "_messages", None)
        if parser is None or queued is None or (waiter is not None and not waiter.done() and not queued):
            return None  # idle between requests (or unknown internals): close, as aiohttp does
        try:
            partial = parser.feed_eof()
        except Exception:  # noqa: BLE001 - the parser's way to say the body was cut short
            return None
        if partial is not None:  # headers cut short
            return None
        if not queued:
            self._close = True  # answer the request in hand, then close
        return True  # keep the transport open for the answer


class _Server(web.Server):
    __slots__ = ()

    def __call__(self) -> RequestHandler:  # type: ignore[type-arg]
        return _Handler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """web.AppRunner whose connections answer a request completed by the client's FIN."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:
            server.__class__ = _Server
        return server

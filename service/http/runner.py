"""aiohttp's server, with two changes.

A client that shuts its sending side after a whole request (`nc -N`, some proxies) still gets the
answer. And an `Expect` the daemon does not meet gets the app's own answer before routing:
aiohttp asks the matched route, and where no route matches (a CONNECT's authority-form target has
no path) its default answer fails, as a 500, on a header that is not UTF-8.

aiohttp closes the connection at the client's FIN, so a request already taken (a job already
created) went unanswered. Here the FIN keeps the connection open for writing while a request it
completed is being handled, and closes it after; a FIN that cuts a request short still closes at
once, so its handler sees the body fail. The check uses aiohttp internals: when they change, the
handler falls back to aiohttp's own behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
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


Refusal = Callable[[web.BaseRequest], "web.StreamResponse | None"]


class Runner(web.AppRunner):
    """web.AppRunner whose connections answer a request completed by the client's FIN, and whose
    requests with an `Expect` first meet `refuse` (an answer, or None to go on)."""

    def __init__(self, app: web.Application, *, refuse: Refusal | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._refuse = refuse

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:
            server.__class__ = _Server
        refuse, inner = self._refuse, server.request_handler
        if refuse is not None:
            async def handle(request: web.BaseRequest) -> web.StreamResponse:
                if "Expect" in request.headers and (answer := refuse(request)) is not None:
                    return answer
                return await inner(request)

            server.request_handler = handle
        return server

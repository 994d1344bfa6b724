"""`Client`: the synchronous client, on a small thread-safe pool of keep-alive connections.

Plain `http.client` keeps a call cheap (no event loop per call, no thread) and
lets many threads share one `Client`: each request borrows an idle connection
or opens one, and gives it back when the answer has been read.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from service.client import ops
from service.client.common import Fn, Job, Target, decode, headers, resolve_token, resolve_url
from service.client.errors import PooldUnavailable

__all__ = ["Client"]

T = TypeVar("T")

# The daemon (aiohttp) drops idle keep-alive connections after 75 s; retire ours sooner.
_IDLE_MAX = 50.0
# What a peer closing a kept-alive connection looks like when the next request goes out.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.BadStatusLine)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True when an idle connection became readable: the server closed it (EOF)."""
    if conn.sock is None:
        return False
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class _Pool:
    """Idle connections, last used first; one connection per request in flight."""

    def __init__(self, target: Target, timeout: float, size: int) -> None:
        self._target = target
        self._timeout = timeout
        self._size = size
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []
        self._lock = threading.Lock()
        self._closed = False

    def _new(self) -> http.client.HTTPConnection:
        t = self._target
        if t.scheme == "unix":
            assert t.unix_path is not None
            return _UnixConnection(t.unix_path, self._timeout)
        if t.scheme == "https":
            return http.client.HTTPSConnection(t.host, t.port, timeout=self._timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(t.host, t.port, timeout=self._timeout)

    def acquire(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was used before (then it may have gone stale)."""
        stale = []
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the client is closed")
                now = time.monotonic()
                while self._idle:
                    conn, since = self._idle.pop()
                    if now - since > _IDLE_MAX or _dropped(conn):
                        stale.append(conn)
                        continue
                    return conn, True
        finally:
            for conn in stale:
                conn.close()
        return self._new(), False

    def release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._size:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


class Client:
    """Synchronous poold client; thread-safe, one keep-alive connection pool per instance."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 request_timeout: float = 30.0, pool_size: int = 8) -> None:
        self.target = resolve_url(url)
        self.url = self.target.url
        self._headers = headers(resolve_token(token))
        self._timeout = request_timeout
        self._pool = _Pool(self.target, request_timeout, pool_size)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the pooled connections; the client cannot be used afterwards."""
        self._pool.close()

    def _send(self, request: ops.Request) -> ops.Response:
        timeout = self._timeout + request.wait
        path = self.target.path(request.path)
        for attempt in (1, 2):
            conn, reused = self._pool.acquire()
            try:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request(request.method, path, body=request.body, headers=self._headers)
                answer = conn.getresponse()
                raw = answer.read()
            except _STALE as e:
                conn.close()
                if reused and attempt == 1:
                    continue  # the server closed an idle kept-alive connection: reconnect once
                raise PooldUnavailable(f"poold at {self.url}: connection lost ({e!r})") from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise PooldUnavailable(f"poold at {self.url} is unreachable: {e!r}") from e
            except BaseException:
                conn.close()  # interrupted mid-request: the connection's state is unknown
                raise
            if answer.will_close:
                conn.close()
            else:
                self._pool.release(conn)
            return ops.Response(answer.status, decode(raw), raw, answer.getheader("Retry-After"))
        raise AssertionError("unreachable")

    def _do(self, op: ops.Op[T]) -> T:
        return ops.drive_result(op, self._send)

    # -- the API (the same methods as AsyncClient)
    def submit(self, fn: Fn, *args: Any, kwargs: Mapping[str, Any] | None = None,
               timeout: float | None = None, priority: int = 0, retries: int = 0,
               key: str | None = None) -> Job:
        """Submits one job (POST /v1/jobs) and returns its Job."""
        return self._do(ops.submit(fn, args, kwargs, timeout=timeout, priority=priority,
                                   retries=retries, key=key))

    def run(self, fn: Fn, *args: Any, kwargs: Mapping[str, Any] | None = None,
            timeout: float | None = None, priority: int = 0, retries: int = 0,
            key: str | None = None, wait_timeout: float | None = None) -> Any:
        """Submits a job, waits for it and returns its result (or raises JobFailed/CancelledError)."""
        return self._do(ops.run(fn, args, kwargs, timeout=timeout, priority=priority, retries=retries,
                                key=key, wait_timeout=wait_timeout))

    def wait(self, job_id: str, timeout: float | None = None, raise_on_failure: bool = False) -> Job:
        """The finished Job, long-polling; TimeoutError once `timeout` seconds have passed."""
        return self._do(ops.wait(job_id, timeout, raise_on_failure))

    def wait_many(self, job_ids: Iterable[str], timeout: float | None = None,
                  raise_on_failure: bool = False) -> list[Job]:
        """The finished Jobs, in order, long-polling all of them at once (POST /v1/jobs/wait);
        TimeoutError once `timeout` seconds have passed, PooldError 404 for an unknown id."""
        return self._do(ops.wait_many(job_ids, timeout, raise_on_failure))

    def submit_many(self, items: Iterable[Sequence[Any]], *, timeout: float | None = None,
                    priority: int = 0, retries: int = 0) -> list[Job]:
        """Submits `(fn, args, kwargs)` items in one batch request; the Jobs in order."""
        return self._do(ops.submit_many(items, timeout=timeout, priority=priority,
                                        retries=retries))

    def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """The Job now, or (with `wait`) once finished or after `wait` seconds (at most 60)."""
        return self._do(ops.get(job_id, wait))

    def cancel(self, job_id: str, *, queued_only: bool = False) -> Job:
        """Cancels a job (DELETE); PooldError 409 when it had already finished (or started)."""
        return self._do(ops.cancel(job_id, queued_only))

    def jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs newest first, optionally only those in `state`."""
        return self._do(ops.jobs(state, limit))

    def workers(self) -> list[dict[str, Any]]:
        """The pool's workers."""
        return self._do(ops.workers())

    def health(self) -> bool:
        """True when the daemon answers 200, False on 503; PooldUnavailable when unreachable."""
        return self._do(ops.health())

    def health_report(self) -> dict[str, Any]:
        """The /health body (status, reasons, counts), whether healthy or not."""
        return self._do(ops.health_report())

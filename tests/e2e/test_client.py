"""service.client against real daemons: AsyncClient, Client and Executor.

Most tests run once per client class (`connect` is parametrized); the AsyncClient
is driven from synchronous tests by `AsyncAsSync`, one event loop per client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import inspect
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from service.client import (
    AsyncClient,
    Client,
    Executor,
    JobFailed,
    PooldError,
    PooldUnavailable,
    common,
    sync,
)
from service.client.errors import job_failed
from tests.support import jobs
from tests.support.daemon import REPO, Daemon, free_port, wait_for, write_config

pytestmark = pytest.mark.stores("sqlite", "postgres")

TOKEN = "s3cret-token"


class AsyncAsSync:
    """An AsyncClient driven from synchronous code, on an event loop of its own."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.loop.run_until_complete(attr(*args, **kwargs))
        return call

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(params=["Client", "AsyncClient"])
def connect(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """connect(url, token, **options) -> a Client, or an AsyncClient behind AsyncAsSync."""
    made: list[Any] = []

    def make(url: str | None = None, token: str | None = None, **kw: Any) -> Any:
        c = Client(url, token, **kw) if request.param == "Client" else AsyncAsSync(
            AsyncClient(url, token, **kw))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def client(connect: Callable[..., Any], daemon: Daemon) -> Any:
    return connect(daemon.url)


@pytest.fixture
def executor(daemon: Daemon) -> Iterator[Executor]:
    with Executor(daemon.url) as ex:
        yield ex


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def occupy_workers(client: Any, n: int = 2) -> list[str]:
    """Starts n never-ending jobs and returns once they all run (the daemon has 2 workers)."""
    ids = [client.submit(jobs.forever)["id"] for _ in range(n)]
    assert wait_for(lambda: all(client.get(i)["state"] == "running" for i in ids), 15)
    return ids


# -- pure logic (no daemon)


def _nested() -> Callable[..., Any]:
    def inner() -> None:
        pass
    return inner


def _from_main() -> None:
    pass


_from_main.__module__ = "__main__"


class _Holder:
    def method(self) -> None:
        pass


@pytest.mark.parametrize("fn, why", [
    (lambda: None, "lambda"),
    (_nested(), "nested"),
    (_from_main, "__main__"),
    (_Holder().method, "bound method"),
    (functools.partial(jobs.add, 1), "__qualname__"),
    ("tests.support.jobs.add", "module:name"),
    (":add", "module:name"),
], ids=["lambda", "nested", "main", "method", "partial", "no-colon", "no-module"])
def test_unimportable_functions_are_refused_before_sending(fn: Any, why: str,
                                                           connect: Callable[..., Any]) -> None:
    c = connect(dead_url())  # nothing listens: any request would raise PooldUnavailable
    for call in (lambda: c.submit(fn), lambda: c.run(fn), lambda: c.submit_many([(fn, (), {})])):
        with pytest.raises(ValueError, match=why):
            call()
    with Executor(dead_url()) as ex:
        with pytest.raises(ValueError, match=why):
            ex.submit(fn)
        with pytest.raises(ValueError, match=why):
            ex.map(fn, [1, 2])


@pytest.mark.parametrize("fn, name", [
    (jobs.add, "tests.support.jobs:add"),
    ("tests.support.jobs:add", "tests.support.jobs:add"),
    (_Holder.method, "tests.e2e.test_client:_Holder.method"),
])
def test_function_names(fn: Any, name: str) -> None:
    assert common.fn_name(fn) == name


def _failed(exception: str | None, message: str = "it broke", state: str = "failed") -> dict[str, Any]:
    return {"id": "j1", "fn": "m:f", "state": state,
            "error": {"type": "exception" if exception else "timeout", "exception": exception,
                      "message": f"{exception}: {message}" if exception else message,
                      "traceback": None}}


@pytest.mark.parametrize("exception, also", [
    ("ValueError", ValueError), ("KeyError", KeyError), ("ZeroDivisionError", ZeroDivisionError),
    ("OSError", OSError), ("FileNotFoundError", FileNotFoundError),
    ("UnicodeDecodeError", UnicodeError),  # cannot be built from one message: its parent is used
    ("CustomError", None), ("StopIteration", None), ("SystemExit", None), (None, None),
])
def test_job_failed_is_also_the_builtin_exception(exception: str | None, also: type | None) -> None:
    e = job_failed(_failed(exception))
    assert isinstance(e, JobFailed) and isinstance(e, PooldError)
    assert e.status is None and e.code is None and e.job["id"] == "j1"
    if also is not None:
        assert isinstance(e, also)
    else:
        assert type(e) is JobFailed
    assert str(e).startswith("job j1 (m:f) failed (")
    assert "it broke" in str(e) and (exception or "timeout") in str(e)
    assert str(e).count(exception or "timeout") == 1  # the class is not repeated
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is type(e) and again.job == e.job
    assert job_failed(_failed(exception)).__class__ is type(e)  # one class per built-in


def test_outcome_of_finished_jobs() -> None:
    assert common.outcome({"state": "succeeded", "result": [1]}) == [1]
    with pytest.raises(cf.CancelledError):
        common.outcome({"id": "x", "state": "cancelled"})
    with pytest.raises(JobFailed, match="timed_out"):
        common.outcome(_failed(None, state="timed_out"))


def test_url_and_token_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POOLD_URL", raising=False)
    monkeypatch.delenv("POOLD_TOKEN", raising=False)
    assert Client().url == "http://127.0.0.1:8321"
    assert "Authorization" not in Client()._headers
    monkeypatch.setenv("POOLD_URL", "http://example.invalid:9")
    monkeypatch.setenv("POOLD_TOKEN", "from-env")
    assert AsyncClient().url == "http://example.invalid:9"
    assert Client()._headers["Authorization"] == "Bearer from-env"
    assert Client("http://h:1", "arg")._headers["Authorization"] == "Bearer arg"
    assert Client("unix:///run/poold.sock").target.unix_path == "/run/poold.sock"
    with pytest.raises(ValueError):
        Client("ftp://h")


@pytest.mark.parametrize("seconds, text", [(60, "60"), (75, "60"), (2.5, "2.5"), (0, "0"), (-1, "0"),
                                           (1 / 3, "0.333")])
def test_wait_parameter_stays_in_range(seconds: float, text: str) -> None:
    assert common.wait_param(seconds) == text


# -- both clients, every method


def test_submit_wait_get(client: Any) -> None:
    job = client.submit(jobs.echo, 1, "a", kwargs={"k": [1, 2]}, timeout=10, priority=5, retries=1)
    assert job["state"] in ("queued", "running", "succeeded")
    assert (job["fn"], job["priority"], job["timeout"], job["retries"]) == \
        ("tests.support.jobs:echo", 5, 10, 1)
    done = client.wait(job["id"])
    assert done["state"] == "succeeded"
    assert done["result"] == {"args": [1, "a"], "kwargs": {"k": [1, 2]}}
    assert client.get(job["id"]) == done


def test_run_returns_the_value(client: Any) -> None:
    assert client.run(jobs.add, 2, 3) == 5
    assert client.run("service.demo:fib", 10) == 55
    assert client.run(jobs.noop, kwargs={"x": {"a": None}}) == {"a": None}


def test_key_reuses_the_job(client: Any) -> None:
    first = client.submit(jobs.add, 1, 1, key="same-key")
    again = client.submit(jobs.add, 5, 5, key="same-key")
    assert again["id"] == first["id"]
    assert client.run(jobs.add, 9, 9, key="same-key") == 2


def test_submit_many_is_one_ordered_batch(client: Any) -> None:
    batch = client.submit_many([(jobs.add, (1, 2), {}), ("tests.support.jobs:noop", (), {"x": "k"}),
                                (jobs.echo, [3])], priority=2)
    assert [j["fn"] for j in batch] == ["tests.support.jobs:add", "tests.support.jobs:noop",
                                        "tests.support.jobs:echo"]
    assert {j["priority"] for j in batch} == {2}
    results = [client.wait(j["id"], raise_on_failure=True)["result"] for j in batch]
    assert results == [3, "k", {"args": [3], "kwargs": {}}]
    assert client.submit_many([]) == []


def test_wait_many_returns_the_jobs_in_order(client: Any) -> None:
    batch = client.submit_many([(jobs.sleep, (0.3,), {}), (jobs.add, (1, 2), {}), (jobs.boom, (), {})])
    ids = [j["id"] for j in batch]
    done = client.wait_many([ids[2], ids[0], ids[1], ids[0]], timeout=30)
    assert [j["id"] for j in done] == [ids[2], ids[0], ids[1], ids[0]]
    assert [j["state"] for j in done] == ["failed", "succeeded", "succeeded", "succeeded"]
    assert done[2]["result"] == 3
    with pytest.raises(ValueError, match="boom from tests"):
        client.wait_many(ids, raise_on_failure=True)
    assert client.wait_many([]) == []


def test_wait_many_timeout_and_unknown_ids(client: Any) -> None:
    slow = client.submit(jobs.sleep, 30)
    quick = client.submit(jobs.noop, 1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of 2 jobs"):
        client.wait_many([quick["id"], slow["id"]], timeout=1.0)
    assert 0.9 < time.monotonic() - t0 < 5
    with pytest.raises(PooldError) as info:
        client.wait_many([quick["id"], "no-such-job"], timeout=30)
    assert (info.value.status, info.value.code) == (404, "not_found")
    assert "no-such-job" in str(info.value)
    client.cancel(slow["id"])
    assert client.wait_many([slow["id"]])[0]["state"] == "cancelled"


def test_jobs_workers_health(client: Any) -> None:
    ids = [client.submit(jobs.noop, i)["id"] for i in range(3)]
    for i in ids:
        client.wait(i)
    listed = client.jobs(limit=2)
    assert [j["id"] for j in listed] == ids[:0:-1]  # newest first
    assert {j["id"] for j in client.jobs(state="succeeded")} >= set(ids)
    assert client.jobs(state="running") == []
    workers = client.workers()
    assert len(workers) == 2 and all({"pid", "name", "state"} <= set(w) for w in workers)
    assert client.health() is True


def test_failed_job_raises_job_failed_that_is_a_value_error(client: Any) -> None:
    with pytest.raises(ValueError, match="boom from tests") as info:
        client.run(jobs.boom)
    e = info.value
    assert isinstance(e, JobFailed) and e.job["state"] == "failed"
    assert "(exception): ValueError: boom from tests" in str(e)
    assert "raise ValueError" in (e.remote_traceback or "")
    job = client.submit(jobs.boom, "again")
    assert client.wait(job["id"])["state"] == "failed"  # no raise without raise_on_failure
    with pytest.raises(ValueError, match="again"):
        client.wait(job["id"], raise_on_failure=True)


def test_custom_exception_is_a_plain_job_failed(client: Any) -> None:
    with pytest.raises(JobFailed, match="CustomError: custom failure") as info:
        client.run(jobs.custom_error)
    assert type(info.value) is JobFailed


def test_timed_out_job_raises_job_failed(client: Any) -> None:
    with pytest.raises(JobFailed, match=r"timed_out \(timeout\)") as info:
        client.run(jobs.sleep, 30, timeout=0.5)
    assert info.value.job["state"] == "timed_out"


def test_cancelled_job_raises_cancelled_error(client: Any) -> None:
    job = client.submit(jobs.forever)
    cancelled = client.cancel(job["id"])
    assert cancelled["state"] == "cancelled"
    with pytest.raises(cf.CancelledError):
        client.wait(job["id"], raise_on_failure=True)
    assert client.wait(job["id"])["state"] == "cancelled"
    with pytest.raises(PooldError) as info:
        client.cancel(job["id"])
    assert (info.value.status, info.value.code) == (409, "already_finished")


def test_cancel_queued_only_leaves_a_running_job(client: Any) -> None:
    ids = occupy_workers(client)
    with pytest.raises(PooldError) as info:
        client.cancel(ids[0], queued_only=True)
    assert (info.value.status, info.value.code) == (409, "already_started")
    for i in ids:
        client.cancel(i)


def test_wait_timeout_raises_timeout_error(client: Any) -> None:
    job = client.submit(jobs.sleep, 30)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=job["id"]):
        client.wait(job["id"], timeout=1.2)
    assert 1.1 < time.monotonic() - t0 < 5
    with pytest.raises(TimeoutError):
        client.run(jobs.sleep, 30, wait_timeout=0.3)
    with pytest.raises(TimeoutError):
        client.wait(job["id"], timeout=0)
    client.cancel(job["id"])


@pytest.mark.parametrize("call, status, code", [
    (lambda c: c.get("0" * 32), 404, "not_found"),
    (lambda c: c.cancel("no-such-job"), 404, "not_found"),
    (lambda c: c.wait("no-such-job"), 404, "not_found"),
    (lambda c: c.submit("json:dumps", 1), 403, "function_not_allowed"),
    (lambda c: c.run("tests.support.jobs:no_such_function"), 422, "function_not_found"),
    (lambda c: c.submit(jobs.add, 1, 2, priority=5000), 422, "invalid_request"),
    (lambda c: c.submit(jobs.add, 1, 2, timeout=-1), 422, "invalid_request"),
    (lambda c: c.jobs(limit=5000), 422, "invalid_request"),
    (lambda c: c.submit_many([(jobs.add, (1, 2), {}), ("json:dumps", (1,), {})]), 403,
     "function_not_allowed"),
], ids=["get", "cancel", "wait", "not-allowed", "not-found", "priority", "timeout", "limit", "batch"])
def test_http_errors_become_poold_error(client: Any, call: Callable[[Any], Any], status: int,
                                       code: str) -> None:
    with pytest.raises(PooldError) as info:
        call(client)
    e = info.value
    assert (e.status, e.code) == (status, code) and type(e) is PooldError
    assert str(e).startswith(f"{status} {code}: ") and e.message
    assert client.jobs(state="queued") == []  # a refused batch enqueues nothing


@pytest.mark.parametrize("method, args", [("health", ()), ("submit", (jobs.add, 1, 2)),
                                          ("get", ("x",)), ("workers", ())])
def test_unreachable_daemon_raises_pooldunavailable(connect: Callable[..., Any], method: str,
                                                    args: tuple[Any, ...]) -> None:
    c = connect(dead_url())
    with pytest.raises(PooldUnavailable) as info:
        getattr(c, method)(*args)
    assert info.value.status is None and info.value.code is None


def test_token(connect: Callable[..., Any], daemon_factory: Callable[..., Daemon],
               monkeypatch: pytest.MonkeyPatch) -> None:
    d = daemon_factory(cfg={"server": {"token": TOKEN}}).start()
    for token in (None, "wrong"):
        c = connect(d.url, token)
        with pytest.raises(PooldError) as info:
            c.run(jobs.add, 1, 2)
        assert (info.value.status, info.value.code) == (401, "unauthorized")
        assert c.health() is True  # /health needs no token
    assert connect(d.url, TOKEN).run(jobs.add, 1, 2) == 3
    monkeypatch.setenv("POOLD_URL", d.url)
    monkeypatch.setenv("POOLD_TOKEN", TOKEN)
    assert connect().run(jobs.add, 2, 2) == 4


def test_health_is_false_while_draining(connect: Callable[..., Any],
                                        daemon_factory: Callable[..., Daemon]) -> None:
    import signal

    d = daemon_factory().start()
    c = connect(d.url)
    job = c.submit(jobs.sleep, 2)
    assert wait_for(lambda: c.get(job["id"])["state"] == "running", 10)
    d.signal(signal.SIGTERM)
    assert wait_for(lambda: c.health() is False, 5)
    with pytest.raises(PooldError) as info:
        c.submit(jobs.noop)
    assert (info.value.status, info.value.code) == (503, "draining")
    assert d.wait_exit(20) == 0


def test_context_managers(daemon: Daemon) -> None:
    with Client(daemon.url) as c:
        assert c.run(jobs.add, 1, 1) == 2
    with pytest.raises(RuntimeError):
        c.health()

    async def main() -> AsyncClient:
        async with AsyncClient(daemon.url) as ac:
            assert await ac.run(jobs.add, 2, 2) == 4
        return ac
    ac = asyncio.run(main())
    with pytest.raises(RuntimeError):
        asyncio.run(ac.health())


def test_async_client_belongs_to_one_event_loop(daemon: Daemon) -> None:
    c = AsyncClient(daemon.url)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert first.run_until_complete(c.health()) is True
        with pytest.raises(RuntimeError, match="event loop"):
            second.run_until_complete(c.health())
        first.run_until_complete(c.close())
    finally:
        first.close()
        second.close()


def _connections(port: int) -> int:
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_thousand_concurrent_async_runs_share_a_bounded_pool(daemon: Daemon) -> None:
    limit = 20
    peak = 0

    async def main() -> list[int]:
        nonlocal peak
        async with AsyncClient(daemon.url, limit=limit) as c:
            runs = asyncio.gather(*(c.run(jobs.add, i, 1) for i in range(1000)))
            while not runs.done():
                peak = max(peak, _connections(daemon.port))
                await asyncio.sleep(0.02)
            return await runs
    assert asyncio.run(main()) == [i + 1 for i in range(1000)]
    assert 0 < peak <= limit


def test_client_is_thread_safe_and_keeps_connections(daemon: Daemon) -> None:
    with Client(daemon.url, pool_size=8) as c, cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: c.run(jobs.add, i, i), range(200)))
        assert results == [2 * i for i in range(200)]
        assert _connections(daemon.port) <= 8


@pytest.mark.parametrize("precheck", [True, False], ids=["seen-closed", "fails-then-retries"])
def test_client_reconnects_after_the_server_closed_a_kept_connection(
        daemon: Daemon, precheck: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not precheck:
        monkeypatch.setattr(sync, "_dropped", lambda conn: False)
    with Client(daemon.url) as c:
        job = c.submit(jobs.add, 3, 4)
        assert c.wait(job["id"])["result"] == 7
        daemon.stop()
        daemon.start()  # same port; the pooled connection is dead now
        assert c.get(job["id"])["result"] == 7
        assert c.run(jobs.add, 1, 2) == 3


class OneShotServer:
    """Answers each connection's first request (or none) and closes it, without saying so."""

    def __init__(self, answer: bool) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        body = b'{"status": "ok"}'
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.recv(65536)
                if self.answer:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("answer", [True, False], ids=["closes-after-answer", "never-answers"])
def test_client_retries_a_dead_kept_connection_once(answer: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync, "_dropped", lambda conn: False)  # reuse, then find it closed
    server = OneShotServer(answer)
    try:
        with Client(server.url) as c:
            if answer:
                assert [c.health() for _ in range(4)] == [True] * 4
                assert server.accepted == 4  # each kept connection failed once and was replaced
            else:
                with pytest.raises(PooldUnavailable):
                    c.health()  # a fresh connection that fails is not retried
                assert server.accepted == 1
    finally:
        server.sock.close()


def test_unix_socket(connect: Callable[..., Any], daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    path = d.tmp / "poold.sock"
    d.cfg["server"]["unix_socket"] = str(path)
    write_config(d.config_path, d.cfg)
    d.start()
    c = connect(f"unix:{path}")
    assert c.run(jobs.add, 20, 22) == 42
    assert c.health() is True


# -- Executor


def test_executor_submit_and_result(executor: Executor) -> None:
    f = executor.submit(jobs.echo, 1, k="v")
    assert f.result(timeout=30) == {"args": [1], "kwargs": {"k": "v"}}
    assert f.done() and not f.cancelled() and f.job_id and (f.job or {})["state"] == "succeeded"
    assert executor.submit("tests.support.jobs:add", 2, 3).result(timeout=30) == 5
    futures = [executor.submit(jobs.add, i, i) for i in range(300)]
    assert [f.result(timeout=60) for f in futures] == [2 * i for i in range(300)]


def test_executor_future_exceptions(executor: Executor, daemon: Daemon) -> None:
    with pytest.raises(ValueError, match="boom from tests") as info:
        executor.submit(jobs.boom).result(timeout=30)
    assert isinstance(info.value, JobFailed)
    with Executor(daemon.url, timeout=0.5) as quick, pytest.raises(JobFailed, match="timed_out"):
        quick.submit(jobs.sleep, 30).result(timeout=30)
    f = executor.submit(jobs.forever)
    assert wait_for(f.running, 15)
    with Client(daemon.url) as c:
        c.cancel(f.job_id or "")
    with pytest.raises(cf.CancelledError):
        f.result(timeout=30)


def _counting(ex: Executor) -> list[tuple[str, str, int]]:
    """Records (method, path, number of specs) of every request the executor sends."""
    seen: list[tuple[str, str, int]] = []
    send = ex.client._send

    def spy(request: Any) -> Any:
        n = request.body.count(b'"fn"') if request.body else 0
        seen.append((request.method, request.path.split("?")[0], n))
        return send(request)
    ex.client._send = spy  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("items, chunksize, batches", [(25, 10, [10, 10, 5]), (7, 100, [7]),
                                                        (3, 1, None)])
def test_executor_map_order_and_chunks(executor: Executor, items: int, chunksize: int,
                                       batches: list[int] | None) -> None:
    seen = _counting(executor)
    results = executor.map(jobs.add, range(items), range(100, 100 + items), chunksize=chunksize)
    assert list(results) == [i + 100 + i for i in range(items)]
    sent = [n for method, path, n in seen if (method, path) == ("POST", "/v1/jobs/batch")]
    assert {path for method, path, _ in seen if method == "POST"} <= {"/v1/jobs/batch", "/v1/jobs/wait"}
    if batches is not None:
        assert sent == batches  # each chunk is exactly one batch request
    assert sum(sent) == items


def test_executor_uses_few_requests(executor: Executor) -> None:
    seen = _counting(executor)
    futures = [executor.submit(jobs.noop, i) for i in range(400)]
    assert [f.result(timeout=60) for f in futures] == list(range(400))
    posts = [n for method, path, n in seen if (method, path) == ("POST", "/v1/jobs/batch")]
    assert sum(posts) == 400 and len(posts) <= 20  # consecutive submits share batches
    assert len(seen) < 2 * 400, len(seen)  # no polling loop per future


def test_executor_collects_results_in_bulk(executor: Executor) -> None:
    seen = _counting(executor)
    assert list(executor.map(jobs.noop, range(1000), chunksize=100)) == list(range(1000))
    assert not [path for method, path, _ in seen if method == "GET" and path.startswith("/v1/jobs/")]
    waits = [path for method, path, _ in seen if path == "/v1/jobs/wait"]
    assert 0 < len(waits) < 100 and len(seen) < 200, len(seen)  # many results per request


def test_executor_quick_job_is_not_held_up_by_a_slow_one(executor: Executor, daemon: Daemon) -> None:
    slow = executor.submit(jobs.sleep, 30)
    assert wait_for(slow.running, 15)
    time.sleep(0.5)  # the executor is long-polling the slow job now
    t0 = time.monotonic()
    assert executor.submit(jobs.add, 1, 2).result(timeout=30) == 3
    assert time.monotonic() - t0 < 5  # not the 30 s of the long-poll on the slow job
    quick = [executor.submit(jobs.noop, i) for i in range(3)]
    assert [f.result(timeout=30) for f in quick] == [0, 1, 2]
    with Client(daemon.url) as c:
        c.cancel(slow.job_id or "")
    with pytest.raises(cf.CancelledError):
        slow.result(timeout=30)


def test_executor_sees_a_queued_job_start(executor: Executor, daemon: Daemon) -> None:
    with Client(daemon.url) as c:
        blockers = occupy_workers(c)
        f = executor.submit(jobs.sleep, 0.5)
        assert wait_for(lambda: f.job_id is not None, 10)
        time.sleep(1.0)
        assert not f.running() and not f.done()
        c.cancel(blockers[0])
        assert wait_for(lambda: f.running() or f.done(), 15)
        assert f.result(timeout=30) == 0.5
        c.cancel(blockers[1])


def test_executor_fails_the_futures_of_jobs_the_daemon_lost(
        daemon_factory: Callable[..., Daemon], store_kind: str) -> None:
    if store_kind != "sqlite":
        pytest.skip("needs a store that forgets (SQLite's :memory:)")
    d = daemon_factory(cfg={"store": {"path": ":memory:"}}).start()
    with Executor(d.url, unavailable_timeout=30) as ex:
        f = ex.submit(jobs.sleep, 30)
        assert wait_for(f.running, 15)
        d.kill()  # with an in-memory store the restarted daemon knows nothing of the job
        d.start()
        assert d.url == ex.client.url
        with pytest.raises(PooldError) as info:
            f.result(timeout=60)
        assert (info.value.status, info.value.code) == (404, "not_found")
        assert ex.submit(jobs.add, 2, 2).result(timeout=30) == 4


def test_executor_under_a_small_body_limit(daemon_factory: Callable[..., Daemon]) -> None:
    # Batches and long-polls are split until they fit into server.max_body_bytes.
    d = daemon_factory(cfg={"server": {"max_body_bytes": 2048}}).start()
    with Executor(d.url) as ex:
        futures = [ex.submit(jobs.noop, i) for i in range(300)]
        assert [f.result(timeout=60) for f in futures] == list(range(300))
        assert list(ex.map(jobs.noop, range(100), chunksize=20)) == list(range(100))


def test_executor_map_timeout_cancels_the_rest(executor: Executor, daemon: Daemon) -> None:
    results = executor.map(jobs.sleep, [30] * 6, timeout=1)
    with pytest.raises(TimeoutError):
        next(results)
    with Client(daemon.url) as c:
        assert wait_for(lambda: len(c.jobs(state="cancelled")) >= 4, 10)
        for j in c.jobs(state="running"):
            c.cancel(j["id"])


def test_future_cancel(executor: Executor, daemon: Daemon) -> None:
    running = [executor.submit(jobs.forever) for _ in range(2)]
    assert wait_for(lambda: all(f.running() for f in running), 15)
    queued = executor.submit(jobs.noop, 1)
    assert wait_for(lambda: queued.job_id is not None, 10)
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    with pytest.raises(cf.CancelledError):
        queued.result()
    done, _ = cf.wait([queued], timeout=1)  # waiters are told too
    assert done == {queued}
    with Client(daemon.url) as c:
        assert c.get(queued.job_id or "")["state"] == "cancelled"
        assert running[0].cancel() is False  # started: as the stdlib, not cancelled
        assert running[0].running() and c.get(running[0].job_id or "")["state"] == "running"
        for f in running:
            c.cancel(f.job_id or "")
    for f in running:
        with pytest.raises(cf.CancelledError):
            f.result(timeout=30)


def test_shutdown_cancel_futures(daemon: Daemon) -> None:
    ex = Executor(daemon.url)
    running = [ex.submit(jobs.sleep, 1.5) for _ in range(2)]
    assert wait_for(lambda: all(f.running() for f in running), 15)
    queued = [ex.submit(jobs.noop, i) for i in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert [f.result() for f in running] == [1.5, 1.5]
    assert all(f.cancelled() for f in queued)
    assert not any(t.is_alive() for t in ex._tracker._threads)
    with Client(daemon.url) as c:
        assert {c.get(f.job_id)["state"] for f in queued if f.job_id} <= {"cancelled"}
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(jobs.noop)


def test_shutdown_without_wait_finishes_in_background(daemon: Daemon) -> None:
    ex = Executor(daemon.url)
    f = ex.submit(jobs.sleep, 0.5)
    ex.shutdown(wait=False)
    assert f.result(timeout=30) == 0.5
    for t in ex._tracker._threads:
        t.join(10)
        assert not t.is_alive()


def test_max_pending_blocks_submit(daemon: Daemon) -> None:
    with Executor(daemon.url, max_pending=2) as ex:
        first = [ex.submit(jobs.sleep, 1) for _ in range(2)]
        t0 = time.monotonic()
        third = ex.submit(jobs.noop, 3)  # waits until one of the first two has finished
        assert time.monotonic() - t0 > 0.7
        assert any(f.done() for f in first)
        assert third.result(timeout=30) == 3
        assert list(ex.map(jobs.noop, range(5), chunksize=50)) == list(range(5))  # chunk <= max_pending


def test_executor_as_completed_and_threads(executor: Executor) -> None:
    def work(i: int) -> list[int]:
        return [f.result(timeout=60) for f in [executor.submit(jobs.add, i, j) for j in range(20)]]
    with cf.ThreadPoolExecutor(5) as pool:
        assert list(pool.map(work, range(5))) == [[i + j for j in range(20)] for i in range(5)]
    futures = {executor.submit(jobs.noop, i): i for i in range(20)}
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=60)) == list(range(20))

    async def in_asyncio() -> int:
        return await asyncio.get_running_loop().run_in_executor(executor, jobs.add, 1, 2)
    assert asyncio.run(in_asyncio()) == 3


def test_executor_waits_for_room_when_the_queue_is_full(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(cfg={"jobs": {"max_queue": 3}}).start()
    with Executor(d.url) as ex:
        assert list(ex.map(jobs.sleep, [0.05] * 12, chunksize=6)) == [0.05] * 12
        assert [f.result(timeout=60) for f in [ex.submit(jobs.noop, i) for i in range(12)]] == list(range(12))


def test_executor_unreachable_fails_futures() -> None:
    with Executor(dead_url(), unavailable_timeout=0.5) as ex:
        f = ex.submit(jobs.noop)
        with pytest.raises(PooldUnavailable):
            f.result(timeout=30)


def test_executor_pins_a_refused_item_on_its_future(executor: Executor) -> None:
    # Consecutive submits may share a batch; a refused batch is split so that only
    # the futures of the refused jobs fail.
    fns: list[Any] = [jobs.add, "json:dumps", jobs.add, "tests.support.jobs:no_such_function", jobs.add]
    futures = [executor.submit(fn, 1, 2) for fn in fns]
    assert [futures[i].result(timeout=30) for i in (0, 2, 4)] == [3, 3, 3]
    for i, code in ((1, "function_not_allowed"), (3, "function_not_found")):
        with pytest.raises(PooldError) as info:
            futures[i].result(timeout=30)
        assert info.value.code == code


def test_client_import_leaves_aiohttp_out() -> None:
    # The CLI imports Client: its start-up must not pay for aiohttp.
    code = ("import sys; from service.client import Client, PooldError; "
            "assert 'aiohttp' not in sys.modules, 'aiohttp imported'; "
            "from service.client import AsyncClient, Executor; "
            "assert 'aiohttp' in sys.modules and AsyncClient.__name__ == 'AsyncClient'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_executor_threads_are_released(daemon: Daemon) -> None:
    before = threading.active_count()
    for _ in range(3):
        with Executor(daemon.url) as ex:
            ex.submit(jobs.noop).result(timeout=30)
    assert threading.active_count() <= before

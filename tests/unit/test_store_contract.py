"""The store contract: what every JobStore backend must do, run against each of them.

A new backend joins by adding its name to BACKENDS and a branch to `make`. Tests are
sync functions running an async body (`@run_async`): SQLite's group commit needs a
running loop, and pytest-asyncio is not installed. Reads of Job JSON come after
`await store.committed()`, since a backend may show only committed data.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from service.model import STATES, ErrorType, job_error
from service.store.base import Claimed, JobStore, NewJob
from service.store.memory import MemoryStore
from service.store.postgres.store import PgStore
from service.store.sqlite.store import Store
from tests.support import postgres

BACKENDS = ["memory", "sqlite", "postgres"]
WORKER = '{"pid":1234,"name":"w1"}'
JOB_KEYS = ["id", "fn", "args", "kwargs", "state", "priority", "timeout", "retries", "attempts", "key",
            "created_at", "started_at", "finished_at", "worker", "result", "error", "progress"]
P = ParamSpec("P")


def make(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if backend == "memory":
        return MemoryStore()
    if backend == "postgres":  # opened in the test's loop (see run_async)
        server: postgres.PgServer = request.getfixturevalue("pg_server")
        return PgStore(server.url(), postgres.fresh_schema(), "test", "host-1")
    return Store(str(tmp_path / f"{backend}.db"))


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    s = make(request.param, request, tmp_path)
    yield s
    s.close()


def run_async(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Runs an async test in a fresh loop, committing what it wrote before the loop goes."""

    @functools.wraps(test)
    def sync(*args: P.args, **kwargs: P.kwargs) -> None:
        async def main() -> None:
            stores = [s for s in kwargs.values() if isinstance(s, MemoryStore | Store | PgStore)]
            for s in stores:
                if isinstance(s, PgStore):
                    await s.open()
            try:
                await test(*args, **kwargs)
            finally:
                for s in stores:
                    await s.committed()
                    await s.aclose()

        asyncio.run(main())

    return sync


# -- helpers
def new(key: str | None = None, priority: int = 0, retries: int = 0, args: str = "[1, 2]") -> NewJob:
    return NewJob("tests.support.jobs:echo", args, '{"k": "v"}', 30.0, priority, retries, key)


async def enqueue(store: JobStore, *jobs: NewJob) -> list[str]:
    return [jid for jid, _, _ in await store.enqueue(list(jobs) or [new()])]


async def claim(store: JobStore, jid: str) -> Claimed:
    """Claims the job `jid` (only it: the ones claimed before it are released)."""
    held: list[Claimed] = []
    try:
        while True:
            [c] = await store.claim(1, {h.id for h in held})
            if c.id == jid:
                return c
            held.append(c)
    finally:
        store.release(held)


async def run(store: JobStore, jid: str) -> Claimed:
    """Claims and starts a queued job (its start written): the Claimed of that attempt."""
    c = await claim(store, jid)
    store.start(c.seq, time.time(), WORKER)
    return c


def skip_restart(store: JobStore) -> None:
    """recover() is a restart on one host; on PostgreSQL a restart is a host taking its name
    over, with its own rules (tests/e2e/test_cluster.py)."""
    if isinstance(store, PgStore):
        pytest.skip("a restart on PostgreSQL is a host takeover: tests/e2e/test_cluster.py")


async def get(store: JobStore, jid: str) -> dict[str, Any]:
    await store.committed()
    job = await store.get(jid)
    assert job is not None
    return job


async def state_of(store: JobStore, jid: str) -> str | None:
    await store.committed()
    return (await store.states([jid])).get(jid)


async def check_queued(store: JobStore) -> None:
    """The queued counter agrees with the jobs (it sizes admission and batches)."""
    await store.committed()
    counts = await store.counts()
    assert set(counts) == set(STATES)
    assert store.queued == counts["queued"]


# -- enqueue and reads
@run_async
async def test_enqueue_then_read(store: JobStore) -> None:
    [(jid, text, created)] = await store.enqueue([new(priority=3, retries=2)])
    assert created and await state_of(store, jid) == "queued"  # seen at once, before any commit
    await store.committed()
    job = json.loads(text)
    assert list(job) == JOB_KEYS
    assert await get(store, jid) == job
    assert job["state"] == "queued" and job["args"] == [1, 2] and job["kwargs"] == {"k": "v"}
    assert (job["priority"], job["retries"], job["attempts"], job["timeout"]) == (3, 2, 0, 30.0)
    assert job["created_at"].endswith("Z") and job["started_at"] is None and job["finished_at"] is None
    assert await store.get_json(jid) == ("queued", text)
    assert await store.get("nope") is None and await store.get_json("nope") is None
    assert await state_of(store, "nope") is None
    await check_queued(store)


@run_async
async def test_claims_go_by_priority_then_fifo(store: JobStore) -> None:
    ids = await enqueue(store, *(new(priority=p) for p in (0, 5, 0, 5, -1)))
    order = [ids[i] for i in (1, 3, 0, 2, 4)]
    first = await store.claim(2, set())
    second = await store.claim(2, {c.id for c in first})  # a claimed job is not claimed again
    assert [c.id for c in first + second] == order[:4]
    store.release(first + second)
    await store.committed()
    everything = await store.claim(10, set())
    assert [c.id for c in everything] == order
    store.release(everything)
    await store.committed()
    await run(store, order[0])
    rest = await store.claim(10, set())
    assert [c.id for c in rest] == order[1:]  # running is not queued
    store.release(rest)
    await check_queued(store)


@run_async
async def test_keys_return_the_kept_job(store: JobStore) -> None:
    out = await store.enqueue([new(key="k1"), new(key="k1"), new(key="k2"), new()])
    assert [created for _, _, created in out] == [True, False, True, True]
    assert out[0][:2] == out[1][:2] and len({jid for jid, _, _ in out}) == 3
    await store.committed()
    [(jid, text, created)] = await store.enqueue([new(key="k1", priority=9)])
    assert (jid, created) == (out[0][0], False) and json.loads(text) == json.loads(out[0][1])
    found = await store.find_key("k1")
    assert found is not None and json.loads(found)["id"] == out[0][0]
    assert await store.find_key("other") is None
    assert store.queued == 3
    await check_queued(store)


# -- one attempt
@run_async
async def test_start_counts_the_attempt(store: JobStore) -> None:
    [jid] = await enqueue(store)
    c = await run(store, jid)
    assert c.attempts == 0 and await state_of(store, jid) == "running"
    job = await get(store, jid)
    assert job["state"] == "running" and job["attempts"] == 1
    assert job["worker"] == json.loads(WORKER) and job["started_at"] is not None
    assert job["finished_at"] is None and job["error"] is None
    await check_queued(store)


ENDS = [("succeeded", '{"x": [1, "a"]}', None),
        ("failed", None, job_error(ErrorType.EXCEPTION, "boom")),
        ("timed_out", None, job_error(ErrorType.TIMEOUT, "too long"))]


@pytest.mark.parametrize("written", [True, False], ids=["started", "start-unwritten"])
@pytest.mark.parametrize(("state", "result", "error"), ENDS, ids=[e[0] for e in ENDS])
@run_async
async def test_finish(store: JobStore, state: str, result: str | None, error: dict[str, Any] | None,
                      written: bool) -> None:
    [jid, other] = await enqueue(store, new(), new())
    c = await claim(store, jid)
    t = time.time()
    if written:
        store.start(c.seq, t, WORKER)
    store.finish(c, state, t, WORKER, written, result_json=result, error=error,
                 progress={"current": 2, "total": 3, "message": None})
    assert await state_of(store, jid) == state
    job = await get(store, jid)
    assert (job["state"], job["attempts"]) == (state, 1)
    assert job["result"] == (None if result is None else json.loads(result))
    assert job["error"] == error
    assert job["progress"] == {"current": 2, "total": 3, "message": None}
    assert job["worker"] == json.loads(WORKER) and job["started_at"] and job["finished_at"]
    assert list(job) == JOB_KEYS
    assert [c.id for c in await store.claim(10, set())] == [other]
    await check_queued(store)


# -- the attempt token: an end from an attempt that lost the job changes nothing
async def _restarted(store: JobStore, c: Claimed) -> None:
    store.retry(c.seq, job_error(ErrorType.WORKER_DIED, "gone"), attempts=c.attempts)
    await run(store, c.id)  # attempt 2 holds the job now


async def _cancelled(store: JobStore, c: Claimed) -> None:
    assert await store.cancel(c.id) == "running"


async def _recovered(store: JobStore, c: Claimed) -> None:
    assert await store.recover() == (1, 0)  # back to queued, attempts 1


LOST = {"restarted": (_restarted, "running", 2), "cancelled": (_cancelled, "cancelled", 1),
        "recovered": (_recovered, "queued", 1)}


@pytest.mark.parametrize("written", [True, False], ids=["started", "start-unwritten"])
@pytest.mark.parametrize("how", list(LOST))
@run_async
async def test_stale_finish_is_discarded(store: JobStore, how: str, written: bool) -> None:
    if how == "recovered":
        skip_restart(store)
    lose, state, attempts = LOST[how]
    [jid] = await enqueue(store, new(retries=3))
    c = await claim(store, jid)
    store.start(c.seq, time.time(), WORKER)
    await lose(store, c)
    await store.committed()
    before = await get(store, jid)
    store.finish(c, "succeeded", time.time(), WORKER, written, result_json="1")
    store.retry(c.seq, job_error(ErrorType.EXCEPTION, "late"), attempts=c.attempts)
    assert await state_of(store, jid) == state
    job = await get(store, jid)
    assert job == before and (job["state"], job["attempts"]) == (state, attempts)
    assert await store.states([jid]) == {jid: state}
    finished = [json.loads(t) for t in await store.finished_json([jid])]
    assert finished == ([job] if state == "cancelled" else [])
    await check_queued(store)


@run_async
async def test_the_holding_attempt_still_finishes(store: JobStore) -> None:
    [jid] = await enqueue(store, new(retries=1))
    first = await run(store, jid)
    store.retry(first.seq, job_error(ErrorType.WORKER_DIED, "gone"), attempts=first.attempts)
    second = await run(store, jid)
    assert (first.attempts, second.attempts) == (0, 1)
    store.finish(first, "failed", time.time(), WORKER, True, error=job_error(ErrorType.EXCEPTION, "old"))
    store.finish(second, "succeeded", time.time(), WORKER, True, result_json='"ok"')
    job = await get(store, jid)
    assert (job["state"], job["attempts"], job["result"], job["error"]) == ("succeeded", 2, "ok", None)


@pytest.mark.parametrize("token", [True, False], ids=["token", "no-token"])
@run_async
async def test_retry_back_to_queued(store: JobStore, token: bool) -> None:
    [jid] = await enqueue(store, new(retries=2))
    c = await run(store, jid)
    err = job_error(ErrorType.EXCEPTION, "boom", ValueError("x"))
    if token:
        store.retry(c.seq, err, attempts=c.attempts)
    else:
        store.retry(c.seq, err)  # today's callers: whichever attempt holds it
    job = await get(store, jid)
    assert (job["state"], job["attempts"], job["error"]) == ("queued", 1, err)
    assert (await claim(store, jid)).attempts == 1
    await check_queued(store)


# -- cancel
@pytest.mark.parametrize(("where", "left"), [("queued", "queued"), ("running", "running"),
                                             ("succeeded", "succeeded"), ("cancelled", "cancelled"),
                                             ("unknown", None)])
@run_async
async def test_cancel(store: JobStore, where: str, left: str | None) -> None:
    [jid] = await enqueue(store)
    if where != "queued":
        c = await run(store, jid)
    if where == "succeeded":
        store.finish(c, "succeeded", time.time(), WORKER, True, result_json="1")
    if where == "cancelled":
        await store.cancel(jid)
    progress = {"current": 1, "total": None, "message": "half"}
    assert await store.cancel("nope" if where == "unknown" else jid, progress) == left
    job = await get(store, jid)
    if left in ("queued", "running"):
        assert job["state"] == "cancelled" and job["finished_at"] is not None
        assert job["progress"] == progress
    else:
        assert job["state"] == {"succeeded": "succeeded", "unknown": "running"}.get(where, "cancelled")
    await check_queued(store)


# -- several jobs
@run_async
async def test_states_and_finished_json(store: JobStore) -> None:
    a, b, c = await enqueue(store, new(), new(), new())
    await run(store, b)
    store.finish(await run(store, c), "failed", time.time(), WORKER, True, error=job_error("exception", "x"))
    await store.committed()
    assert await store.states([a, b, c, "nope"]) == {a: "queued", b: "running", c: "failed"}
    assert await store.states([]) == {}
    [text] = await store.finished_json([a, b, c, "nope"])
    assert json.loads(text) == await get(store, c)
    assert await store.finished_json([a, b]) == []


@run_async
async def test_list_json_newest_first(store: JobStore) -> None:
    ids = await enqueue(store, *(new() for _ in range(5)))
    await run(store, ids[1])
    await run(store, ids[3])
    await store.committed()

    async def listed(state: str | None, limit: int) -> list[str]:
        return [json.loads(t)["id"] for t in await store.list_json(state, limit)]

    assert await listed(None, 10) == ids[::-1]
    assert await listed(None, 2) == [ids[4], ids[3]]
    assert await listed("queued", 10) == [ids[4], ids[2], ids[0]]
    assert await listed("running", 1) == [ids[3]]
    assert await listed("failed", 10) == []
    live = '{"current":7,"total":9,"message":null}'
    texts = {json.loads(t)["id"]: json.loads(t) for t in await store.list_json(None, 10, lambda jid: live)}
    assert texts[ids[1]]["progress"] == json.loads(live) and texts[ids[0]]["progress"] is None
    found = await store.get_json(ids[3], lambda jid: live)
    assert found is not None and json.loads(found[1])["progress"] == json.loads(live)


@pytest.mark.parametrize("ledger", [False, True], ids=["running", "ledger"])
@run_async
async def test_recover(store: JobStore, ledger: bool) -> None:
    """Running jobs of a previous instance: retried while retries are left, else failed; a ledger
    entry (an attempt begun but never written) counts as running when its attempt count matches."""
    skip_restart(store)
    again, last, stale, idle = await enqueue(store, new(retries=1), new(), new(), new())
    started: dict[int, tuple[int, float]] = {}
    for jid in (again, last):
        c = await claim(store, jid)
        if ledger:
            started[c.seq] = (c.attempts, time.time())
        else:
            store.start(c.seq, time.time(), WORKER)
    started[(await claim(store, stale)).seq] = (5, time.time())  # another attempt than the store's: ignored
    assert await store.recover(started) == (1, 1)
    job = await get(store, again)
    interrupted = job_error(ErrorType.INTERRUPTED, "the daemon stopped while the job ran")
    assert (job["state"], job["attempts"], job["error"]) == ("queued", 1, interrupted)
    job = await get(store, last)
    assert (job["state"], job["attempts"], job["error"]) == ("failed", 1, interrupted)
    assert job["finished_at"] is not None
    for jid in (stale, idle):
        assert (await get(store, jid))["state"] == "queued"
    assert await store.recover() == (0, 0)
    await check_queued(store)
    assert store.queued == 3


@run_async
async def test_expire(store: JobStore) -> None:
    done, cancelled, queued, running = await enqueue(store, new(key="k"), new(), new(), new())
    store.finish(await run(store, done), "succeeded", time.time(), WORKER, True, result_json="1")
    await store.cancel(cancelled)
    await run(store, running)
    await store.committed()
    assert await store.expire(3600) == 0 and await store.get(done) is not None
    await asyncio.sleep(0.01)
    assert await store.expire(0.0) == 2
    await store.committed()
    assert await store.get(done) is None and await store.get(cancelled) is None
    assert await state_of(store, done) is None
    assert await store.states([done, cancelled, queued, running]) == {queued: "queued", running: "running"}
    assert await store.find_key("k") is None
    [(_, _, created)] = await store.enqueue([new(key="k")])
    assert created  # the key is free again
    await store.committed()
    assert await store.counts() == dict.fromkeys(STATES, 0) | {"queued": 2, "running": 1}
    await check_queued(store)


@run_async
async def test_counts(store: JobStore) -> None:
    ids = await enqueue(store, *(new() for _ in range(6)))
    await run(store, ids[0])
    store.finish(await run(store, ids[1]), "succeeded", time.time(), WORKER, True, result_json="1")
    store.finish(await claim(store, ids[2]), "timed_out", time.time(), WORKER, False,
                 error=job_error("timeout", "t"))
    await store.cancel(ids[3])
    await store.committed()
    assert await store.counts() == {"queued": 2, "running": 1, "succeeded": 1, "failed": 0, "timed_out": 1,
                              "cancelled": 1}
    await check_queued(store)


# -- plumbing the layers above rely on
@run_async
async def test_commit_callbacks_and_health(store: JobStore) -> None:
    ran: list[int] = []
    await enqueue(store)
    store.after_commit(lambda: ran.append(1))
    await store.committed()
    await asyncio.sleep(0)
    assert ran == [1]
    assert store.healthy and store.last_error == "" and store.probe()
    store.repair()
    store.checkpoint()
    assert isinstance(store.path, str)


@run_async
async def test_process_records(store: JobStore) -> None:
    assert await store.recorded_processes() == []
    await store.record_processes([(10, 1.5, "daemon"), (11, 2.5, "worker")])
    await store.record_processes([(12, 3.5, "worker"), (13, 4.5, "helper")])
    await store.committed()
    assert sorted(await store.recorded_processes()) == [(12, 3.5, "worker"), (13, 4.5, "helper")]


# -- the backends agree on every byte but ids and times
def _scenario(store: JobStore) -> list[dict[str, Any]]:
    async def body() -> list[dict[str, Any]]:
        if isinstance(store, PgStore):
            await store.open()
        a, b, c, _ = await enqueue(store, new(key="k", priority=1, retries=1), new(args='{"nested": [null]}'),
                             new(), new(priority=-2))
        first = await run(store, a)
        store.retry(first.seq, job_error(ErrorType.WORKER_DIED, "gone"), attempts=first.attempts)
        store.finish(await run(store, a), "succeeded", time.time(), WORKER, True, result_json='{"r": 1.5}')
        await store.cancel(b, {"current": 1, "total": 2, "message": "m"})
        await run(store, c)
        await store.committed()
        ids = {json.loads(t)["id"]: n for n, t in enumerate(await store.list_json(None, 10))}
        out = []
        for t in await store.list_json(None, 10):
            job = json.loads(t)
            job["id"] = ids[job["id"]]
            for k in ("created_at", "started_at", "finished_at"):
                job[k] = job[k] is not None
            out.append(job)
        await store.aclose()
        return out

    return asyncio.run(body())


def test_backends_answer_alike(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    answers = []
    for backend in BACKENDS:
        s = make(backend, request, tmp_path)
        try:
            answers.append(_scenario(s))
        finally:
            s.close()
    assert all(a == answers[0] for a in answers[1:])
    assert [j["state"] for j in answers[0]] == ["queued", "running", "cancelled", "succeeded"]

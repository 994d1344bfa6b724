"""The HTTP API of a real daemon: every endpoint, every error code, the Job's life.

Most tests share one daemon per module (`api`, cleaned between tests: nothing queued
or running, every worker alive and idle); tests that need a configuration of their
own, or exact global state, start their own through `daemon_factory` / `daemon`.
"""

from __future__ import annotations

import email.utils
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

from tests.support import postgres
from tests.support.daemon import (
    ERROR_TYPES,
    JOB_FIELDS,
    TERMINAL,
    TS_RE,
    WORKER_FIELDS,
    Daemon,
    expect_error,
    gone,
    proc_args,
    read_pid,
    running_daemon,
    ts,
    wait_for,
)

pytestmark = pytest.mark.stores("sqlite", "postgres")

WORKER_NAMES = {"poold: worker 1", "poold: worker 2"}
TOKEN = "s3cret-token"


# -- fixtures


@pytest.fixture(scope="module", params=["sqlite", "postgres"], ids=["store=sqlite", "store=postgres"])
def shared_daemon(request, tmp_path_factory):
    # tests.no_such_module is allowed so that a missing module is "not found", not "not allowed"
    cfg = {"jobs": {"allow": ["service.demo:*", "tests.support.jobs:*", "tests.no_such_module:*"]},
           **store_cfg(request, request.param)}
    with running_daemon(tmp_path_factory.mktemp("api"), cfg=cfg) as d:
        yield d


@pytest.fixture
def api(shared_daemon):
    """The module's daemon; afterwards: every job cancelled, both workers alive and idle.

    When the pool does not recover, later tests fail at once instead of waiting again.
    """
    d = shared_daemon
    if d.notes.get("broken"):
        pytest.fail(f"the shared daemon broke in an earlier test: {d.notes['broken']}")
    assert d.running(), "the shared daemon died:\n" + d.logtext()
    assert wait_for(lambda: d.settled(2), 20), d.workers()
    yield d
    problem = None
    if not d.running():
        problem = "the daemon died during the test:\n" + d.logtext()
    else:
        d.cancel_all()
        if not wait_for(lambda: d.settled(2), 20):
            problem = f"the pool did not recover: {d.workers()}\n{d.logtext(3000)}"
    if problem:
        d.notes["broken"] = problem
        pytest.fail(problem)


@pytest.fixture(scope="module")
def token_daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("auth"), cfg={"server": {"token": TOKEN}}) as d:
        finished = d.run("tests.support.jobs:add", 1, 1)
        assert finished["state"] == "succeeded", finished
        d.notes["finished_id"] = finished["id"]
        yield d


def store_cfg(request, kind: str) -> dict:
    """The config that puts a daemon on `kind`'s store (a fresh schema on the session's server)."""
    if kind == "sqlite":
        return {}
    server = request.getfixturevalue("pg_server")
    return {"store": {"url": server.url(), "schema": postgres.fresh_schema()}}


def single(daemon_factory, **cfg) -> Daemon:
    """A started daemon with one worker (and more config)."""
    cfg.setdefault("pool", {})["workers"] = 1
    return daemon_factory(cfg=cfg).start()


def block(d: Daemon) -> str:
    """Occupies a worker with a job that runs until cancelled; returns its id."""
    jid = d.submit("tests.support.jobs:forever", timeout=120)["id"]
    d.wait_state(jid, "running")
    return jid


def count(d: Daemon) -> int:
    return len(d.jobs())


def mentions_index(message: str, i: int) -> bool:
    return re.search(rf"(?<![\w.]){i}(?![\w.])", message) is not None


# -- POST /v1/jobs and GET /v1/jobs/{id}


def test_submit_answers_202_with_location_and_a_full_job(api):
    t0 = time.time()
    r = api.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [2, 3]})
    assert r.status == 202, r
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    j = r.json
    assert set(JOB_FIELDS) <= set(j), set(JOB_FIELDS) - set(j)
    assert isinstance(j["id"], str) and j["id"] and "/" not in j["id"]
    location = r.headers["Location"]
    assert urlsplit(location).path == f"/v1/jobs/{j['id']}", location
    assert (j["fn"], j["args"], j["kwargs"], j["priority"], j["retries"], j["key"]) == \
        ("tests.support.jobs:add", [2, 3], {}, 0, 0, None)
    assert j["timeout"] == 300.0  # jobs.default_timeout
    assert j["state"] in ("queued", "running", "succeeded"), j
    assert TS_RE.fullmatch(j["created_at"]), j["created_at"]
    assert t0 - 5 <= ts(j["created_at"]) <= time.time() + 5, (j["created_at"], t0)  # UTC
    # the Location leads to the same job
    got = api.get(urlsplit(location).path)
    assert got.status == 200 and got.json["id"] == j["id"], got
    assert got.headers["Content-Type"].startswith("application/json")
    assert got.json["created_at"] == j["created_at"]

    done = api.wait_done(j["id"])
    assert done["state"] == "succeeded" and done["result"] == 5, done
    assert done["attempts"] == 1 and done["error"] is None and done["progress"] is None, done
    for k in ("created_at", "started_at", "finished_at"):
        assert isinstance(done[k], str) and TS_RE.fullmatch(done[k]), (k, done[k])
    assert ts(done["created_at"]) <= ts(done["started_at"]) <= ts(done["finished_at"]), done
    assert isinstance(done["worker"]["pid"], int) and done["worker"]["name"] in WORKER_NAMES, done


def test_every_spec_field_is_kept(api):
    key = f"fields-{uuid.uuid4().hex}"
    spec = {"fn": "tests.support.jobs:echo", "args": [1, "x", None, [2.5]], "kwargs": {"k": {"n": [1]}},
            "timeout": 12.5, "priority": 7, "retries": 2, "key": key}
    r = api.post("/v1/jobs", spec)
    assert r.status == 202, r
    for field, v in spec.items():
        assert r.json[field] == v, (field, r.json)
    done = api.wait_done(r.json["id"])
    assert done["result"] == {"args": [1, "x", None, [2.5]], "kwargs": {"k": {"n": [1]}}}, done
    for field, v in spec.items():
        assert done[field] == v, (field, done)


def test_unicode_and_nested_json_round_trip(api):
    value = {"ünïcödé": "日本語 ✓", "deep": [[[{"a": [1, 2, {"b": None}]}]]], "big": 2**53, "neg": -0.5}
    j = api.run("tests.support.jobs:noop", value)
    assert j["state"] == "succeeded" and j["result"] == value, j


def test_wait_is_woken_by_completion(api):
    jid = api.submit("tests.support.jobs:sleep", 0.5)["id"]
    t = time.monotonic()
    j = api.job(jid, wait=30)
    # a long-poll ends when the job does, not when S runs out
    assert j["state"] == "succeeded" and time.monotonic() - t < 15, (j, time.monotonic() - t)


def test_wait_returns_the_current_state_after_s(api):
    jid = block(api)
    t = time.monotonic()
    j = api.job(jid, wait=1)
    dt = time.monotonic() - t
    assert j["state"] == "running" and 0.9 <= dt < 10, (j, dt)
    t = time.monotonic()
    j = api.job(jid, wait=0.5)
    dt = time.monotonic() - t
    assert j["state"] == "running" and 0.4 <= dt < 10, (j, dt)
    t = time.monotonic()
    assert api.job(jid, wait=0)["state"] == "running" and time.monotonic() - t < 5
    assert api.delete(f"/v1/jobs/{jid}").status == 200


def test_wait_on_a_finished_job_answers_at_once(api):
    jid = api.run("tests.support.jobs:add", 1, 1)["id"]
    for s in ("0", "1", "60"):
        t = time.monotonic()
        r = api.get(f"/v1/jobs/{jid}?wait={s}")
        assert r.status == 200 and r.json["state"] == "succeeded", r
        assert time.monotonic() - t < 5


def test_wait_on_an_unknown_job_is_404_at_once(api):
    t = time.monotonic()
    expect_error(api.get("/v1/jobs/no-such-job?wait=30"), 404, "not_found")
    assert time.monotonic() - t < 10


def test_wait_is_woken_by_a_cancel_for_every_waiter(api):
    jid = block(api)
    with ThreadPoolExecutor(3) as ex:
        t = time.monotonic()
        waiters = [ex.submit(api.job, jid, 30) for _ in range(3)]
        time.sleep(0.5)  # the waiters are parked
        assert api.delete(f"/v1/jobs/{jid}").status == 200
        states = [w.result(timeout=20)["state"] for w in waiters]
    assert states == ["cancelled"] * 3 and time.monotonic() - t < 15, states


def test_wait_on_a_queued_job(daemon_factory):
    d = single(daemon_factory)
    blocker = d.submit("tests.support.jobs:sleep", 1.0)["id"]
    d.wait_state(blocker, "running")
    queued = d.submit("tests.support.jobs:add", 2, 2)["id"]
    assert d.job(queued)["state"] == "queued"
    j = d.job(queued, wait=30)
    assert j["state"] == "succeeded" and j["result"] == 4, j


@pytest.mark.parametrize("s", ["-1", "61", "abc", "60.5", "-0.1", "1e9", "nan", "inf"])
def test_wait_out_of_range(api, s):
    jid = api.run("tests.support.jobs:add", 1, 1)["id"]
    err = expect_error(api.get(f"/v1/jobs/{jid}?wait={s}"), 422, "invalid_request")
    assert "wait" in err["message"], err


# -- GET /v1/jobs


def test_list_newest_first_with_state_and_limit(daemon):
    ids = [daemon.run("tests.support.jobs:add", i, 0)["id"] for i in range(4)]  # one at a time
    failed = daemon.run("tests.support.jobs:boom")["id"]
    newest_first = [failed, *ids[::-1]]
    r = daemon.get("/v1/jobs")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json"), r
    assert [j["id"] for j in r.json["jobs"]] == newest_first, r.json
    assert all(set(JOB_FIELDS) <= set(j) for j in r.json["jobs"])
    assert [j["id"] for j in daemon.jobs("state=succeeded")] == ids[::-1]
    assert [j["id"] for j in daemon.jobs("state=failed")] == [failed]
    assert daemon.jobs("state=queued") == [] and daemon.jobs("state=running") == []
    assert daemon.jobs("state=cancelled") == [] and daemon.jobs("state=timed_out") == []
    assert [j["id"] for j in daemon.jobs("limit=2")] == newest_first[:2]
    assert [j["id"] for j in daemon.jobs("limit=1&state=succeeded")] == [ids[-1]]
    # default limit: 100
    r = daemon.post("/v1/jobs/batch",
                    {"jobs": [{"fn": "tests.support.jobs:noop", "args": [i]} for i in range(101)]})
    assert r.status == 202, r
    assert len(daemon.jobs("")) == 100
    assert len(daemon.jobs("limit=1000")) == 106
    assert len(daemon.jobs("limit=101")) == 101


@pytest.mark.parametrize("limit", ["0", "1001", "x", "-1", "1.5", "100000000000000000000"])
def test_list_limit_out_of_range(api, limit):
    err = expect_error(api.get(f"/v1/jobs?limit={limit}"), 422, "invalid_request")
    assert "limit" in err["message"], err


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_list_limit_bounds_accepted(api, limit):
    api.run("tests.support.jobs:add", 1, 1)
    r = api.get(f"/v1/jobs?limit={limit}")
    assert r.status == 200 and 1 <= len(r.json["jobs"]) <= int(limit), r


def test_list_unknown_state_is_not_a_server_error(api):
    r = api.get("/v1/jobs?state=bogus")
    assert r.status in (200, 422), r
    if r.status == 200:
        assert r.json["jobs"] == []
    else:
        expect_error(r, 422, "invalid_request")


# -- DELETE /v1/jobs/{id}


def test_cancel_queued_job_never_runs(daemon_factory):
    d = single(daemon_factory)
    blocker = block(d)
    marker = d.tmp / "ran"
    marker2 = d.tmp / "ran2"
    victim = d.submit("tests.support.jobs:touch", str(marker), retries=3)["id"]
    victim2 = d.submit("tests.support.jobs:touch", str(marker2))["id"]
    after = d.submit("tests.support.jobs:add", 1, 1)["id"]
    assert d.job(victim)["state"] == "queued"
    r = d.delete(f"/v1/jobs/{victim}")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json"), r
    assert r.json["id"] == victim and r.json["state"] == "cancelled", r
    # queued_only=true cancels a job that has not started
    r = d.delete(f"/v1/jobs/{victim2}?queued_only=true")
    assert r.status == 200 and r.json["state"] == "cancelled", r
    assert [j["id"] for j in d.jobs("state=queued")] == [after]
    r = d.delete(f"/v1/jobs/{blocker}")
    assert r.status == 200 and r.json["state"] == "cancelled", r
    assert d.wait_done(after)["result"] == 2
    assert d.run("tests.support.jobs:add", 2, 2)["result"] == 4  # the queue has moved past the victims
    for jid in (victim, victim2):
        j = d.job(jid)
        assert j["state"] == "cancelled" and j["attempts"] == 0, j
        assert j["started_at"] is None and j["worker"] is None and j["result"] is None, j
    assert not marker.exists() and not marker2.exists()
    assert {j["id"] for j in d.jobs("state=cancelled")} == {victim, victim2, blocker}


def test_cancel_running_kills_its_tree_and_replaces_its_worker(api, tmp_path):
    pidfile = tmp_path / "child.pid"
    other = api.submit("tests.support.jobs:sleep", 2.0)["id"]
    victim = api.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=60, retries=3)["id"]
    j = api.wait_state(victim, "running")
    api.wait_state(other, "running")
    child = read_pid(pidfile)
    old = j["worker"]
    assert old["name"] in WORKER_NAMES and not gone(old["pid"]), old
    r = api.delete(f"/v1/jobs/{victim}")
    assert r.status == 200 and r.json["state"] == "cancelled", r
    assert wait_for(lambda: gone(old["pid"]) and gone(child), 5), (proc_args(old["pid"]), proc_args(child))

    def replaced():
        ws = api.live_workers()
        ok = len(ws) == 2 and all(w["state"] == "idle" for w in ws)
        return ok and old["pid"] not in {w["pid"] for w in ws} and ws

    ws = wait_for(replaced, 15)
    assert ws, api.workers()
    assert {w["name"] for w in ws} == WORKER_NAMES
    new = next(w for w in ws if w["name"] == old["name"])  # the replacement keeps its slot's N
    assert new["pid"] != old["pid"]
    assert wait_for(lambda: proc_args(new["pid"]) == old["name"], 5), proc_args(new["pid"])
    # the other running job was not disturbed
    j_other = api.wait_done(other)
    assert j_other["state"] == "succeeded" and j_other["attempts"] == 1, j_other
    # a cancel is never retried
    j = api.job(victim)
    assert j["state"] == "cancelled" and j["attempts"] == 1 and j["error"] is None, j
    assert api.run("tests.support.jobs:add", 2, 2)["result"] == 4


def test_cancel_with_queued_only_false_cancels_a_running_job(api):
    jid = block(api)
    r = api.delete(f"/v1/jobs/{jid}?queued_only=false")
    assert r.status == 200 and r.json["state"] == "cancelled", r


def test_queued_only_leaves_a_running_job_alone(api):
    jid = api.submit("tests.support.jobs:sleep", 1.5)["id"]
    j = api.wait_state(jid, "running")
    expect_error(api.delete(f"/v1/jobs/{jid}?queued_only=true"), 409, "already_started")
    assert not gone(j["worker"]["pid"])
    assert api.job(jid)["state"] == "running"
    done = api.wait_done(jid)
    assert done["state"] == "succeeded" and done["attempts"] == 1, done
    assert done["worker"]["pid"] == j["worker"]["pid"]


def test_cancel_finished_is_409(api):
    ok = api.run("tests.support.jobs:add", 1, 1)["id"]
    bad = api.run("tests.support.jobs:boom")["id"]
    cancelled = block(api)
    assert api.delete(f"/v1/jobs/{cancelled}").status == 200
    for jid in (ok, bad, cancelled):
        before = api.job(jid)
        expect_error(api.delete(f"/v1/jobs/{jid}"), 409, "already_finished")
        err = expect_error(api.delete(f"/v1/jobs/{jid}?queued_only=true"), 409)
        assert err["code"] in ("already_finished", "already_started"), err
        assert api.job(jid) == before  # unchanged


@pytest.mark.parametrize("path", ["/v1/jobs/no-such-job", "/v1/jobs/no-such-job?queued_only=true"])
def test_cancel_unknown_is_404(api, path):
    expect_error(api.delete(path), 404, "not_found")


# -- idempotency keys


def test_idempotency_key(api):
    key = f"order-{uuid.uuid4().hex}"
    r1 = api.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 2], "key": key})
    assert r1.status == 202, r1
    n = count(api)
    r2 = api.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 2], "key": key})
    assert r2.status == 200 and r2.json["id"] == r1.json["id"], r2
    assert r2.headers["Content-Type"].startswith("application/json")
    # "whatever the rest of the body"
    r3 = api.post("/v1/jobs", {"fn": "tests.support.jobs:echo", "args": ["other"], "priority": 9,
                               "retries": 4, "timeout": 5, "key": key})
    assert r3.status == 200 and r3.json["id"] == r1.json["id"], r3
    assert (r3.json["fn"], r3.json["args"], r3.json["priority"]) == ("tests.support.jobs:add", [1, 2], 0), r3
    for rest in ({"fn": "os:system", "args": ["true"]}, {"fn": "tests.support.jobs:add", "priority": 99999},
                 {"fn": "no colon", "args": None, "bogus": 1}):  # even when the rest is refused
        r = api.post("/v1/jobs", {**rest, "key": key})
        assert r.status == 200 and r.json["id"] == r1.json["id"], (rest, r)
    assert api.wait_done(r1.json["id"])["result"] == 3
    # still the kept job once finished
    r4 = api.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [5, 5], "key": key})
    assert r4.status == 200 and r4.json["id"] == r1.json["id"] and r4.json["result"] == 3, r4
    assert r4.json["state"] == "succeeded"
    assert count(api) == n, "a repeated key enqueued a job"
    assert [j["id"] for j in api.jobs() if j["key"] == key] == [r1.json["id"]]
    # another key is another job
    r5 = api.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 2], "key": key + "-2"})
    assert r5.status == 202 and r5.json["id"] != r1.json["id"], r5


def test_idempotency_key_of_a_cancelled_job(api):
    key = f"cancelled-{uuid.uuid4().hex}"
    jid = api.submit("tests.support.jobs:forever", key=key, timeout=60)["id"]
    assert api.delete(f"/v1/jobs/{jid}").status == 200
    r = api.post("/v1/jobs", {"fn": "tests.support.jobs:forever", "key": key, "timeout": 60})
    assert r.status == 200 and r.json["id"] == jid and r.json["state"] == "cancelled", r


def test_concurrent_submits_with_one_key_make_one_job(api):
    key = f"race-{uuid.uuid4().hex}"
    n = count(api)
    barrier = threading.Barrier(8)

    def submit(_):
        barrier.wait(10)
        return api.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 1], "key": key})

    with ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(submit, range(8)))
    assert sorted(r.status for r in rs) == [200] * 7 + [202], rs
    assert len({r.json["id"] for r in rs}) == 1
    assert count(api) == n + 1


def test_concurrent_submits_all_run(api):
    barrier = threading.Barrier(10)

    def submit(i):
        barrier.wait(10)
        return [api.submit("tests.support.jobs:add", i, k)["id"] for k in range(5)]

    with ThreadPoolExecutor(10) as ex:
        ids = list(ex.map(submit, range(10)))
    flat = [jid for chunk in ids for jid in chunk]
    assert len(set(flat)) == 50
    for i, chunk in enumerate(ids):
        assert [api.wait_done(jid)["result"] for jid in chunk] == [i + k for k in range(5)]


def test_idempotency_key_in_a_batch(api):
    key = f"batch-{uuid.uuid4().hex}"
    first = api.submit("tests.support.jobs:add", 1, 1, key=key)
    r = api.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:add", "args": [2, 2]},
                                             {"fn": "tests.support.jobs:add", "args": [3, 3], "key": key}]})
    assert r.status == 202, r
    assert r.json["jobs"][1]["id"] == first["id"], r.json
    assert r.json["jobs"][0]["id"] != first["id"]


# -- POST /v1/jobs/batch


def test_batch_keeps_request_order(api):
    specs: list[dict[str, Any]] = [
        {"fn": "tests.support.jobs:add", "args": [1, 2]}, {"fn": "tests.support.jobs:echo", "args": ["a"]},
        {"fn": "tests.support.jobs:noop", "args": [7]}, {"fn": "tests.support.jobs:boom"},
        {"fn": "tests.support.jobs:add", "args": [10, 5], "priority": 5},
        {"fn": "service.demo:fib", "args": [10]}]
    r = api.post("/v1/jobs/batch", {"jobs": specs})
    assert r.status == 202 and r.headers["Content-Type"].startswith("application/json"), r
    jobs = r.json["jobs"]
    assert [(j["fn"], j["args"]) for j in jobs] == [(s["fn"], s.get("args", [])) for s in specs]
    assert len({j["id"] for j in jobs}) == len(specs)
    assert all(set(JOB_FIELDS) <= set(j) for j in jobs)
    done = [api.wait_done(j["id"]) for j in jobs]
    assert [j["state"] for j in done] == ["succeeded"] * 3 + ["failed"] + ["succeeded"] * 2
    assert [done[i]["result"] for i in (0, 1, 2, 4, 5)] == [3, {"args": ["a"], "kwargs": {}}, 7, 15, 55]


BAD_SPECS = [
    ("not_allowed", 0, {"fn": "os:system", "args": ["true"]}, 403, "function_not_allowed"),
    ("no_such_function", 3, {"fn": "tests.support.jobs:no_such_function"}, 422, "function_not_found"),
    ("no_such_module", 1, {"fn": "tests.no_such_module:f"}, 422, "function_not_found"),
    ("no_fn", 2, {"args": [1]}, 422, "invalid_request"),
    ("bad_timeout", 5, {"fn": "tests.support.jobs:add", "args": [1, 2], "timeout": -1}, 422,
     "invalid_request"),
    ("bad_priority", 6, {"fn": "tests.support.jobs:add", "priority": 5000}, 422, "invalid_request"),
    ("bad_args", 4, {"fn": "tests.support.jobs:add", "args": {"a": 1}}, 422, "invalid_request"),
    ("not_an_object", 4, 17, 422, "invalid_request"),
    ("last_one", 7, {"fn": "tests.support.jobs:add", "unknown_field": 1}, 422, "invalid_request"),
]


@pytest.mark.parametrize(("bad", "index", "status", "code"),
                         [pytest.param(b, i, s, c, id=name) for name, i, b, s, c in BAD_SPECS])
def test_batch_is_all_or_nothing(api, tmp_path, bad, index, status, code):
    markers = [tmp_path / f"m{i}" for i in range(8)]
    specs = [{"fn": "tests.support.jobs:touch", "args": [str(m)]} for m in markers]
    specs[index] = bad
    n = count(api)
    r = api.post("/v1/jobs/batch", {"jobs": specs})
    err = expect_error(r, status, code)
    assert mentions_index(err["message"], index), err
    assert count(api) == n, "part of a refused batch was enqueued"
    assert api.run("tests.support.jobs:add", 1, 1)["result"] == 2  # anything enqueued would have run by now
    assert not any(m.exists() for m in markers)
    # the same bad spec alone gets the same answer
    expect_error(api.post("/v1/jobs", bad), status, code)


@pytest.mark.parametrize("body", [{}, {"jobs": {}}, {"jobs": "x"}, {"jobs": None}, [], {"specs": []}])
def test_batch_shape(api, body):
    err = expect_error(api.post("/v1/jobs/batch", body), 422, "invalid_request")
    assert "jobs" in err["message"] or "specs" in err["message"], err


# -- limits: max_queue, max_body_bytes, max_result_bytes


def test_queue_full(daemon_factory):
    d = single(daemon_factory, jobs={"max_queue": 3})
    blocker = block(d)  # running: does not count
    queued = [d.submit("tests.support.jobs:noop", i)["id"] for i in range(3)]
    r = d.post("/v1/jobs", {"fn": "tests.support.jobs:noop", "args": [9]})
    expect_error(r, 429, "queue_full")
    retry_after = r.headers.get("Retry-After")
    assert retry_after is not None, r.headers
    assert retry_after.strip().isdigit() or email.utils.parsedate_to_datetime(retry_after), retry_after
    expect_error(d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:noop"}]}), 429, "queue_full")
    assert len(d.jobs("state=queued")) == 3
    assert d.delete(f"/v1/jobs/{queued[0]}").status == 200
    # 2 queued: a batch of 2 would cross max_queue, so none of it is taken
    r = d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:noop", "args": [i]} for i in range(2)]})
    expect_error(r, 429, "queue_full")
    assert "Retry-After" in r.headers
    assert len(d.jobs("state=queued")) == 2 and count(d) == 4  # the blocker and 3 submitted
    r = d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:noop", "args": [42]}]})
    assert r.status == 202, r
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:noop"}), 429, "queue_full")
    assert d.delete(f"/v1/jobs/{blocker}").status == 200
    for jid in [*queued[1:], r.json["jobs"][0]["id"]]:
        assert d.wait_done(jid)["state"] == "succeeded"
    assert d.run("tests.support.jobs:noop", 1)["result"] == 1  # room again


def test_queue_full_does_not_refuse_a_repeated_key(daemon_factory):
    d = single(daemon_factory, jobs={"max_queue": 2})
    block(d)
    keyed = d.submit("tests.support.jobs:noop", 1, key="k1")["id"]
    d.submit("tests.support.jobs:noop", 2)
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:noop"}), 429, "queue_full")
    # nothing new would be enqueued: the kept job is the answer
    r = d.post("/v1/jobs", {"fn": "tests.support.jobs:noop", "args": [1], "key": "k1"})
    assert r.status == 200 and r.json["id"] == keyed, r


def test_payload_too_large(daemon_factory):
    d = daemon_factory(cfg={"server": {"max_body_bytes": 4096}}).start()
    n = count(d)
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:echo", "args": ["x" * 10000]}), 413,
                 "payload_too_large")
    expect_error(d.post("/v1/jobs/batch",
                        {"jobs": [{"fn": "tests.support.jobs:noop", "args": ["y" * 500]}] * 20}),
                 413, "payload_too_large")
    assert count(d) == n
    assert d.run("tests.support.jobs:echo", "y" * 3000)["state"] == "succeeded"


def test_result_too_large(daemon_factory):
    d = daemon_factory(cfg={"jobs": {"max_result_bytes": 1000}}).start()
    j = d.run("tests.support.jobs:blob", 100000)
    assert j["state"] == "failed" and j["error"]["type"] == "result_too_large", j
    assert j["result"] is None and isinstance(j["error"]["message"], str), j
    assert d.run("tests.support.jobs:blob", 10)["result"] == "x" * 10
    # the limit is on results, not arguments
    j = d.run("tests.support.jobs:has_module", "z" * 5000)
    assert j["state"] == "succeeded" and j["result"] is False, j
    assert d.run("tests.support.jobs:echo", "z" * 5000)["error"]["type"] == "result_too_large"


def test_default_and_max_timeout_come_from_the_config(daemon_factory):
    d = daemon_factory(cfg={"jobs": {"default_timeout": 1.5, "max_timeout": 5.0}}).start()
    j = d.submit("tests.support.jobs:forever")
    assert j["timeout"] == 1.5, j
    j = d.wait_done(j["id"], 20)
    assert j["state"] == "timed_out" and j["error"]["type"] == "timeout", j
    assert d.submit("tests.support.jobs:add", 1, 1, timeout=5)["timeout"] == 5
    err = expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 1], "timeout": 5.01}),
                       422, "invalid_request")
    assert "timeout" in err["message"], err


# -- authentication


AUTH_ENDPOINTS = [
    ("GET", "/v1/jobs", None),
    ("GET", "/v1/jobs?state=succeeded", None),
    ("POST", "/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 1]}),
    ("POST", "/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:add", "args": [1, 1]}]}),
    ("GET", "/v1/jobs/{id}", None),
    ("GET", "/v1/jobs/{id}?wait=1", None),
    ("DELETE", "/v1/jobs/{id}", None),
    ("GET", "/v1/workers", None),
    ("GET", "/v1/hosts", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
]
BAD_AUTH = {
    "none": None,
    "wrong": "Bearer wrong-token",
    "empty": "Bearer ",
    "prefix": f"Bearer {TOKEN[:-1]}",
    "longer": f"Bearer {TOKEN}x",
    "no_scheme": TOKEN,
    "basic": f"Basic {TOKEN}",
}


@pytest.mark.parametrize("auth", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
@pytest.mark.parametrize(("method", "path", "body"), AUTH_ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, _ in AUTH_ENDPOINTS])
def test_token_required(token_daemon, method, path, body, auth):
    d = token_daemon
    n = count(d)
    headers = {"Authorization": auth} if auth is not None else {}
    r = d.request(method, path.replace("{id}", d.notes["finished_id"]), body, headers=headers, token=None)
    expect_error(r, 401, "unauthorized")
    assert count(d) == n


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Bearer {TOKEN}"])
def test_health_needs_no_token(token_daemon, auth):
    headers = {"Authorization": auth} if auth else {}
    r = token_daemon.get("/health", headers=headers, token=None)
    assert r.status == 200 and r.json["status"] == "ok", r


def test_right_token_works_everywhere(token_daemon):
    d = token_daemon
    assert d.token == TOKEN
    finished = d.notes["finished_id"]
    for path in ("/v1/jobs", "/v1/workers", "/metrics", "/openapi.json", f"/v1/jobs/{finished}"):
        r = d.get(path)
        assert r.status == 200, (path, r)
    assert d.run("tests.support.jobs:add", 2, 3)["result"] == 5
    r = d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:add", "args": [1, 1]}]})
    assert r.status == 202, r
    jid = block(d)
    r = d.delete(f"/v1/jobs/{jid}")
    assert r.status == 200 and r.json["state"] == "cancelled", r


def test_token_file(daemon_factory, tmp_path):
    tf = tmp_path / "token"
    tf.write_text("  file-token-123 \n")
    d = daemon_factory(cfg={"server": {"token_file": str(tf)}}, token="file-token-123").start()
    assert d.run("tests.support.jobs:add", 1, 2)["result"] == 3
    expect_error(d.get("/v1/jobs", token=None), 401, "unauthorized")
    expect_error(d.get("/v1/jobs", token="  file-token-123 "), 401, "unauthorized")
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:noop"}, token="wrong"), 401, "unauthorized")
    assert d.get("/health", token=None).status == 200


# -- errors


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/jobs/no-such-job"),
    ("DELETE", "/v1/jobs/no-such-job"),
    ("GET", "/nope"),
    ("GET", "/v1/nope"),
    ("POST", "/v1/nope"),
    ("GET", "/v2/jobs"),
    ("GET", "/v1/jobs/a/b"),
    ("GET", "/"),
])
def test_not_found(api, method, path):
    expect_error(api.request(method, path), 404, "not_found")


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/v1/jobs"),
    ("PATCH", "/v1/jobs"),
    ("DELETE", "/v1/jobs"),
    ("PUT", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}"),
    ("PUT", "/v1/jobs/batch"),
    ("DELETE", "/v1/workers"),
    ("POST", "/v1/workers"),
    ("POST", "/health"),
    ("POST", "/metrics"),
    ("PUT", "/openapi.json"),
])
def test_method_not_allowed(api, method, path):
    jid = api.run("tests.support.jobs:add", 1, 1)["id"]
    body = {"fn": "tests.support.jobs:noop"} if method in ("PUT", "PATCH", "POST") else None
    n = count(api)
    r = api.request(method, path.replace("{id}", jid), body)
    err = expect_error(r, 405, "method_not_allowed")
    allow = r.headers.get("Allow", "").split(", ")
    assert method not in allow and all(m in err["message"] for m in allow), (r.headers, err)
    if path == "/v1/jobs":  # a path with a resource per method: every one is named
        assert allow == ["GET", "POST"], allow
    assert count(api) == n


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/batch"])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe{}", b'{"fn": "tests.support.jobs:add",',
                                 b"{'fn': 'tests.support.jobs:add'}", b'{"fn": "tests.support.jobs:add"} x'],
                         ids=["garbage", "empty", "binary", "truncated", "single_quotes", "trailing"])
def test_invalid_json(api, path, raw):
    expect_error(api.post(path, raw=raw), 400, "invalid_json")


@pytest.mark.parametrize("raw", [b"[]", b"null", b"42", b'"tests.support.jobs:add"',
                                 b'[{"fn": "tests.support.jobs:add"}]'])
def test_json_that_is_not_an_object(api, raw):
    expect_error(api.post("/v1/jobs", raw=raw), 422, "invalid_request")


@pytest.mark.parametrize("raw", [b'{"fn": "tests.support.jobs:noop", "args": [NaN]}',
                                 b'{"fn": "tests.support.jobs:noop", "args": [Infinity]}',
                                 b'{"fn": "tests.support.jobs:noop", "kwargs": {"x": -Infinity}}'])
def test_non_json_numbers_are_refused(api, raw):
    r = api.post("/v1/jobs", raw=raw)
    err = expect_error(r, r.status)
    assert (r.status, err["code"]) in ((400, "invalid_json"), (422, "invalid_request")), r


INVALID_SPECS = [
    ("fn", {"args": [1]}),
    ("fn", {"fn": None}),
    ("fn", {"fn": 5}),
    ("fn", {"fn": ["tests.support.jobs:add"]}),
    ("fn", {"fn": "tests.support.jobs.add"}),
    ("fn", {"fn": ""}),
    ("args", {"fn": "tests.support.jobs:add", "args": {"a": 1}}),
    ("args", {"fn": "tests.support.jobs:add", "args": "1, 2"}),
    ("args", {"fn": "tests.support.jobs:add", "args": 3}),
    ("kwargs", {"fn": "tests.support.jobs:echo", "kwargs": [1]}),
    ("kwargs", {"fn": "tests.support.jobs:echo", "kwargs": "k=1"}),
    ("kwargs", {"fn": "tests.support.jobs:echo", "kwargs": 5}),
    ("timeout", {"fn": "tests.support.jobs:add", "timeout": 0}),
    ("timeout", {"fn": "tests.support.jobs:add", "timeout": -1}),
    ("timeout", {"fn": "tests.support.jobs:add", "timeout": "x"}),
    ("timeout", {"fn": "tests.support.jobs:add", "timeout": 3600.5}),
    ("timeout", {"fn": "tests.support.jobs:add", "timeout": 1e9}),
    ("timeout", {"fn": "tests.support.jobs:add", "timeout": True}),
    ("timeout", {"fn": "tests.support.jobs:add", "timeout": [1]}),
    ("priority", {"fn": "tests.support.jobs:add", "priority": 1001}),
    ("priority", {"fn": "tests.support.jobs:add", "priority": -1001}),
    ("priority", {"fn": "tests.support.jobs:add", "priority": 1.5}),
    ("priority", {"fn": "tests.support.jobs:add", "priority": True}),
    ("priority", {"fn": "tests.support.jobs:add", "priority": "high"}),
    ("retries", {"fn": "tests.support.jobs:add", "retries": -1}),
    ("retries", {"fn": "tests.support.jobs:add", "retries": 101}),
    ("retries", {"fn": "tests.support.jobs:add", "retries": 2.5}),
    ("retries", {"fn": "tests.support.jobs:add", "retries": False}),
    ("key", {"fn": "tests.support.jobs:add", "key": ""}),
    ("key", {"fn": "tests.support.jobs:add", "key": "k" * 201}),
    ("key", {"fn": "tests.support.jobs:add", "key": 5}),
    ("key", {"fn": "tests.support.jobs:add", "key": ["k"]}),
    # only timeout and key may be null
    ("args", {"fn": "tests.support.jobs:add", "args": None}),
    ("kwargs", {"fn": "tests.support.jobs:echo", "kwargs": None}),
    ("priority", {"fn": "tests.support.jobs:add", "priority": None}),
    ("retries", {"fn": "tests.support.jobs:add", "retries": None}),
    ("bogus_field", {"fn": "tests.support.jobs:add", "args": [1, 2], "bogus_field": 1}),
]


@pytest.mark.parametrize(("field", "body"), INVALID_SPECS,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID_SPECS)])
def test_invalid_spec_names_the_field(api, field, body):
    n = count(api)
    err = expect_error(api.post("/v1/jobs", body), 422, "invalid_request")
    assert field in err["message"], err
    assert count(api) == n


VALID_SPECS = [
    {"priority": 1000}, {"priority": -1000}, {"retries": 100}, {"retries": 0},
    {"timeout": 3600}, {"timeout": 3600.0}, {"timeout": 0.5}, {"timeout": None},
    {"key": "k"}, {"key": "k" * 200}, {"key": None}, {"kwargs": {}}, {"args": []},
]


@pytest.mark.parametrize("extra", VALID_SPECS, ids=[str(e) for e in VALID_SPECS])
def test_boundary_values_are_accepted(api, extra):
    body = {"fn": "tests.support.jobs:noop", **extra}
    if isinstance(body.get("key"), str) and len(body["key"]) > 8:
        body["key"] = body["key"][:-8] + uuid.uuid4().hex[:8]  # same length, unused so far
    r = api.post("/v1/jobs", body)
    assert r.status == 202, r
    for k, v in body.items():
        if v is not None:
            assert r.json[k] == v, (k, r.json)
    assert r.json["timeout"] == (extra["timeout"] if extra.get("timeout") else 300.0)
    assert api.wait_done(r.json["id"])["state"] in ("succeeded", "timed_out")


@pytest.mark.parametrize("fn", [
    "os:system", "subprocess:run", "builtins:eval", "tests.support.daemon:free_port", "tests.jobsx:add",
    "tests:jobs", "service.cli.main:main", "service.demo.sub:fib", "no_such_module_zz:f",
    # wildcards admit the module's own public functions only
    "tests.support.jobs:os.system", "tests.support.jobs:subprocess", "tests.support.jobs:progress",
    "tests.support.jobs:_write_pid",
])
def test_function_not_allowed(api, tmp_path, fn):
    n = count(api)
    r = api.post("/v1/jobs", {"fn": fn, "args": [f"touch {tmp_path / 'pwned'}"]})
    assert r.status in (403, 422), r  # a malformed name may be refused as invalid
    expect_error(r, r.status, "function_not_allowed" if r.status == 403 else None)
    assert count(api) == n
    assert not (tmp_path / "pwned").exists()


def test_allow_list_with_exact_names(daemon_factory):
    d = daemon_factory(cfg={"jobs": {"allow": ["tests.support.jobs:add", "service.demo:*"]}}).start()
    assert d.run("tests.support.jobs:add", 2, 3)["result"] == 5
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:echo", "args": [1]}), 403,
                 "function_not_allowed")
    assert d.run("service.demo:fib", 10)["result"] == 55


@pytest.mark.parametrize(("fn", "named"), [
    ("tests.support.jobs:no_such_function", "no_such_function"),
    ("service.demo:no_such_demo", "no_such_demo"),
    ("tests.no_such_module:f", "tests.no_such_module"),
])
def test_function_not_found(api, fn, named):
    n = count(api)
    err = expect_error(api.post("/v1/jobs", {"fn": fn}), 422, "function_not_found")
    assert named in err["message"], err
    assert count(api) == n


def test_error_bodies_are_json_everywhere(api):
    for r in (api.get("/v1/jobs/nope"), api.post("/v1/jobs", raw=b"{"), api.get("/nothing/here"),
              api.request("PUT", "/v1/jobs", {"fn": "x"}), api.post("/v1/jobs", {"fn": "os:system"}),
              api.get("/v1/jobs?limit=0")):
        expect_error(r, r.status)
        assert 400 <= r.status < 500, r


# -- how jobs end


@pytest.mark.parametrize(("fn", "args", "etype", "exception", "text"), [
    ("tests.support.jobs:boom", [], "exception", "ValueError", "boom from tests"),
    ("tests.support.jobs:boom", ["ünïcödé ✓"], "exception", "ValueError", "ünïcödé ✓"),
    ("tests.support.jobs:custom_error", [], "exception", "CustomError", "custom failure"),
    ("tests.support.jobs:raise_unpicklable", [], "exception", "UnpicklableError", "cannot pickle me"),
    ("tests.support.jobs:add", [1], "exception", "TypeError", "b"),
    ("tests.support.jobs:unserializable", [], "unserializable_result", None, None),
    ("tests.support.jobs:nan", [], "unserializable_result", None, None),
    ("tests.support.jobs:a_set", [], "unserializable_result", None, None),
    ("tests.support.jobs:a_bytes", [], "unserializable_result", None, None),
    ("tests.support.jobs:generator", [], "unserializable_result", None, None),
])
def test_failed_jobs(api, fn, args, etype, exception, text):
    j = api.run(fn, *args)
    assert j["state"] == "failed" and j["result"] is None, j
    e = j["error"]
    assert set(e) >= {"type", "message", "exception", "traceback"}, e
    assert e["type"] == etype and isinstance(e["message"], str), e
    if exception:
        assert e["exception"] == exception, e
        assert text in e["message"], e
        assert "Traceback" in e["traceback"] and exception in e["traceback"], e
        assert fn.split(":")[1] in e["traceback"], e  # the job's own frame is in it
    assert j["attempts"] == 1 and j["worker"]["name"] in WORKER_NAMES, j
    assert api.run("tests.support.jobs:add", 2, 2)["result"] == 4


@pytest.mark.parametrize(("fn", "args", "named"), [
    ("tests.support.jobs:suicide", [], r"SIGKILL|\b9\b"),
    ("tests.support.jobs:hard_exit", [37], r"\b37\b"),
    ("tests.support.jobs:segfault", [], r"SIGSEGV|\b11\b"),
])
def test_worker_death(api, fn, args, named):
    other = api.submit("tests.support.jobs:sleep", 1.5)["id"]
    j = api.run(fn, *args)
    assert j["state"] == "failed" and j["error"]["type"] == "worker_died", j
    assert re.search(named, j["error"]["message"]), j["error"]
    assert gone(j["worker"]["pid"]), j
    j_other = api.wait_done(other)
    assert j_other["state"] == "succeeded" and j_other["attempts"] == 1, j_other
    assert wait_for(lambda: len(api.live_workers()) == 2, 15), api.workers()
    assert {w["name"] for w in api.workers()} == WORKER_NAMES
    assert api.run("tests.support.jobs:add", 2, 2)["result"] == 4


def test_timeout_kills_the_job_and_its_children(api, tmp_path):
    pidfile = tmp_path / "child.pid"
    j = api.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=1)
    child = read_pid(pidfile)
    j = api.wait_done(j["id"], 20)
    assert j["state"] == "timed_out" and j["error"]["type"] == "timeout", j
    assert isinstance(j["error"]["message"], str) and j["result"] is None
    # killed within a second of its deadline (generous bound on the daemon's own clock)
    assert ts(j["finished_at"]) - ts(j["started_at"]) < 1 + 4, j
    assert wait_for(lambda: gone(child) and gone(j["worker"]["pid"]), 5), proc_args(child)
    assert wait_for(lambda: len(api.live_workers()) == 2, 15), api.workers()


def test_cancel_as_the_job_ends_never_wedges_the_pool(daemon):
    """A cancel that lands as the job returns: either answer is fine, the pool must live on."""
    for i in range(40):
        jid = daemon.submit("tests.support.jobs:sleep", 0.001 * (i % 20))["id"]
        wait_for(lambda jid=jid: daemon.job(jid)["state"] != "queued", 5, step=0.001)
        r = daemon.delete(f"/v1/jobs/{jid}")
        assert (r.status, r.code) in ((200, None), (409, "already_finished")), r
        assert wait_for(lambda: daemon.settled(2), 10), (i, daemon.workers())
        assert daemon.run("tests.support.jobs:add", i, 1, wait_timeout=10)["result"] == i + 1


def test_tiny_timeouts_never_wedge_the_pool(daemon_factory):
    """A deadline that falls as the job ends: either outcome is fine, the pool must live on."""
    d = daemon_factory().start()
    for timeout in (0.001, 0.005, 0.01, 0.02, 0.05):
        j = d.run("tests.support.jobs:noop", 1, timeout=timeout, wait_timeout=20)
        assert j["state"] in ("succeeded", "timed_out"), j
        assert wait_for(lambda: d.settled(2), 15), (timeout, d.workers(), d.logtext(3000))
        ids = [d.submit("tests.support.jobs:add", k, 1)["id"] for k in range(4)]
        assert [d.wait_done(jid, 20)["result"] for jid in ids] == [1, 2, 3, 4]


@pytest.mark.parametrize(("fn", "args", "retries", "state", "etype", "attempts"), [
    ("tests.support.jobs:flaky", ["{counter}", 2], 2, "succeeded", None, 3),
    ("tests.support.jobs:flaky", ["{counter}", 2], 1, "failed", "exception", 2),
    ("tests.support.jobs:die_once", ["{counter}"], 1, "succeeded", None, 2),
    ("tests.support.jobs:suicide", [], 1, "failed", "worker_died", 2),
    ("tests.support.jobs:forever", [], 1, "timed_out", "timeout", 2),
    ("tests.support.jobs:boom", [], 0, "failed", "exception", 1),
])
def test_retries(api, tmp_path, fn, args, retries, state, etype, attempts):
    args = [str(tmp_path / "counter") if a == "{counter}" else a for a in args]
    j = api.run(fn, *args, retries=retries, timeout=1 if fn.endswith("forever") else None)
    assert j["state"] == state and j["attempts"] == attempts and j["retries"] == retries, j
    if etype:
        assert j["error"]["type"] == etype, j
    else:
        assert j["error"] is None and j["result"] == attempts, j


@pytest.mark.parametrize("how", ["get", "wait"])
def test_a_long_poll_outlasts_the_retries(api, tmp_path, how):
    """?wait and POST /v1/jobs/wait answer once the job is finished, not when an attempt fails."""
    jid = api.submit("tests.support.jobs:flaky", str(tmp_path / "counter"), 2, retries=2)["id"]
    if how == "get":
        r = api.get(f"/v1/jobs/{jid}?wait=30")
        job = r.json
    else:
        r = api.post("/v1/jobs/wait", {"ids": [jid], "timeout": 30})
        [job] = r.json["jobs"]
    assert r.status == 200 and job["state"] == "succeeded" and job["attempts"] == 3, job


def test_error_types_are_the_contracts(api):
    for fn in ("tests.support.jobs:boom", "tests.support.jobs:nan", "tests.support.jobs:suicide"):
        assert api.run(fn)["error"]["type"] in ERROR_TYPES


def test_progress_reaches_the_job(api):
    jid = api.submit("tests.support.jobs:report", 5, 0.3)["id"]
    seen = []
    end = time.monotonic() + 20
    while time.monotonic() < end:
        j = api.job(jid)
        if j["progress"]:
            seen.append(j["progress"])
        if j["state"] in TERMINAL:
            break
        time.sleep(0.1)
    assert j["state"] == "succeeded", j
    assert any(1 <= p["current"] < 5 and p["total"] == 5 for p in seen), seen
    assert j["progress"] == {"current": 5, "total": 5, "message": "step 5"}, j
    assert [p["current"] for p in seen] == sorted(p["current"] for p in seen)  # never backwards
    j = api.run("tests.support.jobs:report_bare", 3)
    assert j["progress"] == {"current": 3, "total": None, "message": None}, j


def test_priority_then_submission_order(daemon_factory):
    d = single(daemon_factory)
    blocker = block(d)
    order = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -3), ("f", 1000), ("g", -1000), ("h", 5)]
    ids = {name: d.submit("tests.support.jobs:noop", name, priority=p)["id"] for name, p in order}
    assert d.job(blocker)["state"] == "running"
    assert d.delete(f"/v1/jobs/{blocker}").status == 200
    done = {name: d.wait_done(jid) for name, jid in ids.items()}
    ran = sorted(done, key=lambda name: ts(done[name]["started_at"]))
    assert ran == ["f", "b", "d", "h", "a", "c", "e", "g"], ran


# -- /health, /metrics, /openapi.json, /v1/workers, processes


def test_health(api):
    r = api.get("/health")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json"), r
    assert r.json["status"] == "ok", r


_SAMPLE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?[ \t]+(\S+)([ \t]+-?\d+)?")


def test_metrics_are_prometheus_text(api):
    api.run("tests.support.jobs:add", 1, 1)
    r = api.get("/metrics")
    assert r.status == 200, r
    assert r.headers["Content-Type"].startswith("text/plain"), r.headers
    text = r.raw.decode()
    assert "# TYPE " in text
    samples = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert samples, text[:500]
    for ln in samples:
        m = _SAMPLE.fullmatch(ln.strip())
        assert m, ln
        float(m.group(2).replace("+Inf", "inf").replace("-Inf", "-inf"))
    for ln in text.splitlines():
        if ln.startswith("# TYPE "):
            assert ln.split()[3] in ("counter", "gauge", "histogram", "summary", "untyped", "info",
                                     "stateset", "gaugehistogram", "unknown"), ln


def test_openapi_document(api):
    r = api.get("/openapi.json")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json"), r
    doc = r.json
    assert re.fullmatch(r"3\.\d+\.\d+", doc["openapi"]), doc.get("openapi")
    assert doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]
    item = [p for p in paths if re.fullmatch(r"/v1/jobs/\{[^}/]+\}", p)]
    assert len(item) == 1, list(paths)
    want = {"/v1/jobs": {"get", "post"}, "/v1/jobs/batch": {"post"}, item[0]: {"get", "delete"},
            "/v1/workers": {"get"}, "/health": {"get"}}
    for path, methods in want.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))


def test_workers(api):
    ws = api.workers()
    assert len(ws) == 2
    assert {w["name"] for w in ws} == WORKER_NAMES
    assert len({w["pid"] for w in ws}) == 2
    for w in ws:
        assert set(WORKER_FIELDS) <= set(w), w
        assert isinstance(w["pid"], int) and psutil.pid_exists(w["pid"]), w
        assert w["state"] == "idle" and w["job"] is None, w
        assert isinstance(w["rss_bytes"], int) and w["rss_bytes"] > 0, w
        assert isinstance(w["tasks_done"], int) and w["tasks_done"] >= 0, w
        assert TS_RE.fullmatch(w["started_at"]), w
    done_before = sum(w["tasks_done"] for w in ws)
    api.run("tests.support.jobs:add", 1, 1)
    assert wait_for(lambda: sum(w["tasks_done"] for w in api.workers()) == done_before + 1, 5), api.workers()
    jid = block(api)
    pid = api.job(jid)["worker"]["pid"]
    busy = [w for w in api.workers() if w["state"] == "busy"]
    assert len(busy) == 1 and busy[0]["job"] == jid and busy[0]["pid"] == pid, api.workers()


def test_process_titles(api, tmp_path):
    assert proc_args(api.proc.pid) == "poold: main"
    for w in api.workers():
        assert proc_args(w["pid"]) == w["name"], w
    # a job's own children keep their names
    pidfile = tmp_path / "child.pid"
    jid = api.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=60)["id"]
    api.wait_state(jid, "running")
    child = read_pid(pidfile)
    assert proc_args(child) == "sleep 300", (proc_args(child), api.logtext(2000))
    assert api.delete(f"/v1/jobs/{jid}").status == 200


def test_a_running_jobs_children_are_left_alone(api, tmp_path):
    """Only what a job leaves running *when it returns* is a leftover."""
    pidfile = tmp_path / "child.pid"
    jid = api.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=60)["id"]
    api.wait_state(jid, "running")
    child = read_pid(pidfile)
    time.sleep(3 * (0.5 + 1.0))  # several supervisor scans (interval + kill_grace)
    assert api.job(jid)["state"] == "running"
    assert not gone(child), "the supervisor ended a child of a job that still runs:\n" + api.logtext(2000)
    assert api.delete(f"/v1/jobs/{jid}").status == 200
    assert wait_for(lambda: gone(child), 5)


def test_two_jobs_run_in_parallel_on_two_workers(api):
    a = api.submit("tests.support.jobs:spin", 1.5)["id"]
    b = api.submit("tests.support.jobs:spin", 1.5)["id"]
    ja, jb = api.wait_done(a), api.wait_done(b)
    assert ja["state"] == jb["state"] == "succeeded", (ja, jb)
    assert ja["worker"]["pid"] != jb["worker"]["pid"]
    overlap = (min(ts(ja["finished_at"]), ts(jb["finished_at"]))
               - max(ts(ja["started_at"]), ts(jb["started_at"])))
    assert overlap > 0.5, (overlap, ja, jb)


def test_demo_jobs(api):
    assert api.run("service.demo:fib", 20)["result"] == 6765
    assert api.run("service.demo:primes", 30)["result"] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert api.run("service.demo:sleep", 0.2)["result"] == 0.2
    assert isinstance(api.run("service.demo:spin", 0.1)["result"], int)


def test_jobs_run_with_the_daemons_environment(api):
    from tests.support.daemon import SWEEP_VAR

    assert api.run("tests.support.jobs:env", SWEEP_VAR)["result"] == api.tag


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/jobs?fn=x"), ("GET", "/v1/jobs?bogus=1"), ("GET", "/v1/jobs?state=queued&stat=failed"),
    ("GET", "/v1/jobs/nope?wait=0&later=1"), ("DELETE", "/v1/jobs/nope?force=1"),
    ("GET", "/v1/workers?x=1"), ("GET", "/health?verbose=1"), ("POST", "/v1/jobs?dry_run=1"),
])
def test_an_unknown_query_parameter_is_named(api, method, path):
    name = path.rsplit("&", 1)[-1].split("?")[-1].split("=")[0]
    r = api.request(method, path, {"fn": "tests.support.jobs:noop"} if method == "POST" else None)
    err = expect_error(r, 422, "invalid_request")
    assert name in err["message"], err


def test_wait_for_many_names_an_unknown_id_and_takes_1_to_1000(api):
    jid = api.submit("tests.support.jobs:noop")["id"]
    err = expect_error(api.post("/v1/jobs/wait", {"ids": [jid, "no-such-job"], "timeout": 1}), 404,
                       "not_found")
    assert "no-such-job" in err["message"], err
    for ids in ([], [jid] * 1001):
        err = expect_error(api.post("/v1/jobs/wait", {"ids": ids}), 422, "invalid_request")
        assert "ids" in err["message"], err
    err = expect_error(api.post("/v1/jobs/wait", {"ids": [jid], "tiemout": 1}), 422, "invalid_request")
    assert "tiemout" in err["message"], err
    assert api.post("/v1/jobs/wait", {"ids": [jid] * 1000, "timeout": 10}).json["jobs"][0]["id"] == jid


def test_a_cancelled_job_keeps_its_last_progress(api):
    jid = api.submit("tests.support.jobs:report", 1000, 0.05)["id"]
    assert wait_for(lambda: (api.job(jid)["progress"] or {}).get("current", 0) >= 2, 20), api.job(jid)
    assert api.request("DELETE", f"/v1/jobs/{jid}").status == 200
    job = api.wait_done(jid, 20)
    assert job["state"] == "cancelled" and job["progress"]["current"] >= 2, job

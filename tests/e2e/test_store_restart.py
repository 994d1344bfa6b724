"""Durability across restarts (real SIGKILL and SIGTERM), result expiry, and the store file.

A job accepted (202) is never lost: queued jobs survive a restart and then run; a job
that was running is retried when it has retries left and otherwise ends `failed` with
error type `interrupted`. Workers die with the daemon, even when it is SIGKILLed, and
the next start ends what a previous instance left behind.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.support.daemon import (
    Daemon,
    expect_error,
    gone,
    proc_args,
    read_pid,
    store_integrity,
    wait_for,
    write_config,
)

FAST = {"supervisor": {"interval": 0.5, "kill_grace": 1.0, "shutdown_grace": 0.5}}


def worker_pids(d: Daemon) -> set[int]:
    """The pids of the daemon's workers, once every listed worker is alive."""
    def all_alive() -> set[int] | None:
        listed = d.workers()
        alive = d.live_workers()
        return {w["pid"] for w in alive} if listed and len(alive) == len(listed) else None

    pids = wait_for(all_alive, 10)
    assert pids, d.workers()
    return pids


def session_pids(d: Daemon) -> set[int]:
    """Every process (but the daemon) in the current daemon's session: forkserver, workers, ..."""
    assert d.proc is not None
    out = set()
    for p in psutil.process_iter():
        try:
            if p.pid != d.proc.pid and os.getsid(p.pid) == d.proc.pid and not gone(p.pid):
                out.add(p.pid)
        except (OSError, psutil.Error):
            pass
    return out


def stop_by(d: Daemon, sig: int) -> None:
    """Stops the daemon with `sig`; checks what the contract promises for that signal."""
    pids = worker_pids(d) if sig == signal.SIGKILL else set()
    if sig == signal.SIGKILL:
        d.kill()
        # workers die with the daemon, even by SIGKILL
        assert wait_for(lambda: all(gone(p) for p in pids), 5), \
            {p: proc_args(p) for p in pids if not gone(p)}
    else:
        d.signal(sig)
        rc = d.wait_exit(30)
        assert rc == 0, (rc, d.logtext())
        # "exit 0 with no process left"
        assert wait_for(lambda: not d.leftovers(), 3), [proc_args(p.pid) for p in d.leftovers()]


def assert_store_ok(d: Daemon) -> None:
    assert not d.running()
    assert store_integrity(d.store) == "ok"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_restart_keeps_every_accepted_job(daemon_factory, tmp_path, sig):
    d = daemon_factory(cfg=FAST).start()
    finished = d.run("tests.support.jobs:add", 20, 22)
    keyed = d.run("tests.support.jobs:noop", "kept", key="kept-key")
    # both workers busy: one job without retries, one with a retry left
    no_retry = d.submit("tests.support.jobs:forever", timeout=120)["id"]
    with_retry = d.submit("tests.support.jobs:hang_once", str(tmp_path / "marker"), retries=1,
                          timeout=120)["id"]
    d.wait_state(no_retry, "running")
    d.wait_state(with_retry, "running")
    queued = [d.submit("tests.support.jobs:add", i, 100, priority=i)["id"] for i in range(3)]
    before = {jid: d.job(jid) for jid in queued}
    assert all(j["state"] == "queued" for j in before.values()), before

    stop_by(d, sig)
    d.start()

    j = d.wait_done(no_retry)
    assert j["state"] == "failed" and j["error"]["type"] == "interrupted", j
    assert isinstance(j["error"]["message"], str) and j["attempts"] == 1 and j["result"] is None, j
    j = d.wait_done(with_retry)
    assert j["state"] == "succeeded" and j["result"] == "second attempt" and j["attempts"] == 2, j
    for i, jid in enumerate(queued):
        j = d.wait_done(jid)
        assert j["state"] == "succeeded" and j["result"] == i + 100, j
        for k in ("fn", "args", "priority", "created_at", "retries", "timeout"):
            assert j[k] == before[jid][k], (k, j, before[jid])
    # what had finished is kept as it was, and its key still maps to it
    assert d.job(finished["id"]) == finished
    r = d.post("/v1/jobs", {"fn": "tests.support.jobs:noop", "args": ["again"], "key": "kept-key"})
    assert r.status == 200 and r.json["id"] == keyed["id"] and r.json["result"] == "kept", r
    d.close()
    assert_store_ok(d)


def test_a_burst_of_accepted_jobs_survives_sigkill(daemon_factory):
    d = daemon_factory(cfg={"pool": {"workers": 1}, **FAST}).start()
    block = d.submit("tests.support.jobs:forever", timeout=120, retries=1)["id"]
    d.wait_state(block, "running")
    r = d.post("/v1/jobs/batch",
               {"jobs": [{"fn": "tests.support.jobs:add", "args": [i, 1]} for i in range(30)]})
    assert r.status == 202, r
    ids = [j["id"] for j in r.json["jobs"]]
    ids += [d.submit("tests.support.jobs:add", i, 1)["id"] for i in range(30, 40)]
    d.kill()  # right after the last 202
    assert store_integrity(d.store) == "ok"  # consistent even with the daemon killed mid-write
    d.start()
    assert d.delete(f"/v1/jobs/{block}").status == 200  # retried after the restart: running again
    results = [d.wait_done(jid)["result"] for jid in ids]
    assert results == [i + 1 for i in range(40)]
    d.close()
    assert_store_ok(d)


def test_a_start_the_store_never_heard_of_counts_at_recovery(daemon_factory, tmp_path):
    """A worker notes each start in its slot's ledger ring before it reports it: a daemon SIGKILLed
    before it committed that start must not leave the job queued (it would run once more than
    1 + retries). The ring is written here as a worker of the killed daemon would have."""
    import sqlite3

    from service.engine import ledger

    d = daemon_factory(cfg={"pool": {"workers": 1}, **FAST}).start()
    block = d.submit("tests.support.jobs:forever", timeout=120)["id"]
    d.wait_state(block, "running")
    no_retry = d.submit("tests.support.jobs:touch", str(tmp_path / "a"))["id"]
    with_retry = d.submit("tests.support.jobs:touch", str(tmp_path / "b"), retries=1)["id"]
    untouched = d.submit("tests.support.jobs:add", 1, 2)["id"]
    d.kill()
    with sqlite3.connect(d.store) as db:
        seq = dict(db.execute("SELECT id, seq FROM jobs").fetchall())
    ring = ledger.Writer(ledger.path(str(d.store), 1))
    for jid in (no_retry, with_retry):
        ring.mark(seq[jid], 0, time.time())
    d.start()
    j = d.wait_done(no_retry)
    assert j["state"] == "failed" and j["error"]["type"] == "interrupted" and j["attempts"] == 1, j
    assert not (tmp_path / "a").exists()
    j = d.wait_done(with_retry)
    assert j["state"] == "succeeded" and j["attempts"] == 2, j
    assert d.wait_done(untouched)["result"] == 3
    assert seq[no_retry] not in ledger.read(str(d.store))  # recovery cleared the killed daemon's rings
    d.close()
    assert_store_ok(d)


def test_sigterm_drains(daemon_factory):
    d = daemon_factory(cfg={"pool": {"workers": 1}, "supervisor": {"shutdown_grace": 20.0}}).start()
    running = d.submit("tests.support.jobs:sleep", 4.0)["id"]
    d.wait_state(running, "running")
    queued = d.submit("tests.support.jobs:add", 1, 2)["id"]
    d.signal(signal.SIGTERM)

    def draining():
        r = d.get("/health", timeout=5)
        return r if r.status == 503 else None

    r = wait_for(draining, 3)
    assert r, "health stayed 200 after SIGTERM"
    assert r.json["status"] == "unhealthy" and isinstance(r.json["reasons"], list) and r.json["reasons"], r
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:noop"}), 503, "draining")
    expect_error(d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:noop"}]}), 503, "draining")
    # the running job may finish; the daemon then exits 0 with nothing left
    assert d.wait_exit(30) == 0, d.logtext()
    assert wait_for(lambda: not d.leftovers(), 3), [proc_args(p.pid) for p in d.leftovers()]
    assert_store_ok(d)
    d.start()
    j = d.job(running)
    assert j["state"] == "succeeded" and j["attempts"] == 1 and j["result"] == 4.0, j
    assert d.wait_done(queued)["result"] == 3
    d.close()
    assert_store_ok(d)


def test_sigterm_ends_overrunning_jobs_within_the_grace(daemon_factory):
    d = daemon_factory(cfg=FAST).start()
    jid = d.submit("tests.support.jobs:forever", timeout=120)["id"]
    pid = d.wait_state(jid, "running")["worker"]["pid"]
    t = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0, d.logtext()
    # shutdown_grace 0.5 + kill_grace 1.0: far less than the job's own timeout
    assert time.monotonic() - t < 15
    assert gone(pid)
    assert wait_for(lambda: not d.leftovers(), 3), [proc_args(p.pid) for p in d.leftovers()]
    d.start()
    j = d.job(jid)
    assert j["state"] == "failed" and j["error"]["type"] == "interrupted", j


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_daemon_exits_0(daemon_factory, sig):
    d = daemon_factory().start()
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2
    d.signal(sig)
    assert d.wait_exit(20) == 0, d.logtext()
    assert wait_for(lambda: not d.leftovers(), 3), [proc_args(p.pid) for p in d.leftovers()]
    assert_store_ok(d)


def test_workers_die_with_the_daemon_and_leftovers_end_on_restart(daemon_factory, tmp_path):
    d = daemon_factory(cfg=FAST).start()
    pidfile = tmp_path / "child.pid"
    jid = d.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=120)["id"]
    d.wait_state(jid, "running")
    child = read_pid(pidfile)
    workers = worker_pids(d)
    old_session = session_pids(d)
    assert workers <= old_session, (workers, old_session)
    d.kill()
    assert wait_for(lambda: all(gone(p) for p in workers), 5), \
        {p: proc_args(p) for p in workers if not gone(p)}
    # the next start ends what the previous instance left behind (the job's child included)
    d.start()
    assert wait_for(lambda: gone(child) and all(gone(p) for p in old_session), 10), \
        {p: proc_args(p) for p in {child, *old_session} if not gone(p)}
    j = d.wait_done(jid)
    assert j["state"] == "failed" and j["error"]["type"] == "interrupted", j
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2


def test_result_ttl(daemon_factory):
    d = daemon_factory(cfg={"jobs": {"result_ttl": 1.0}}).start()
    running = d.submit("tests.support.jobs:forever", timeout=120)["id"]
    r = d.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 2], "key": "ttl-key"})
    assert r.status == 202, r
    first = r.json["id"]
    assert d.wait_done(first)["result"] == 3
    failed = d.run("tests.support.jobs:boom")["id"]
    assert d.get(f"/v1/jobs/{first}").status == 200  # kept right after it finished
    assert wait_for(lambda: d.get(f"/v1/jobs/{first}").status == 404, 15), d.job(first)
    expect_error(d.get(f"/v1/jobs/{first}"), 404, "not_found")
    assert wait_for(lambda: d.get(f"/v1/jobs/{failed}").status == 404, 15), d.job(failed)
    listed = {j["id"] for j in d.jobs()}
    assert first not in listed and failed not in listed
    expect_error(d.delete(f"/v1/jobs/{first}"), 404, "not_found")
    # the TTL is for finished jobs only
    assert d.job(running)["state"] == "running"
    # the key belongs to no kept job any more
    r = d.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [2, 2], "key": "ttl-key"})
    assert r.status == 202 and r.json["id"] != first, r
    assert d.wait_done(r.json["id"])["result"] == 4
    # expiry holds across a restart
    d.kill()
    d.start()
    assert d.get(f"/v1/jobs/{first}").status == 404
    d.close()
    assert_store_ok(d)


def test_memory_store_keeps_nothing_but_runs(daemon_factory):
    d = daemon_factory(cfg={"store": {"path": ":memory:"}}).start()
    jid = d.run("tests.support.jobs:add", 1, 2)["id"]
    assert d.job(jid)["result"] == 3
    d.stop()
    d.start()
    expect_error(d.get(f"/v1/jobs/{jid}"), 404, "not_found")
    assert list(d.tmp.glob("*.db")) == []


def test_sighup_reloads_without_losing_or_failing_a_job(daemon_factory):
    d = daemon_factory(cfg={"pool": {"workers": 1}}).start()
    pid = d.proc.pid
    running = d.submit("tests.support.jobs:sleep", 1.5)["id"]
    d.wait_state(running, "running")
    queued = d.submit("tests.support.jobs:add", 2, 3)["id"]  # accepted under the old allow list
    d.cfg["pool"]["workers"] = 2
    d.cfg["jobs"]["allow"] = ["service.demo:*"]
    d.cfg["server"]["max_body_bytes"] = 2048
    write_config(d.config_path, d.cfg)
    d.signal(signal.SIGHUP)
    assert wait_for(lambda: len(d.live_workers()) == 2, 15), d.workers()
    assert wait_for(lambda: d.post("/v1/jobs", {"fn": "tests.support.jobs:noop"}).status == 403, 10)
    assert d.running() and d.proc.pid == pid
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 1]}), 403,
                 "function_not_allowed")
    big = {"fn": "service.demo:fib", "args": ["x" * 4000]}
    expect_error(d.post("/v1/jobs", big), 413, "payload_too_large")
    j = d.wait_done(running)
    assert j["state"] == "succeeded" and j["attempts"] == 1, j
    j = d.wait_done(queued)
    assert j["state"] == "succeeded" and j["result"] == 5, j
    assert d.run("service.demo:fib", 10)["result"] == 55
    assert d.get("/health").status == 200


def test_a_bad_reload_keeps_the_running_configuration(daemon_factory):
    d = daemon_factory().start()
    d.config_path.write_text("[pool\nworkers = 1\n")
    d.signal(signal.SIGHUP)
    time.sleep(1.0)
    assert d.running(), d.logtext()
    assert d.get("/health").status == 200
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2
    assert len(d.live_workers()) == 2

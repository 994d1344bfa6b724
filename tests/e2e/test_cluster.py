"""Several hosts on one PostgreSQL database: one queue, any host answers for any job, and no
job runs on two hosts at once, whatever happens to a host (SIGKILL, SIGSTOP) or the database.

Real daemons on a throwaway server (tests/support/postgres.py); each test has a schema of its
own. Runs are counted from the jobs' own records (tests.support.jobs:logged).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import postgres
from tests.support.daemon import Daemon, expect_error, gone, wait_for

FAST = {"heartbeat_interval": 0.5, "host_timeout": 2.0}


def pg_cfg(server: postgres.PgServer, schema: str, name: str, **cluster: Any) -> dict[str, dict[str, Any]]:
    return {"store": {"url": server.url(), "schema": schema},
            "cluster": {"name": name, **FAST, **cluster}}


@pytest.fixture
def hosts(pg_server: postgres.PgServer,
          daemon_factory: Callable[..., Daemon]) -> Callable[..., list[Daemon]]:
    """hosts(n, **cluster) -> n started daemons sharing one fresh schema, named h1..hn."""
    schema = postgres.fresh_schema()

    def make(n: int = 2, **cluster: Any) -> list[Daemon]:
        return [daemon_factory(cfg=pg_cfg(pg_server, schema, f"h{i + 1}", **cluster)).start()
                for i in range(n)]

    return make


def pid_of(d: Daemon) -> int:
    assert d.proc is not None
    return d.proc.pid


def runs(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    """job id -> its records in order: ("start" | "end", pid, time)."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            kind, jid, pid, t = line.split()
            out.setdefault(jid, []).append((kind, int(pid), float(t)))
    return out


def overlaps(records: list[tuple[str, int, float]]) -> bool:
    """Whether two runs of one job were ever under way at the same time (a run: from its start
    to its last record, by its pid; one process runs one attempt at a time)."""
    spans: dict[int, list[float]] = {}
    for _, pid, t in records:
        spans.setdefault(pid, [t, t])[1] = t
    ordered = sorted(spans.values())
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(ordered))


def test_hosts_share_one_queue_and_answer_for_every_job(hosts: Callable[..., list[Daemon]]) -> None:
    a, b = hosts(2)
    jobs = [a.submit("tests.support.jobs:sleep", 0.2) for _ in range(8)]
    done = [b.wait_done(j["id"]) for j in jobs]  # asked of the other host
    assert {j["state"] for j in done} == {"succeeded"}
    assert {j["worker"]["host"] for j in done} == {"h1", "h2"}  # both hosts took work
    listed = {j["id"] for j in b.jobs()}
    assert {j["id"] for j in jobs} <= listed
    r = b.post("/v1/jobs/wait", {"ids": [j["id"] for j in jobs], "timeout": 1, "all": True})
    assert r.status == 200 and len(r.json["jobs"]) == 8
    def listed() -> bool:  # as the hosts' heartbeats last reported them
        hs = a.get("/v1/hosts").json["hosts"]
        return [(h["name"], h["state"], h["workers"]) for h in hs] == [("h1", "alive", 2), ("h2", "alive", 2)]

    assert wait_for(listed, 5), a.get("/v1/hosts").json
    every = a.get("/v1/workers?all=true").json["workers"]
    assert sorted(w["host"] for w in every) == ["h1", "h1", "h2", "h2"]
    assert {w["host"] for w in a.workers()} == {"h1"}


def test_a_long_poll_on_one_host_ends_soon_after_the_job_ends_on_another(
        hosts: Callable[..., list[Daemon]]) -> None:
    a, b = hosts(2)
    blockers = [a.submit("tests.support.jobs:sleep", 3) for _ in range(2)]  # the job may run on b
    a.wait_state(blockers[0]["id"], "running")
    j = b.submit("tests.support.jobs:sleep", 0.5)
    t0 = time.monotonic()
    got = a.job(j["id"], wait=10)
    took = time.monotonic() - t0
    assert got["state"] == "succeeded", got
    end = got["finished_at"]
    assert end is not None and took < 0.5 + 1.5
    for x in blockers:
        a.delete(f"/v1/jobs/{x['id']}")


def test_a_cancel_on_one_host_kills_the_tree_on_the_host_running_it(
        hosts: Callable[..., list[Daemon]], tmp_path: Path) -> None:
    a, b = hosts(2)
    where = tmp_path / "pids"
    where.mkdir()
    j = a.submit("tests.support.jobs:spawn_tree", str(where))
    running = a.wait_state(j["id"], "running")
    runner = a if running["worker"]["host"] == "h1" else b
    other = b if runner is a else a
    names = ("child.pid", "grandchild.pid", "detached.pid")
    assert wait_for(lambda: all((where / n).exists() for n in names), 10)
    pids = [int((where / n).read_text()) for n in names]
    t0 = time.monotonic()
    r = other.delete(f"/v1/jobs/{j['id']}")
    assert r.status == 200 and r.json["state"] == "cancelled", r
    assert wait_for(lambda: all(gone(p) for p in pids), 5), "the job's processes outlived its cancel"
    assert time.monotonic() - t0 < 1.5
    assert runner.job(j["id"])["state"] == "cancelled"


def test_a_key_is_unique_across_the_cluster(hosts: Callable[..., list[Daemon]]) -> None:
    a, b = hosts(2)
    first = a.submit("tests.support.jobs:sleep", 0.1, key="one")
    again = b.submit("tests.support.jobs:sleep", 0.1, key="one", expect=(200,))
    assert again["id"] == first["id"]


def started_on(ds: list[Daemon], log: Path, jid: str) -> tuple[Daemon, Daemon]:
    """(the host running the job, the other one), once the job has begun."""
    wait_for(lambda: runs(log).get(jid), 10)
    host = ds[0].job(jid)["worker"]["host"]
    runner = ds[0] if host == "h1" else ds[1]
    return runner, ds[1] if runner is ds[0] else ds[0]


@pytest.mark.parametrize("retries", [1, 0])
def test_a_killed_hosts_jobs_are_rescued_by_the_others(hosts: Callable[..., list[Daemon]], tmp_path: Path,
                                                        retries: int) -> None:
    ds = hosts(2)
    log = tmp_path / "runs"
    j = ds[0].submit("tests.support.jobs:logged", str(log), 3.0, retries=retries)
    runner, other = started_on(ds, log, j["id"])
    os.kill(pid_of(runner), signal.SIGKILL)  # its workers die with it (the lifeline)
    t0 = time.monotonic()
    final = other.wait_done(j["id"], timeout=30)
    took = time.monotonic() - t0
    if retries:
        assert final["state"] == "succeeded" and final["attempts"] == 2
        assert final["worker"]["host"] != runner.cfg["cluster"]["name"]
    else:
        assert final["state"] == "failed" and final["error"]["type"] == "interrupted"
        assert took < FAST["host_timeout"] + FAST["heartbeat_interval"] + 2, took
    recs = runs(log)[j["id"]]
    assert not overlaps(recs) and [r[0] for r in recs].count("start") <= 1 + retries
    hs = {h["name"]: h["state"] for h in other.get("/v1/hosts").json["hosts"]}
    assert hs[runner.cfg["cluster"]["name"]] == "dead" and hs[other.cfg["cluster"]["name"]] == "alive"


def test_a_frozen_host_ends_its_own_job_before_another_takes_it(
        hosts: Callable[..., list[Daemon]], tmp_path: Path) -> None:
    ds = hosts(2)
    log = tmp_path / "runs"
    j = ds[0].submit("tests.support.jobs:logged", str(log), 6.0, retries=1)
    runner, other = started_on(ds, log, j["id"])
    os.kill(pid_of(runner), signal.SIGSTOP)  # the main process frozen; its workers run on
    try:
        final = other.wait_done(j["id"], timeout=30)
    finally:
        os.kill(pid_of(runner), signal.SIGCONT)
    assert final["state"] == "succeeded" and final["worker"]["host"] == other.cfg["cluster"]["name"], final
    recs = runs(log)[j["id"]]
    assert not overlaps(recs), recs  # the first run ended (killed) before the second began
    assert [r[0] for r in recs].count("start") == 2
    # the thawed host does not write over the job, and serves again once it has renewed
    time.sleep(1.5)
    assert other.job(j["id"]) == final
    assert runner.run("tests.support.jobs:sleep", 0.1)["state"] == "succeeded"


def test_a_host_restarted_under_its_name_takes_over_at_once(
        pg_server: postgres.PgServer, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    cfg = pg_cfg(pg_server, postgres.fresh_schema(), "solo", host_timeout=30.0, heartbeat_interval=1.0)
    d = daemon_factory(cfg=cfg).start()
    j = d.submit("tests.support.jobs:logged", str(tmp_path / "runs"), 2.0, retries=1)
    wait_for(lambda: runs(tmp_path / "runs").get(j["id"]), 10)
    pid = pid_of(d)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 5)
    t0 = time.monotonic()
    d.start()
    assert time.monotonic() - t0 < 15  # not host_timeout (30 s)
    final = d.wait_done(j["id"])
    assert final["state"] == "succeeded" and final["attempts"] == 2


def test_the_database_down_and_back(pg_server: postgres.PgServer,
                                    daemon_factory: Callable[..., Daemon]) -> None:
    server = postgres.PgServer()  # a server of its own: it is stopped and started
    try:
        server.start()
        # host_timeout 10 s: a 2.5 s outage is short of the lease, so the job runs on
        d = daemon_factory(cfg=pg_cfg(server, "poold", "h1", heartbeat_interval=1.0,
                                      host_timeout=10.0)).start()
        running = d.submit("tests.support.jobs:sleep", 2.0)
        d.wait_state(running["id"], "running")
        server.stop()
        r = d.post("/v1/jobs", {"fn": "tests.support.jobs:sleep", "args": [0.1]})
        expect_error(r, 503, "store_unavailable")
        h = d.get("/health")
        assert h.status == 503 and any("store" in x for x in h.json["reasons"]), h.json
        assert "poold@" not in str(h.json) or "***" in str(h.json)
        time.sleep(2.5)  # the running job ends while the database is down
        server.start()
        assert wait_for(lambda: d.get("/health").status == 200, 15), d.get("/health").json
        assert d.wait_done(running["id"])["state"] == "succeeded"  # its end was kept and written
        assert d.run("tests.support.jobs:sleep", 0.1)["state"] == "succeeded"
        assert d.running()
    finally:
        server.remove()


@pytest.mark.parametrize(("env", "key"), [
    ({"POOLD_STORE_URL": "mysql://u:s3cret@h/db"}, "store.url"),
    ({"POOLD_STORE_URL": "postgresql://u:s3cret@h/db", "POOLD_CLUSTER_HOST_TIMEOUT": "1"},
     "cluster.host_timeout"),
    ({"POOLD_STORE_SCHEMA": "Not-A-Name"}, "store.schema"),
])
def test_cluster_config_errors_name_the_key(daemon_factory: Callable[..., Daemon], env: dict[str, str],
                                            key: str) -> None:
    import subprocess
    import sys

    d = daemon_factory()
    r = subprocess.run([sys.executable, "-m", "service", "check-config", str(d.config_path)],
                       env={**d.env, **env}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and key in r.stderr, r.stderr
    assert "s3cret" not in r.stderr + r.stdout

"""Supervision: timeouts, crashes, retries, recycling, leftovers, daemon death, titles.

What the contract's "Process guarantees" promise, witnessed with real processes
(psutil and ps): a job past its timeout is SIGKILLed with every process it
started; a crash fails only its own job, gets a gunicorn-style log line and a
fresh worker in the same slot; what a job leaves behind is ended within
`supervisor.interval + supervisor.kill_grace`; workers (and everything of the
daemon's) die with the daemon, even by SIGKILL; the next start ends what a
previous instance left, and nothing else.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.daemon import Daemon, gone, proc_args, read_pid, ts, wait_for
from tests.support.supervision import ended, when_ended

pytestmark = pytest.mark.stores("sqlite", "postgres")

# the contract's defaults: a timed-out job is SIGKILLed at once, whatever the orphan sweep's pace
DEFAULT_SUPERVISOR = {"supervisor": {"interval": 1.0, "kill_grace": 3.0, "shutdown_grace": 5.0}}
TOLERANCE = 1.5  # "within one second of the deadline", with room for a loaded test host
TREE = ("child", "grandchild", "detached")  # what tests.support.jobs:spawn_tree starts


# -- helpers


def ps_args(pid: int) -> str:
    """What `ps -o args` shows for pid ("" when it is gone)."""
    out = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    return out.stdout.strip()


def proc(pid: int) -> psutil.Process | None:
    """A handle on pid that stays true to that process (psutil checks pid reuse by create time);
    None when it has already ended."""
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def alive(procs: dict[str, psutil.Process | None]) -> dict[str, str]:
    """The processes still running, with what ps shows for them."""
    return {k: f"{p.pid} {proc_args(p.pid)!r}" for k, p in procs.items() if p is not None and not ended(p)}


def tree_pids(pid_dir: Path) -> dict[str, psutil.Process | None]:
    return {k: proc(read_pid(pid_dir / f"{k}.pid")) for k in TREE}


def helpers(d: Daemon) -> dict[str, psutil.Process | None]:
    """The daemon's multiprocessing helpers: the forkserver and the resource tracker."""
    assert d.proc is not None
    out: dict[str, psutil.Process | None] = {}
    for p in psutil.Process(d.proc.pid).children():
        args = proc_args(p.pid)
        if "multiprocessing.forkserver" in args:
            out["forkserver"] = p
        elif "multiprocessing.resource_tracker" in args:
            out["resource tracker"] = p
    return out


def fresh_worker(d: Daemon, name: str, old_pid: int) -> dict[str, Any]:
    """Waits for the slot `name` to have a live worker other than old_pid; returns it."""
    def ready() -> dict[str, Any] | None:
        for w in d.workers():
            if w["name"] == name and w["pid"] not in (None, old_pid) and w["state"] != "starting" \
                    and not gone(w["pid"]):
                return w
        return None

    w = wait_for(ready, 20)
    assert w, (f"no live worker but pid {old_pid} ({'dead' if gone(old_pid) else 'alive'}) in slot {name!r}"
               f" after 20 s: {d.workers()}")
    assert ps_args(w["pid"]) == name, (w, ps_args(w["pid"]))
    return w


def slot_number(name: str) -> int:
    m = re.fullmatch(r"poold: worker (\d+)", name)
    assert m, name
    return int(m.group(1))


def restarts(d: Daemon) -> dict[str, float]:
    """poold_worker_restarts by cause, from /metrics."""
    r = d.get("/metrics")
    assert r.status == 200, r
    found = re.findall(r'^poold_worker_restarts(?:_total)?\{cause="([^"]+)"\} (\S+)$',
                       r.raw.decode(), re.M)
    return {cause: float(v) for cause, v in found}


def kill_all(procs: dict[str, psutil.Process | None]) -> None:
    """SIGKILLs what still runs of procs (cleanup after a failed check)."""
    for p in procs.values():
        if p is not None and not ended(p):
            try:
                p.kill()
            except psutil.Error:
                pass


def worker_processes(d: Daemon) -> dict[str, psutil.Process | None]:
    """The daemon's workers, once every listed one is alive and past its start."""
    def ready() -> list[dict[str, Any]] | None:
        listed, live = d.workers(), d.live_workers()
        return live if listed and len(live) == len(listed) and all(
            w["state"] != "starting" for w in live) else None

    ws = wait_for(ready, 15)
    assert ws, d.workers()
    return {w["name"]: proc(w["pid"]) for w in ws}


# -- timeouts


@pytest.mark.parametrize(("ignore_term", "busy"), [
    pytest.param(False, False, id="sleeping"),
    pytest.param(False, True, id="pure-python-busy-loop"),
    pytest.param(True, False, id="sigterm-ignoring-processes"),
])
def test_timeout_kills_the_job_and_every_process_it_started(daemon_factory, tmp_path, ignore_term, busy):
    timeout = 2.0
    d = daemon_factory(cfg=DEFAULT_SUPERVISOR).start()
    other = d.submit("tests.support.jobs:sleep", timeout + 4)["id"]
    other_worker = d.wait_state(other, "running")["worker"]
    jid = d.submit("tests.support.jobs:spawn_tree", str(tmp_path), ignore_term, busy, timeout=timeout)["id"]
    procs = tree_pids(tmp_path)
    running = d.wait_state(jid, "running")
    worker = running["worker"]
    assert worker["pid"] != other_worker["pid"], (worker, other_worker)
    procs["worker"] = proc(worker["pid"])
    deadline = ts(running["started_at"]) + timeout

    seen = when_ended(procs, timeout + 15)
    late = {k: round(t - deadline, 2) for k, t in seen.items()}
    assert set(seen) == set(procs), f"still running long after the deadline: {alive(procs)}"
    assert max(late.values()) <= TOLERANCE, f"seconds past the deadline when each ended: {late}"

    j = d.wait_done(jid)
    assert j["state"] == "timed_out" and j["error"]["type"] == "timeout", j
    assert j["result"] is None and j["attempts"] == 1 and j["worker"] == worker, j
    took = ts(j["finished_at"]) - ts(j["started_at"])
    assert timeout - 0.05 <= took <= timeout + TOLERANCE, (took, j)
    # the other running job is untouched, on its own worker, and succeeds
    o = d.job(other)
    assert o["state"] == "running" and o["worker"] == other_worker and not gone(other_worker["pid"]), o
    # the slot gets a fresh worker: new pid, same name
    fresh_worker(d, worker["name"], worker["pid"])
    o = d.wait_done(other)
    assert o["state"] == "succeeded" and o["attempts"] == 1 and o["worker"] == other_worker, o
    assert d.run("tests.support.jobs:add", 1, 2)["result"] == 3


# -- crashes


@pytest.mark.parametrize(("fn", "args", "kill_from_outside", "named"), [
    pytest.param("tests.support.jobs:spawn_and_hang", ["{pidfile}"], True, r"SIGKILL",
                 id="sigkill-from-outside"),
    pytest.param("tests.support.jobs:hard_exit", [3], False, r"code 3\b", id="os-exit-3"),
    pytest.param("tests.support.jobs:segfault", [], False, r"SIGSEGV", id="segfault"),
    pytest.param("tests.support.jobs:big_mem_and_hang", [300], True, r"SIGKILL",
                 id="big-memory-then-sigkill"),
])
def test_a_crash_fails_only_its_own_job(daemon, tmp_path, fn, args, kill_from_outside, named):
    pidfile = tmp_path / "child.pid"
    has_child = "{pidfile}" in args
    args = [str(pidfile) if a == "{pidfile}" else a for a in args]
    other = daemon.submit("tests.support.jobs:sleep", 4)["id"]
    other_worker = daemon.wait_state(other, "running")["worker"]
    jid = daemon.submit(fn, *args, timeout=120)["id"]
    children = {"job's child": proc(read_pid(pidfile))} if has_child else {}
    if kill_from_outside:
        w = psutil.Process(daemon.wait_state(jid, "running")["worker"]["pid"])
        if fn.endswith("big_mem_and_hang"):  # the memory is really held (as when the OOM killer strikes)
            assert wait_for(lambda: w.memory_info().rss > args[0] * 0.9 * 2**20, 20), w.memory_info()
        w.kill()
    j = daemon.wait_done(jid)
    assert j["state"] == "failed" and j["attempts"] == 1 and j["result"] is None, j
    assert j["error"]["type"] == "worker_died" and re.search(named, j["error"]["message"]), j["error"]
    dead = j["worker"]
    assert dead["pid"] != other_worker["pid"] and gone(dead["pid"]), (dead, other_worker)
    # what the job had started is a leftover: ended within interval + kill_grace
    sup = daemon.cfg["supervisor"]
    when_ended(children, sup["interval"] + sup["kill_grace"] + 1.0)
    assert not alive(children), alive(children)
    # a gunicorn-style line: which worker, which pid, how it ended
    line = rf"worker {slot_number(dead['name'])}\b[^\n]*\b{dead['pid']}\b[^\n]*{named}"
    assert wait_for(lambda: re.search(line, daemon.logtext(100_000), re.I), 5), daemon.logtext()
    # the job running beside it is not disturbed
    o = daemon.wait_done(other)
    assert o["state"] == "succeeded" and o["attempts"] == 1 and o["worker"] == other_worker, o
    # the slot gets a fresh worker and the pool keeps serving
    fresh_worker(daemon, dead["name"], dead["pid"])
    assert [daemon.run("tests.support.jobs:add", i, 1)["result"] for i in range(4)] == [1, 2, 3, 4]


def test_the_exit_status_is_named_every_time(daemon):
    # many deaths in a row, each with its own status: the one reported must be the worker's own
    codes = range(3, 123)
    r = daemon.post("/v1/jobs/batch",
                    {"jobs": [{"fn": "tests.support.jobs:hard_exit", "args": [c]} for c in codes]})
    assert r.status == 202, r
    wrong = []
    for code, job in zip(codes, r.json["jobs"], strict=True):
        j = daemon.wait_done(job["id"], 60)
        assert j["state"] == "failed" and j["error"]["type"] == "worker_died", j
        if not re.search(rf"\bcode {code}\b", j["error"]["message"]):
            wrong.append((code, j["error"]["message"]))
    assert not wrong, f"{len(wrong)} of {len(codes)} deaths misreported: {wrong}"
    assert wait_for(lambda: daemon.settled(2), 15), daemon.workers()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_idle_worker_killed_from_outside_is_replaced(daemon_factory, workers):
    d = daemon_factory(cfg={"pool": {"workers": workers}}).start()
    victims = worker_processes(d)
    for p in victims.values():
        assert p is not None
        p.kill()  # as the OOM killer might, between two jobs
    for name, p in victims.items():
        assert p is not None
        fresh_worker(d, name, p.pid)
    jobs = [d.submit("tests.support.jobs:add", i, 1)["id"] for i in range(4)]
    assert [d.wait_done(jid)["result"] for jid in jobs] == [1, 2, 3, 4]


# -- retries


@pytest.mark.parametrize(("steps", "retries", "timeout", "state", "attempts", "error"), [
    pytest.param(["raise", "raise", "ok"], 2, None, "succeeded", 3, None, id="exception-then-ok"),
    pytest.param(["raise"], 2, None, "failed", 3, ("exception", "attempt 3 raised"), id="exception-x3"),
    pytest.param(["raise", "ok"], 0, None, "failed", 1, ("exception", "attempt 1 raised"),
                 id="no-retries"),
    pytest.param(["hang", "ok"], 1, 1.0, "succeeded", 2, None, id="timeout-then-ok"),
    pytest.param(["hang"], 1, 1.0, "timed_out", 2, ("timeout", ""), id="timeout-x2"),
    pytest.param(["kill", "ok"], 1, None, "succeeded", 2, None, id="worker-death-then-ok"),
    pytest.param(["exit"], 2, None, "failed", 3, ("worker_died", "code 3"), id="worker-death-x3"),
    # the last attempt's error is the one kept
    pytest.param(["raise", "exit"], 1, None, "failed", 2, ("worker_died", "code 3"),
                 id="exception-then-death"),
    pytest.param(["exit", "raise"], 1, None, "failed", 2, ("exception", "attempt 2 raised"),
                 id="death-then-exception"),
    pytest.param(["hang", "raise"], 1, 1.0, "failed", 2, ("exception", "attempt 2 raised"),
                 id="timeout-then-exception"),
    pytest.param(["raise", "hang"], 1, 1.0, "timed_out", 2, ("timeout", ""), id="exception-then-timeout"),
])
def test_retries(daemon, tmp_path, steps, retries, timeout, state, attempts, error):
    counter = tmp_path / "counter"
    j = daemon.run("tests.support.jobs:attempt_script", str(counter), steps, retries=retries, timeout=timeout,
                   wait_timeout=60)
    assert j["state"] == state and j["attempts"] == attempts and j["retries"] == retries, j
    assert int(counter.read_text()) == attempts  # the function really ran that many times
    if error is None:
        assert j["result"] == attempts and j["error"] is None, j
    else:
        assert j["result"] is None and j["error"]["type"] == error[0], j
        assert error[1] in j["error"]["message"], j["error"]


def test_a_retried_job_runs_one_attempt_at_a_time(daemon, tmp_path):
    # two workers: the retry may go to the other one while the first still ends its batch
    for i in range(8):
        counter = tmp_path / f"counter{i}"
        j = daemon.run("tests.support.jobs:attempt_script", str(counter), ["raise", "ok"], retries=1,
                       wait_timeout=30)
        runs = int(counter.read_text())
        assert (j["state"], j["attempts"], j["result"], runs) == ("succeeded", 2, 2, 2), \
            f"job {i}: the function ran {runs} times for {j['attempts']} attempts: {j}"


@pytest.mark.parametrize(("steps", "cancel_at"), [
    pytest.param(["hang"], 1, id="first-attempt"),
    pytest.param(["raise", "hang"], 2, id="after-an-exception"),
    pytest.param(["kill", "hang"], 2, id="after-a-worker-death"),
])
def test_a_cancelled_job_is_never_retried(daemon, tmp_path, steps, cancel_at):
    counter = tmp_path / "counter"
    jid = daemon.submit("tests.support.jobs:attempt_script", str(counter), [*steps, "ok"], retries=5,
                        timeout=60)["id"]

    def running_attempt() -> dict[str, Any] | None:
        j = daemon.job(jid)
        n = int(counter.read_text() or 0) if counter.exists() else 0
        return j if j["state"] == "running" and j["worker"] and n == cancel_at else None

    j = wait_for(running_attempt, 20)
    assert j, (daemon.job(jid), counter.read_text() if counter.exists() else None)
    r = daemon.delete(f"/v1/jobs/{jid}")
    assert r.status == 200 and r.json["state"] == "cancelled", r
    assert wait_for(lambda: gone(j["worker"]["pid"]), 5), proc_args(j["worker"]["pid"])
    # the pool goes on (both slots serve), and the cancelled job is not run again
    assert [daemon.run("tests.support.jobs:add", i, 1)["result"] for i in range(4)] == [1, 2, 3, 4]
    time.sleep(1.0)
    j = daemon.job(jid)
    assert j["state"] == "cancelled" and j["attempts"] == cancel_at, j
    assert int(counter.read_text()) == cancel_at


# -- recycling


@pytest.mark.parametrize("how", ["one-by-one", "in-a-batch"])
def test_max_tasks_per_worker_recycles_without_failing_a_job(daemon_factory, how):
    # preloaded: a fresh worker's first job does not import tests.support.jobs, so the function is known
    # as fast
    d = daemon_factory(cfg={"pool": {"workers": 1, "max_tasks_per_worker": 2,
                                     "preload": ["tests.support.jobs"]}}).start()
    first = [d.run("tests.support.jobs:pid") for _ in range(5)]
    pids = [j["result"] for j in first]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4], pids
    jobs = first
    if how == "in-a-batch":  # short jobs of a known function: several may go to a worker at once
        r = d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:pid"} for _ in range(12)]})
        assert r.status == 202, r
        jobs = [d.wait_done(j["id"]) for j in r.json["jobs"]]
        pids = [j["result"] for j in jobs]
    assert all(j["state"] == "succeeded" and j["attempts"] == 1 for j in jobs), jobs
    assert {j["worker"]["name"] for j in jobs} == {"poold: worker 1"}
    assert all(j["worker"]["pid"] == j["result"] for j in jobs), jobs
    per_worker = collections.Counter(pids)
    assert max(per_worker.values()) <= 2, f"jobs run per worker process: {dict(per_worker)}"
    # the recycled workers are gone; the slot keeps its name
    assert wait_for(lambda: all(gone(p) for p in set(pids) if p != d.workers()[0]["pid"]), 5)
    assert [w["name"] for w in d.live_workers()] == ["poold: worker 1"]


def test_max_memory_recycles_the_worker_after_the_job(daemon_factory):
    d = daemon_factory(cfg={"pool": {"workers": 1, "max_memory_mb": 150}}).start()
    small = [d.run("tests.support.jobs:pid")["result"] for _ in range(2)]
    assert small[0] == small[1], small  # under the limit: kept
    j = d.run("tests.support.jobs:big_mem", 300)
    assert j["state"] == "succeeded" and j["result"] == small[0], j
    after = d.run("tests.support.jobs:pid")
    assert after["state"] == "succeeded" and after["result"] != small[0], after
    assert after["worker"]["name"] == "poold: worker 1"
    assert wait_for(lambda: gone(small[0]), 5), proc_args(small[0])


@pytest.mark.parametrize("start_method", ["forkserver", "spawn", "fork"])
def test_preload_is_imported_before_the_first_job(daemon_factory, start_method):
    modules = ["colorsys", "fractions"]  # imported by nothing else a worker runs
    d = daemon_factory(cfg={"pool": {"workers": 1, "start_method": start_method,
                                     "preload": ["json", *modules]}}).start()
    assert [d.run("tests.support.jobs:has_module", m)["result"] for m in modules] == [True, True]


def test_without_preload_those_modules_are_not_there(daemon):
    assert [daemon.run("tests.support.jobs:has_module", m)["result"] for m in ("colorsys", "fractions")] == \
        [False, False]


# -- what jobs leave behind


@pytest.mark.parametrize("fn", ["leak_child", "leak_detached", "leak_stubborn_child",
                                "leak_stubborn_detached"])
@pytest.mark.parametrize("then", ["worker-idle", "worker-busy"])
def test_what_a_job_leaves_running_is_ended(daemon_factory, tmp_path, fn, then):
    d = daemon_factory(cfg={"pool": {"workers": 1}}).start()
    sup = d.cfg["supervisor"]
    bound = sup["interval"] + sup["kill_grace"] + 1.0
    pidfile = tmp_path / "leak.pid"
    specs: list[dict[str, Any]] = [{"fn": f"tests.support.jobs:{fn}", "args": [str(pidfile)]}]
    if then == "worker-busy":  # the same worker goes straight on to a long job
        specs.append({"fn": "tests.support.jobs:sleep", "args": [60]})
    r = d.post("/v1/jobs/batch", {"jobs": specs})
    assert r.status == 202, r
    ids = [j["id"] for j in r.json["jobs"]]
    j = d.wait_done(ids[0])
    assert j["state"] == "succeeded" and j["result"] == read_pid(pidfile), j
    leaked = {"leftover": proc(j["result"])}
    try:
        seen = when_ended(leaked, bound + 3)
        assert seen, f"{alive(leaked)} still runs {bound + 3:g} s after its job returned"
        after = seen["leftover"] - ts(j["finished_at"])
        assert after <= bound, f"ended {after:.2f} s after its job returned (bound {bound:g} s)"
        if len(ids) > 1:  # the next job was not disturbed
            assert d.job(ids[1])["state"] == "running"
    finally:
        if len(ids) > 1:
            assert d.delete(f"/v1/jobs/{ids[1]}").status == 200
        kill_all(leaked)


@pytest.mark.parametrize("detached", [False, True], ids=["child", "detached-grandchild"])
def test_a_running_jobs_own_helper_is_left_alone(daemon, tmp_path, detached):
    sup = daemon.cfg["supervisor"]
    works = 2 * (sup["interval"] + sup["kill_grace"])  # several orphan sweeps while the job runs
    pidfile = tmp_path / "helper.pid"
    j = daemon.run("tests.support.jobs:own_helper", str(pidfile), works, detached, wait_timeout=30)
    assert j["state"] == "succeeded", j
    assert j["result"] is True, "the job's own helper was killed while the job still ran"
    # once the job has returned, its helper is a leftover like any other
    helper = {"helper": proc(read_pid(pidfile))}
    when_ended(helper, sup["interval"] + sup["kill_grace"] + 1.0)
    assert not alive(helper), alive(helper)


# -- the daemon's own death


@pytest.mark.parametrize("detached", [False, True], ids=["job-with-children", "job-with-detached-grandchild"])
def test_daemon_sigkill_takes_every_process_with_it(daemon_factory, tmp_path, detached):
    # a slow orphan sweep: what the job started is still there when the daemon is killed
    d = daemon_factory(cfg={"supervisor": {"interval": 10.0}}).start()
    pidfile = tmp_path / "child.pid"
    if detached:
        a = d.submit("tests.support.jobs:spawn_tree", str(tmp_path), timeout=120)["id"]
        procs = tree_pids(tmp_path)
    else:
        a = d.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=120)["id"]
        procs = {"child": proc(read_pid(pidfile))}
    b = d.submit("tests.support.jobs:busy_forever", timeout=120)["id"]
    d.wait_state(a, "running")
    d.wait_state(b, "running")
    procs.update(worker_processes(d))
    procs.update(helpers(d))
    assert {"forkserver", "resource tracker", "poold: worker 1", "poold: worker 2"} <= set(procs), procs
    assert not [k for k, p in procs.items() if ended(p)]

    d.kill()
    when_ended(procs, 2.5)
    left = alive(procs)
    problems = [f"2.5 s after the daemon's SIGKILL, still running: {left}"] if left else []
    if left:  # at the latest, the next instance on the same store ends what the last one left
        d.start()
        grace = d.cfg["supervisor"]["kill_grace"]
        when_ended(procs, grace + 2)
        if still := alive(procs):
            problems.append(f"{grace + 2:g} s after the next instance started, still running: {still}")
        kill_all(procs)  # one failure here, not another at teardown
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("fn", ["leak_detached", "spawn_and_hang"],
                         ids=["detached-leftover", "child-of-a-worker-killed-from-outside"])
def test_sigterm_right_after_a_job_left_processes_leaves_none(daemon_factory, tmp_path, fn):
    # a slow orphan sweep: the leftover is still there when SIGTERM comes
    d = daemon_factory(cfg={"supervisor": {"interval": 10.0}}).start()
    pidfile = tmp_path / "leftover.pid"
    jid = d.submit(f"tests.support.jobs:{fn}", str(pidfile), timeout=120)["id"]
    leftover = {"leftover": proc(read_pid(pidfile))}
    if fn == "spawn_and_hang":
        os.kill(d.wait_state(jid, "running")["worker"]["pid"], signal.SIGKILL)
    assert d.wait_done(jid)["state"] in ("succeeded", "failed")
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(20)  # drains (nothing runs), then exits
    when_ended(leftover, 3)
    still = alive(leftover)
    kill_all(leftover)
    assert rc == 0, (rc, d.logtext())
    assert not still, f"the daemon exited (SIGTERM) and left {still} running"


def test_the_next_start_ends_what_a_previous_instance_left_and_nothing_else(daemon_factory, tmp_path):
    decoys = [subprocess.Popen([sys.executable, "-c", "import setproctitle, time;"
                                f"setproctitle.setproctitle({title!r}); time.sleep(300)"])
              for title in ("poold: main", "poold: worker 1", "poold: worker 2")]
    try:
        # another poold, another store (on PostgreSQL another schema): the same process names
        unrelated = daemon_factory(cfg={"store": {"schema": "unrelated"}}).start()
        unrelated_procs = {"main": proc(unrelated.proc.pid), **worker_processes(unrelated),
                           **helpers(unrelated)}
        a = daemon_factory().start()
        pidfile = tmp_path / "child.pid"
        jid = a.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=120)["id"]
        a.wait_state(jid, "running")
        left = {"job's child": proc(read_pid(pidfile)), **worker_processes(a), **helpers(a)}
        time.sleep(3 * a.cfg["supervisor"]["interval"])  # the daemon keeps its records each interval
        for name, p in left.items():  # stopped workers cannot notice the daemon's death
            if name.startswith("poold: worker") and p is not None:
                p.suspend()
        a.kill()
        time.sleep(1.0)
        assert all(not ended(p) for k, p in left.items() if k.startswith("poold: worker")), alive(left)
        for d in decoys:
            assert ps_args(d.pid) in ("poold: main", "poold: worker 1", "poold: worker 2"), ps_args(d.pid)

        a.start()  # a new instance on the same store
        when_ended(left, a.cfg["supervisor"]["kill_grace"] + 2)
        assert not alive(left), f"left by the previous instance and still running: {alive(left)}"
        j = a.wait_done(jid)
        assert j["state"] == "failed" and j["error"]["type"] == "interrupted", j
        assert a.run("tests.support.jobs:add", 1, 1)["result"] == 2
        # nothing unrelated was touched: look-alike processes, another poold and its workers
        assert all(d.poll() is None for d in decoys), [ps_args(d.pid) for d in decoys]
        assert not [k for k, p in unrelated_procs.items() if ended(p)], unrelated_procs
        assert unrelated.run("tests.support.jobs:add", 2, 2)["result"] == 4
    finally:
        for d in decoys:
            d.kill()
            d.wait()


# -- what users see


def test_workers_endpoint_shows_each_worker(daemon):
    assert wait_for(lambda: daemon.settled(2), 15), daemon.workers()
    before = {w["name"]: w for w in daemon.workers()}
    assert sorted(before) == ["poold: worker 1", "poold: worker 2"], before
    for w in before.values():
        assert w["state"] == "idle" and w["job"] is None and w["rss_bytes"] > 0, w
        assert ps_args(w["pid"]) == w["name"], (w, ps_args(w["pid"]))
    done = sum(w["tasks_done"] for w in before.values())
    for i in range(1, 4):
        assert daemon.run("tests.support.jobs:add", i, i)["result"] == 2 * i
        assert sum(w["tasks_done"] for w in daemon.workers()) == done + i, daemon.workers()
    jid = daemon.submit("tests.support.jobs:forever", timeout=120)["id"]
    running = daemon.wait_state(jid, "running")["worker"]
    ws = {w["name"]: w for w in daemon.workers()}
    busy = ws[running["name"]]
    assert busy["pid"] == running["pid"] and busy["state"] == "busy" and busy["job"] == jid, ws
    assert all(w["rss_bytes"] > 0 for w in ws.values()), ws
    assert [w["state"] for n, w in ws.items() if n != running["name"]] == ["idle"], ws


def test_metrics_count_worker_restarts_by_cause(daemon):
    assert restarts(daemon) == {} or set(restarts(daemon).values()) == {0.0}, restarts(daemon)
    assert daemon.run("tests.support.jobs:forever", timeout=0.5)["state"] == "timed_out"
    assert daemon.run("tests.support.jobs:suicide")["error"]["type"] == "worker_died"
    jid = daemon.submit("tests.support.jobs:forever", timeout=120)["id"]
    daemon.wait_state(jid, "running")
    assert daemon.delete(f"/v1/jobs/{jid}").status == 200
    assert wait_for(lambda: restarts(daemon) == {"timeout": 1.0, "died": 1.0, "cancel": 1.0}, 5), \
        restarts(daemon)
    assert wait_for(lambda: daemon.settled(2), 15), daemon.workers()


@pytest.mark.parametrize("start_method", ["forkserver", "spawn", "fork"])
def test_process_titles(daemon_factory, tmp_path, start_method):
    d = daemon_factory(cfg={"pool": {"start_method": start_method}}).start()
    assert d.proc is not None and ps_args(d.proc.pid) == "poold: main", ps_args(d.proc.pid)
    ws = worker_processes(d)
    assert sorted(ws) == ["poold: worker 1", "poold: worker 2"], ws
    for name, p in ws.items():
        assert p is not None and ps_args(p.pid) == name, (name, p)
    # a job's own child keeps its own name
    pidfile = tmp_path / "child.pid"
    jid = d.submit("tests.support.jobs:spawn_and_hang", str(pidfile), timeout=120)["id"]
    assert ps_args(read_pid(pidfile)) == "sleep 300"
    # and one it forks (no exec) is not taken for a worker
    forked = d.run("tests.support.jobs:forked_title")
    assert forked["result"].startswith("poold: job child (worker "), forked
    assert d.run("tests.support.jobs:forked_title", "my own title")["result"] == "my own title"  # kept
    # a replacement keeps its slot's name (a cancel replaces the worker)
    w = d.wait_state(jid, "running")["worker"]
    assert d.delete(f"/v1/jobs/{jid}").status == 200
    fresh_worker(d, w["name"], w["pid"])
    assert sorted(w["name"] for w in d.live_workers()) == ["poold: worker 1", "poold: worker 2"]

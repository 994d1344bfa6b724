"""Hostile jobs against resource limits: each ends as that job's failure (or success), never the
daemon's; the pool keeps serving and no process is left.

Everything a job does to exhaust a resource is bounded by the job itself, so the shared machine
never suffers: the fork bomb is a tree of 254 sleeping processes (root ignores RLIMIT_NPROC),
the runaway fork chain stops itself after 30 s, memory is capped with RLIMIT_AS set by the job
on its own process, files are /dev/null up to the hard RLIMIT_NOFILE.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.daemon import Daemon, gone, proc_args, read_pid, wait_for

CFG: dict[str, dict[str, Any]] = {"pool": {"workers": 2},
                                  "supervisor": {"interval": 0.5, "kill_grace": 1.0, "shutdown_grace": 3.0}}
SETTLE = 20.0  # seconds a leftover may take to be ended (the contract's bound is interval + kill_grace)


def extras(d: Daemon) -> list[psutil.Process]:
    """Processes of this daemon that are neither the daemon, a live worker nor a multiprocessing
    helper (forkserver, resource tracker): what jobs left behind. Found as the daemon's
    descendants (it is a subreaper: what a job detaches re-parents to it) as well as by the test
    session's marks, since a process forked (not exec'd) in a worker shows no readable
    environment (the worker's process title overwrote it)."""
    if not d.running():
        return []
    assert d.proc is not None
    workers = {w["pid"] for w in d.workers()}
    found: dict[int, psutil.Process] = {p.pid: p for p in d.leftovers()}
    with contextlib.suppress(psutil.Error):
        found.update({p.pid: p for p in psutil.Process(d.proc.pid).children(recursive=True)})
    out = []
    for pid, p in found.items():
        if pid == d.proc.pid or pid in workers:
            continue
        args = proc_args(pid)
        if not args or "multiprocessing.forkserver" in args or "resource_tracker" in args \
                or args.startswith("poold: probe"):
            continue
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def assert_nothing_left(d: Daemon) -> None:
    left = wait_for(lambda: not extras(d), SETTLE, 0.2)
    if not left:
        procs = extras(d)
        sample = [(p.pid, proc_args(p.pid)) for p in procs[:5]]
        raise AssertionError(f"{len(procs)} processes of finished jobs still run after {SETTLE} s: {sample}")


def assert_pool_serves(d: Daemon, n: int = 8) -> None:
    """The daemon is the same process, healthy, and runs n plain jobs (spread over the workers)."""
    assert d.running(), d.logtext()
    h = d.get("/health")
    assert h.status == 200, h
    r = d.post("/v1/jobs/batch",
               {"jobs": [{"fn": "tests.support.jobs:add", "args": [i, 1]} for i in range(n)]})
    assert r.status == 202, r
    for i, job in enumerate(r.json["jobs"]):
        done = d.wait_done(job["id"], 60)
        assert done["state"] == "succeeded" and done["result"] == i + 1, done


@pytest.fixture
def d(daemon_factory: Any) -> Daemon:
    return daemon_factory(cfg=CFG).start()


@pytest.mark.parametrize("detach", [False, True], ids=["attached", "setsid"])
@pytest.mark.parametrize("then", ["return", "hang"])
def test_fork_bomb(d: Daemon, then: str, detach: bool) -> None:
    """254 processes (a tree 7 deep, none exec'd): left behind when the job returns, or killed with
    the job when it times out."""
    job = d.run("tests.support.jobs:fork_tree", 7, 2, then, detach, timeout=5.0, wait_timeout=60)
    if then == "return":
        assert job["state"] == "succeeded" and job["result"] == 254, job
    else:
        assert job["state"] == "timed_out", job
    assert_nothing_left(d)
    assert_pool_serves(d)


def test_fork_chain(d: Daemon, tmp_path: Path) -> None:
    """A process that keeps re-forking itself (its pid changes every millisecond) and runs on after
    the job returned: it must still be ended (it stops by itself only after 30 s). Its heartbeat
    file tells whether it still runs."""
    beat, stop = tmp_path / "beat", tmp_path / "stop"
    try:
        job = d.run("tests.support.jobs:fork_chain", str(beat), str(stop), 30, timeout=5.0)
        assert job["state"] == "succeeded", job
        assert wait_for(beat.exists, 5), "the chain never started"

        def still_beating() -> bool:
            t = beat.stat().st_mtime
            time.sleep(1.0)
            return beat.stat().st_mtime != t

        assert wait_for(lambda: not still_beating(), SETTLE, 0), \
            f"the fork chain still runs {SETTLE} s after its job returned"
        assert_nothing_left(d)
        assert_pool_serves(d)
    finally:
        stop.touch()  # ends the chain whatever the daemon did
        wait_for(lambda: not beat.exists() or time.time() - beat.stat().st_mtime > 1, 10)


@pytest.mark.parametrize(("n", "keep"), [(5000, False), (5000, True), (30_000, True)],
                         ids=["5000-closed", "5000-kept", "all-it-can-kept"])
def test_thousands_of_open_files(d: Daemon, n: int, keep: bool) -> None:
    """A job opens thousands of files (up to the hard limit, so EMFILE), and may keep them open in
    its worker; it succeeds, and the pool still serves."""
    job = d.run("tests.support.jobs:open_files", n, keep, timeout=30.0, wait_timeout=60)
    assert job["state"] == "succeeded" and job["result"] > 1000, job
    assert_pool_serves(d)
    assert_nothing_left(d)


@pytest.mark.parametrize("catch", [False, True], ids=["raises", "catches"])
def test_out_of_memory(d: Daemon, catch: bool) -> None:
    """A job that allocates until MemoryError under an RLIMIT_AS it set on itself (300 MiB more
    than it had): its own failure (or success when it catches it), never the daemon's."""
    job = d.run("tests.support.jobs:alloc_until", 300, 8, catch, timeout=60.0, wait_timeout=90)
    if catch:
        assert job["state"] == "succeeded" and 0 < job["result"] <= 300, job
    else:
        assert job["state"] == "failed", job
        assert job["error"]["type"] in ("exception", "worker_died"), job["error"]
        if job["error"]["type"] == "exception":
            assert job["error"]["exception"] == "MemoryError", job["error"]
    assert_pool_serves(d)
    assert_nothing_left(d)


@pytest.mark.parametrize("fds", [[1], [2], [0], [1, 2], [0, 1, 2]],
                         ids=["stdout", "stderr", "stdin", "stdout+stderr", "all-three"])
def test_closed_std_streams(d: Daemon, fds: list[int]) -> None:
    """A job closes its worker's stdout/stderr/stdin and writes to them: its own failure or success;
    the pool (that worker included) keeps serving, printing jobs too."""
    job = d.run("tests.support.jobs:close_std", fds, timeout=30.0)
    assert job["state"] in ("succeeded", "failed"), job
    if job["state"] == "failed":
        assert job["error"]["type"] in ("exception", "worker_died"), job["error"]
    for _ in range(4):  # later jobs, on whichever worker, that print too
        later = d.run("tests.support.jobs:close_std", [], True, timeout=30.0)
        assert later["state"] in ("succeeded", "failed"), later
    assert_pool_serves(d)
    assert_nothing_left(d)


@pytest.fixture
def memory_cgroup() -> Any:
    """A cgroup v1 memory group capped at 128 MiB (skips where there is none to make)."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"poold-test-oom-{time.monotonic_ns()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(128 * 2**20))
        with contextlib.suppress(OSError):  # no swap accounting: the cap is RAM alone
            (group / "memory.memsw.limit_in_bytes").write_text(str(128 * 2**20))
    except OSError as e:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"no cgroup v1 memory group to make here: {e}")
    yield group
    wait_for(lambda: not (group / "cgroup.procs").read_text().strip(), 10)
    with contextlib.suppress(OSError):
        group.rmdir()


def test_the_oom_killer(d: Daemon, memory_cgroup: Path) -> None:
    """A job allocates until the kernel's OOM killer comes (its worker moved into a memory cgroup
    of 128 MiB): that job fails as worker_died, named by its signal and with the out-of-memory
    hint; the daemon lives, replaces the worker and serves."""
    job = d.run("tests.support.jobs:oom_in_cgroup", str(memory_cgroup), timeout=60.0, wait_timeout=90)
    oom = dict(line.split() for line in (memory_cgroup / "memory.oom_control").read_text().splitlines())
    assert int(oom.get("oom_kill", "1")) >= 1, oom  # the kernel's OOM killer did it (when it counts)
    assert job["state"] == "failed" and job["error"]["type"] == "worker_died", job
    assert "SIGKILL" in job["error"]["message"] and "out of memory" in job["error"]["message"], job["error"]
    assert d.running()
    assert_pool_serves(d)
    assert_nothing_left(d)


@pytest.mark.parametrize("fds", [[1], [2], [1, 2]], ids=["stdout", "stderr", "both"])
def test_megabytes_to_stdout_and_stderr(d: Daemon, fds: list[int]) -> None:
    """8 MiB written to stdout and/or stderr: the job succeeds, the daemon is unharmed."""
    size = d.log.stat().st_size
    job = d.run("tests.support.jobs:flood_output", 8, fds, timeout=60.0, wait_timeout=90)
    assert job["state"] == "succeeded" and job["result"] == 8, job
    assert d.log.stat().st_size - size >= 8 * 2**20 * len(fds)  # it went where the daemon's output goes
    assert_pool_serves(d)
    assert_nothing_left(d)


@pytest.mark.parametrize("detach", [False, True], ids=["child", "detached-grandchild"])
def test_sigterm_ends_forked_leftovers(daemon_factory: Any, tmp_path: Path, detach: bool) -> None:
    """A job leaves a process it forked without exec (so it shows no readable environment): its
    worker ends it as the job ends, long before the periodic sweep (60 s here) could; SIGTERM then
    finds nothing to wait for: exit 0 with no process left, as the contract has it."""
    d = daemon_factory(cfg={**CFG, "supervisor": {"interval": 60.0, "kill_grace": 1.0,
                                                  "shutdown_grace": 2.0}}).start()
    pidfile = tmp_path / f"leak-{detach}.pid"
    job = d.run("tests.support.jobs:leak_forked", str(pidfile), detach)
    assert job["state"] == "succeeded", job
    leaked = read_pid(pidfile)
    assert wait_for(lambda: gone(leaked), 2), f"{leaked} ({proc_args(leaked)!r}) outlived its job"
    try:
        d.signal(signal.SIGTERM)
        rc = d.wait_exit(15)
        assert rc == 0, f"no exit within 15 s of SIGTERM (exit status {rc}); log:\n{d.logtext()}"
        assert wait_for(lambda: gone(leaked), 5), f"{leaked} ({proc_args(leaked)!r}) outlived the daemon"
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(leaked).kill()

"""Issue 5's lifecycle without systemd: signals, drain, reload, sd_notify, activation, listeners, auth.

Real daemons (`python -m service serve`), real signals, real sockets: the notify socket is an
AF_UNIX datagram socket bound here and passed as NOTIFY_SOCKET; socket activation hands the
daemon a TCP listener bound here as fd 3 (LISTEN_PID = the daemon's own pid); the unix-socket
API is spoken with http.client over AF_UNIX. Every daemon is closed by the fixtures, which fail
the test when any process it started outlives it.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tests.support.daemon import (
    _SESSION_SIDS,
    Daemon,
    Resp,
    expect_error,
    gone,
    proc_args,
    store_integrity,
    ts,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.stores("sqlite", "postgres")

# -- helpers


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for AF_UNIX paths (at most 107 bytes: tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="poold-lc-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def rewrite_config(d: Daemon) -> None:
    """Writes d.cfg atomically: a SIGHUP never reads a half-written file."""
    tmp = d.config_path.with_suffix(".tmp")
    write_config(tmp, d.cfg)
    os.replace(tmp, d.config_path)


def launch(d: Daemon, cmd: list[str] | None = None, ready: Callable[[], Any] | None = None,
           timeout: float = 30, **popen_kw: Any) -> Daemon:
    """Starts d's daemon like Daemon.start (own session, tracked for the leftover checks), with
    an own command, Popen arguments and readiness test (OSError from it means "not yet")."""
    with open(d.log, "ab") as logf:
        d.proc = subprocess.Popen(cmd or d.command(), env=d.env, cwd=str(d.tmp), stdout=logf,
                                  stderr=subprocess.STDOUT, start_new_session=True, **popen_kw)
    d.pids.append(d.proc.pid)
    _SESSION_SIDS.add(d.proc.pid)
    if ready is None:
        return d

    def check() -> Any:
        assert d.proc is not None
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode}; log:\n{d.logtext()}")
        try:
            return ready()
        except OSError:
            return False

    assert wait_for(check, timeout, 0.1), f"daemon not ready within {timeout} s; log:\n{d.logtext()}"
    return d


def stopped_cleanly(d: Daemon, timeout: float = 30) -> None:
    """Waits for the daemon's exit: status 0, no process left, the store intact."""
    rc = d.wait_exit(timeout)
    assert rc == 0, (rc, d.logtext())
    assert wait_for(lambda: not d.leftovers(), 5), [proc_args(p.pid) for p in d.leftovers()]
    assert store_integrity(d.store) == "ok"


def listening_ports(pid: int) -> set[int]:
    """The TCP ports pid listens on."""
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def refused(port: int) -> bool:
    """True when nothing accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def probe_body(size: int) -> bytes:
    """A JobSpec of exactly `size` bytes naming a function no test config allows (403, never a job)."""
    base = json.dumps({"fn": "os:getcwd", "args": [""]})
    return json.dumps({"fn": "os:getcwd", "args": ["x" * (size - len(base))]}).encode()


def reload(d: Daemon, **sections: dict[str, Any]) -> None:
    """Rewrites the config with `sections` merged in, sends SIGHUP and waits until the new config
    is in force. The witness: each reload lowers server.max_body_bytes a little, and a body one
    byte over the new limit (403 before, as its function is not allowed) then gets 413."""
    for name, values in sections.items():
        d.cfg.setdefault(name, {}).update(values)
    limit = d.notes.get("probe_limit", 64000) - 500
    d.notes["probe_limit"] = limit
    d.cfg["server"]["max_body_bytes"] = limit
    rewrite_config(d)
    d.signal(signal.SIGHUP)
    body = probe_body(limit + 1)
    assert wait_for(lambda: d.request("POST", "/v1/jobs", raw=body).status == 413, 10), \
        (d.request("POST", "/v1/jobs", raw=body), d.logtext())


def assert_pool(d: Daemon, n: int) -> list[dict[str, Any]]:
    """n idle live workers named "poold: worker 1".."poold: worker n", titled so in ps."""
    assert wait_for(lambda: d.settled(n), 15), d.workers()
    ws = d.workers()
    assert sorted(w["name"] for w in ws) == [f"poold: worker {i}" for i in range(1, n + 1)], ws
    for w in ws:
        assert proc_args(w["pid"]) == w["name"], (w, proc_args(w["pid"]))
    return ws


def occupy(d: Daemon, n: int, seconds: float) -> dict[str, int]:
    """n sleep jobs, all running at once; job id -> the worker pid running it."""
    ids = [d.submit("tests.support.jobs:sleep", seconds)["id"] for _ in range(n)]
    return {jid: d.wait_state(jid, "running")["worker"]["pid"] for jid in ids}


def ran_through(d: Daemon, jobs: dict[str, int]) -> None:
    """Each job succeeded on its first attempt, on the worker that had it running."""
    for jid, pid in jobs.items():
        j = d.wait_done(jid)
        assert j["state"] == "succeeded" and j["attempts"] == 1 and j["worker"]["pid"] == pid, j


# -- SIGTERM / SIGINT: the drain


@pytest.mark.parametrize(("sig", "group"), [(signal.SIGTERM, False), (signal.SIGINT, False),
                                            (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-to-the-process-group"])
def test_the_drain_finishes_interrupts_retries_and_keeps_the_queue(daemon_factory, tmp_path, sig, group):
    """`group`: Ctrl-C at a terminal signals the daemon's whole process group, workers included."""
    grace = 3.0
    d = daemon_factory(cfg={"pool": {"workers": 3},
                            "supervisor": {"shutdown_grace": grace, "kill_grace": 0.5}}).start()
    marker = tmp_path / "hang_once.marker"
    retried = d.submit("tests.support.jobs:hang_once", str(marker), retries=1, timeout=120)["id"]
    doomed = d.submit("tests.support.jobs:forever", timeout=120)["id"]
    d.wait_state(retried, "running")
    d.wait_state(doomed, "running")
    finishing = d.submit("tests.support.jobs:sleep", 2.0)["id"]
    d.wait_state(finishing, "running")
    queued = [d.submit("tests.support.jobs:add", i, i)["id"] for i in range(3)]
    assert [d.job(j)["state"] for j in queued] == ["queued"] * 3
    t_signal = time.time()
    assert d.proc is not None
    if group:
        assert os.getpgid(d.proc.pid) == d.proc.pid
        os.killpg(d.proc.pid, sig)
    else:
        d.signal(sig)

    def draining() -> Resp | None:
        r = d.get("/health", timeout=5)
        return r if r.status == 503 else None

    r = wait_for(draining, 2)
    assert r, "GET /health stayed 200 after the signal"
    assert r.json["status"] == "unhealthy", r
    assert isinstance(r.json["reasons"], list) and r.json["reasons"], r
    assert all(isinstance(x, str) and x for x in r.json["reasons"]), r
    assert any("drain" in x.lower() or "shut" in x.lower() for x in r.json["reasons"]), r
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:noop"}), 503, "draining")
    assert d.job(finishing)["state"] in ("running", "succeeded")  # reads are still answered
    stopped_cleanly(d)

    t_restart = time.time()
    d.start()
    j = d.job(finishing)
    assert j["state"] == "succeeded" and j["result"] == 2.0 and j["attempts"] == 1, j
    assert t_signal < ts(j["finished_at"]) < t_restart, j  # it finished during the drain
    j = d.job(doomed)  # past the grace without a retry left
    assert j["state"] == "failed" and j["error"]["type"] == "interrupted" and j["attempts"] == 1, j
    assert ts(j["finished_at"]) - t_signal >= grace - 0.3, j  # it was given the grace first
    j = d.wait_done(retried)  # past the grace with a retry left: queued again, run on this start
    assert j["state"] == "succeeded" and j["result"] == "second attempt" and j["attempts"] == 2, j
    assert ts(j["started_at"]) >= t_restart, j
    for i, jid in enumerate(queued):  # still queued through the drain, run after the restart
        j = d.wait_done(jid)
        assert j["state"] == "succeeded" and j["result"] == 2 * i and j["attempts"] == 1, j
        assert ts(j["started_at"]) >= t_restart, j


# -- signal storms: no job lost or failed


STORMS = ["sigterm-twice", "sigterm-during-reload", "sighup-storm", "sighup-then-sigterm"]


@pytest.mark.parametrize("storm", STORMS)
def test_signal_storms_lose_and_fail_no_job(daemon_factory, storm):
    d = daemon_factory(cfg={"pool": {"workers": 2}, "supervisor": {"shutdown_grace": 10.0}}).start()
    assert d.proc is not None
    pid = d.proc.pid
    ids = list(occupy(d, 2, 0.8))
    ids += [d.submit("tests.support.jobs:add", i, 1)["id"] for i in range(6)]
    if storm == "sigterm-twice":
        d.signal(signal.SIGTERM)
        time.sleep(0.2)
        d.signal(signal.SIGTERM)
    elif storm == "sigterm-during-reload":
        d.cfg["pool"]["workers"] = 4
        rewrite_config(d)
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: len(d.workers()) == 4, 10), d.workers()  # new workers starting
        d.signal(signal.SIGTERM)
    elif storm == "sighup-storm":
        for i in range(50):
            d.cfg["pool"]["workers"] = 3 if i % 2 == 0 else 2
            rewrite_config(d)
            os.kill(pid, signal.SIGHUP)
            if i % 10 == 5:  # accepted in the middle of the storm
                ids.append(d.submit("tests.support.jobs:sleep", 0.3)["id"])
        assert d.running(), d.logtext()
        assert wait_for(lambda: d.get("/health").status == 200, 10), d.get("/health")
        ids.append(d.submit("tests.support.jobs:add", 100, 1)["id"])
        for jid in ids:
            j = d.wait_done(jid)
            assert j["state"] == "succeeded" and j["attempts"] == 1, j
        assert_pool(d, 2)
        d.signal(signal.SIGTERM)
    else:  # sighup-then-sigterm
        d.cfg["pool"]["workers"] = 3
        rewrite_config(d)
        os.kill(pid, signal.SIGHUP)
        os.kill(pid, signal.SIGTERM)
    stopped_cleanly(d)
    d.start()
    for jid in ids:
        j = d.wait_done(jid)
        assert j["state"] == "succeeded" and j["attempts"] == 1, j
    d.close()
    assert store_integrity(d.store) == "ok"


# -- SIGHUP: reload


@pytest.mark.parametrize("sizes", [(1, 3, 2), (3, 1, 2)], ids=["grow-then-shrink", "shrink-then-grow"])
def test_reload_resizes_the_pool_renews_its_workers_and_keeps_slot_titles(daemon_factory, sizes):
    first, *rest = sizes
    d = daemon_factory(cfg={"pool": {"workers": first}}).start()
    before = {w["pid"] for w in assert_pool(d, first)}
    for n in rest:
        running = occupy(d, len(before), 1.2)  # every worker busy through the reload
        reload(d, pool={"workers": n})
        ran_through(d, running)
        now = {w["pid"] for w in assert_pool(d, n)}
        retired = before - now
        assert wait_for(lambda retired=retired: all(gone(p) for p in retired), 5), \
            {p: proc_args(p) for p in retired if not gone(p)}
        # every worker is renewed once its job ends (fresh imports: CONTRACT.md, second part)
        assert not before & now, (before, now)
        before = now
    assert d.run("tests.support.jobs:add", 1, 2)["result"] == 3


def test_shrink_then_grow_back_while_busy_keeps_every_slot(daemon_factory):
    d = daemon_factory(cfg={"pool": {"workers": 2}}).start()
    running = occupy(d, 2, 2.5)
    reload(d, pool={"workers": 1})  # slot 2 is busy: it retires once its job ends...
    reload(d, pool={"workers": 2})  # ...unless the pool grows back first
    ran_through(d, running)
    assert_pool(d, 2)


def test_reload_applies_allow_list_limits_and_log_level(daemon_factory):
    d = daemon_factory(cfg={"pool": {"workers": 1}, "jobs": {"allow": ["tests.support.jobs:*"]},
                            "log": {"level": "info"}}).start()
    blocker = occupy(d, 1, 3.0)
    earlier = d.submit("tests.support.jobs:add", 2, 3)["id"]  # accepted before the reload: waits in the queue
    assert d.job(earlier)["state"] == "queued"
    expect_error(d.post("/v1/jobs", {"fn": "service.demo:fib", "args": [10]}), 403, "function_not_allowed")
    big = probe_body(3000)
    expect_error(d.request("POST", "/v1/jobs", raw=big), 403, "function_not_allowed")
    assert not re.search(r"\bDEBUG\b", d.logtext(100000))
    offset = len(d.logtext(10**9))

    d.cfg["jobs"] = {"allow": ["service.demo:*", "tests.support.jobs:sleep"], "default_timeout": 5.0,
                     "max_timeout": 5.0}
    d.cfg["log"]["level"] = "debug"
    d.cfg["pool"]["workers"] = 2  # a worker starts under the new level
    d.cfg["server"]["max_body_bytes"] = 2048
    rewrite_config(d)
    d.signal(signal.SIGHUP)
    assert wait_for(lambda: d.request("POST", "/v1/jobs", raw=big).status == 413, 10), d.logtext()
    expect_error(d.request("POST", "/v1/jobs", raw=big), 413, "payload_too_large")
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 1]}), 403,
                 "function_not_allowed")
    err = expect_error(d.post("/v1/jobs", {"fn": "service.demo:fib", "args": [5], "timeout": 5.5}),
                       422, "invalid_request")
    assert "timeout" in err["message"], err
    fib = d.submit("service.demo:fib", 10, timeout=5.0)["id"]  # newly allowed, on the new worker
    j = d.wait_done(fib)
    assert j["state"] == "succeeded" and j["result"] == 55 and j["timeout"] == 5.0, j
    assert d.submit("service.demo:fib", 3)["timeout"] == 5.0  # the new default_timeout
    ran_through(d, blocker)  # it ran on through the reload
    j = d.wait_done(earlier)  # its function is no longer allowed: it still runs
    assert j["state"] == "succeeded" and j["result"] == 5, j
    assert wait_for(lambda: re.search(r"\bDEBUG\b.*worker 2", d.logtext(10**9)[offset:]), 10), \
        d.logtext(10**9)[offset:]

    d.notes["probe_limit"] = 2048
    reload(d, log={"level": "error"})
    offset = len(d.logtext(10**9))
    assert d.run("service.demo:fib", 12)["result"] == 144
    d.signal(signal.SIGTERM)
    stopped_cleanly(d)
    after = d.logtext(10**9)[offset:]
    assert not re.search(r"\b(DEBUG|INFO|WARNING)\b", after), after  # not even "poold stopped"


@pytest.mark.parametrize(("bad", "key"), [
    ({"pool": {"wrokers": 3}}, "pool.wrokers"),
    ({"jobs": {"max_timeout": -1.0}}, "jobs.max_timeout"),
], ids=["unknown-key", "out-of-range"])
def test_an_invalid_reload_is_logged_and_the_old_config_stays(daemon_factory, bad, key):
    d = daemon_factory().start()
    running = occupy(d, 1, 1.5)
    good = json.loads(json.dumps(d.cfg))
    d.cfg["jobs"]["allow"] = ["service.demo:*"]  # would refuse tests.support.jobs, were it applied
    for section, values in bad.items():
        d.cfg.setdefault(section, {}).update(values)
    rewrite_config(d)
    d.signal(signal.SIGHUP)
    line = wait_for(lambda: next((ln for ln in d.logtext(10**9).splitlines() if key in ln), None), 10)
    assert line, d.logtext()
    assert d.running() and d.get("/health").status == 200
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2  # the old allow list is in force
    ran_through(d, running)
    assert_pool(d, 2)
    # a good file is applied again on the next SIGHUP
    d.cfg = good
    reload(d, jobs={"allow": ["service.demo:*"]})
    expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 1]}), 403,
                 "function_not_allowed")


# -- sd_notify over a real datagram socket


class NotifyListener:
    """An AF_UNIX datagram socket standing in for systemd's notify socket; a thread keeps
    every datagram it receives with its arrival time."""

    def __init__(self, kind: str, directory: str) -> None:
        if kind == "path":
            address = os.path.join(directory, "notify")
            self.env_value = address
        else:
            name = f"poold-test-{uuid.uuid4().hex}"
            address, self.env_value = "\0" + name, "@" + name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.datagrams: list[tuple[float, list[str]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.datagrams.append((time.monotonic(), data.decode().split("\n")))

    def received(self, since: float = 0.0) -> list[tuple[float, list[str]]]:
        with self._lock:
            return [(t, lines) for t, lines in self.datagrams if t >= since]

    def with_line(self, pred: Callable[[str], bool], since: float = 0.0) -> list[tuple[float, list[str]]]:
        return [(t, lines) for t, lines in self.received(since) if any(pred(ln) for ln in lines)]

    def wait(self, pred: Callable[[str], bool], timeout: float,
             since: float = 0.0) -> tuple[float, list[str]]:
        found = wait_for(lambda: self.with_line(pred, since), timeout, 0.01)
        assert found, f"no matching notification within {timeout} s: {self.received(since)}"
        return found[0]

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


def _is(text: str) -> Callable[[str], bool]:
    return lambda ln: ln == text


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_through_the_whole_life(daemon_factory, short_dir, kind):
    listener = NotifyListener(kind, short_dir)
    try:
        d = daemon_factory(env={"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "2000000"})
        assert "WATCHDOG_PID" not in d.env
        launch(d)
        assert d.proc is not None
        pid = d.proc.pid
        # READY=1: by then the HTTP server answers, and healthy
        t_ready, _ = listener.wait(_is("READY=1"), 30)
        r = d.get("/health", timeout=5)
        assert r.status == 200 and r.json["status"] == "ok", r

        # STATUS= follows the load
        t_load = time.monotonic()
        jobs = [d.submit("tests.support.jobs:sleep", 1.2)["id"] for _ in range(3)]
        for jid in jobs:
            assert d.wait_done(jid)["state"] == "succeeded"
        t_idle = time.monotonic()
        time.sleep(1.5)  # a few supervisor.interval rounds: the idle state is reported by now

        def statuses(since: float, until: float) -> list[str]:
            return [ln for t, ls in listener.received(since) if t < until for ln in ls
                    if ln.startswith("STATUS=")]

        under_load = statuses(t_load, t_idle)
        idle = statuses(t_load, time.monotonic())[-1:]
        assert idle and set(under_load) - set(idle), (under_load, idle)  # it told of the load

        # WATCHDOG=1 about every second (half of WATCHDOG_USEC), never later than WATCHDOG_USEC
        time.sleep(max(0.0, t_ready + 4.0 - time.monotonic()))
        pings = [t for t, _ in listener.with_line(_is("WATCHDOG=1"), since=t_ready)]
        assert len(pings) >= 2, listener.received(t_ready)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.3 < g < 2.0 for g in gaps), gaps

        # SIGSTOP for 3 s: no ping then; after SIGCONT the pings resume
        os.kill(pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            time.sleep(3.0)
        finally:
            t_cont = time.monotonic()
            os.kill(pid, signal.SIGCONT)
        during = [t for t, _ in listener.with_line(_is("WATCHDOG=1"), since=t_stop + 0.1) if t < t_cont]
        assert during == [], during
        listener.wait(_is("WATCHDOG=1"), 5, since=t_cont)
        assert d.get("/health", timeout=5).status == 200

        # READY=1 came once; each SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again,
        # whether the new file is refused (systemd must not be left "reloading") or applied
        assert len(listener.with_line(_is("READY=1"))) == 1, listener.received()
        for refused_key in ("pool.wrokers", None):
            if refused_key:
                d.cfg["pool"]["wrokers"] = 1
            else:
                del d.cfg["pool"]["wrokers"]
            rewrite_config(d)
            t_hup = time.monotonic()
            usec_before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            d.signal(signal.SIGHUP)
            t_reloading, lines = listener.wait(_is("RELOADING=1"), 10, since=t_hup)
            usec_after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            stamps = [ln for ln in lines if ln.startswith("MONOTONIC_USEC=")]
            assert len(stamps) == 1 and stamps[0].split("=", 1)[1].isdigit(), lines
            assert usec_before <= int(stamps[0].split("=", 1)[1]) <= usec_after, \
                (usec_before, lines, usec_after)
            t_ready2, _ = listener.wait(_is("READY=1"), 10, since=t_hup)
            assert t_ready2 >= t_reloading
            order = [ln for _, ls in listener.received(t_hup) for ln in ls
                     if ln in ("RELOADING=1", "READY=1")]
            assert order == ["RELOADING=1", "READY=1"], (refused_key, order)
            if refused_key:
                assert wait_for(lambda k=refused_key: k in d.logtext(10**9), 5), d.logtext()
        assert d.get("/health", timeout=5).status == 200

        # SIGTERM: STOPPING=1, then a clean exit
        t_term = time.monotonic()
        d.signal(signal.SIGTERM)
        listener.wait(_is("STOPPING=1"), 10, since=t_term)
        stopped_cleanly(d)
    finally:
        listener.close()


# -- socket activation

# Runs first in the child: moves the parked listener to fd 3, sets LISTEN_* for its own pid
# and execs the daemon in the same process (so LISTEN_PID is the daemon's pid).
ACTIVATE = """
import os, sys
parked = int(sys.argv[1])
os.dup2(parked, 3)
os.close(parked)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="http")
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_socket_activation_serves_on_the_passed_socket_only(daemon_factory):
    d = daemon_factory()
    config_port = d.port
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        assert port != config_port
        parked = fcntl_dup(listener.fileno())
        try:
            d.url = f"http://127.0.0.1:{port}"
            launch(d, [sys.executable, "-c", ACTIVATE, str(parked), *d.command()],
                   ready=lambda: d.get("/health", timeout=5).status == 200, pass_fds=(parked,))
        finally:
            os.close(parked)
    finally:
        listener.close()  # the daemon holds its own copy
    assert d.proc is not None
    assert d.run("tests.support.jobs:add", 20, 22)["result"] == 42
    assert refused(config_port), f"the daemon answers on its config port {config_port} too"
    assert listening_ports(d.proc.pid) == {port}
    # the activation variables were for the daemon alone
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert d.run("tests.support.jobs:env", name)["result"] is None
    d.signal(signal.SIGTERM)
    stopped_cleanly(d)
    assert refused(port)  # nothing (no worker either) kept the passed socket open


def fcntl_dup(fd: int) -> int:
    """A close-on-exec duplicate of fd numbered 100 or above (never one of 0..3)."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)


# -- server.unix_socket


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def unix_request(path: str, method: str, url: str, body: Any = None) -> Resp:
    conn = _UnixConnection(path)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, url, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return Resp(r.status, r.headers, r.read())
    finally:
        conn.close()


def unix_run(path: str, fn: str, *args: Any) -> dict[str, Any]:
    r = unix_request(path, "POST", "/v1/jobs", {"fn": fn, "args": list(args)})
    assert r.status == 202 and r.headers["Location"] == f"/v1/jobs/{r.json['id']}", r
    end = time.monotonic() + 30
    while time.monotonic() < end:
        j = unix_request(path, "GET", f"/v1/jobs/{r.json['id']}?wait=5").json
        if j["state"] not in ("queued", "running"):
            return j
    raise AssertionError(f"job {r.json['id']} did not finish")


@pytest.mark.parametrize("tcp", [False, True], ids=["alone", "beside-tcp"])
def test_unix_socket(daemon_factory, short_dir, tcp):
    path = os.path.join(short_dir, "poold.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # bound, and its owner gone
    stale.bind(path)
    stale.close()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    server: dict[str, Any] = {"unix_socket": path} if tcp else {"unix_socket": path, "port": 0}
    d = daemon_factory(cfg={"server": server})

    def ready() -> bool:
        return unix_request(path, "GET", "/health").status == 200

    launch(d, ready=ready)
    assert d.proc is not None
    j = unix_run(path, "tests.support.jobs:add", 2, 3)
    assert j["state"] == "succeeded" and j["result"] == 5, j
    assert unix_request(path, "GET", "/v1/workers").status == 200
    if tcp:
        assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2
        assert listening_ports(d.proc.pid) == {d.port}
    else:
        assert listening_ports(d.proc.pid) == set()
        assert refused(d.port)
    # an instance that dies leaves its socket file behind: the next start replaces it
    d.kill()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    launch(d, ready=ready)
    j = unix_run(path, "tests.support.jobs:add", 40, 2)
    assert j["state"] == "succeeded" and j["result"] == 42, j
    d.signal(signal.SIGTERM)
    stopped_cleanly(d)
    assert not os.path.exists(path), "a clean stop removes its socket file"


@pytest.mark.parametrize(("server", "key"), [
    ({"port": 0}, "server.port"),
    ({"port": 0, "unix_socket": ""}, "server.port"),
    ({"host": "0.0.0.0"}, "server.host"),
], ids=["port-0", "port-0-empty-unix-socket", "non-loopback-without-token"])
def test_nothing_safe_to_listen_on_exits_2_naming_the_key(daemon_factory, server, key):
    d = daemon_factory(cfg={"server": server})
    d.start(wait=False)
    assert d.wait_exit(30) == 2, d.logtext()
    assert key in d.logtext(), d.logtext()
    assert wait_for(lambda: not d.leftovers(), 5)


# -- the token


@pytest.mark.parametrize("source", ["token", "token_file"])
def test_a_token_guards_everything_but_health_on_a_non_loopback_host(daemon_factory, tmp_path, source):
    secret = f"tok-{uuid.uuid4().hex}"
    server: dict[str, Any] = {"host": "0.0.0.0"}
    if source == "token":
        server["token"] = secret
    else:
        tf = tmp_path / "token"
        tf.write_text(f"\n  {secret}\t\n")
        tf.chmod(0o600)
        server["token_file"] = str(tf)
    d = daemon_factory(cfg={"server": server}, token=secret).start()
    assert d.proc is not None
    assert any(c.laddr.ip == "0.0.0.0" and c.laddr.port == d.port
               for c in psutil.Process(d.proc.pid).net_connections(kind="tcp")
               if c.status == psutil.CONN_LISTEN)
    for tok in (None, "wrong", secret + "x"):
        expect_error(d.post("/v1/jobs", {"fn": "tests.support.jobs:noop"}, token=tok), 401, "unauthorized")
        expect_error(d.get("/metrics", token=tok), 401, "unauthorized")
        expect_error(d.get("/openapi.json", token=tok), 401, "unauthorized")
        r = d.get("/health", token=tok)
        assert r.status == 200 and r.json["status"] == "ok", r
    assert d.jobs() == []  # nothing refused was enqueued
    assert d.get("/metrics").status == 200
    assert d.get("/openapi.json").status == 200
    assert d.run("tests.support.jobs:add", 3, 4)["result"] == 7


def _answers(d: Any) -> bool:
    try:
        return d.get("/health", timeout=2).status in (200, 503)
    except OSError:
        return False


def test_sigterm_drains_at_once_when_no_worker_can_start(daemon_factory):
    """Workers that cannot start (a preload that fails) must not hold a SIGTERM back: the daemon
    refuses jobs (503 draining) and exits 0 within moments, not when its wait for workers ends."""
    d = daemon_factory(cfg={"pool": {"workers": 1, "preload": ["tests.support.broken_import"]}})
    d.start(wait=False)
    assert wait_for(lambda: _answers(d), 30), d.logtext()
    # no worker has been alive for 10 s (until then one being started counts as alive)
    assert wait_for(lambda: d.get("/health").status == 503, 20), d.get("/health")
    d.signal(signal.SIGTERM)
    t = time.monotonic()
    assert d.wait_exit(10) == 0, d.logtext()
    assert time.monotonic() - t < 10


def _catches_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_sigterm_during_start_up_is_a_clean_stop(daemon_factory, delay):
    """A SIGTERM that comes while the daemon starts (loading its configuration, importing, opening
    the store: before the event loop's handlers exist) is a clean stop, exit status 0, from the
    moment the process catches SIGTERM at all (before that, the interpreter itself is starting)."""
    d = daemon_factory()
    d.start(wait=False)
    assert wait_for(lambda: _catches_sigterm(d.proc.pid), 30)
    time.sleep(delay)
    d.signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0, d.logtext()

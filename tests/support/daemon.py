"""Shared fixtures: real `poold serve` daemons with temporary configs and stores.

A `Daemon` runs `python -m service serve --config <tmp>/poold.toml` in a session of
its own, on a free port, with its SQLite store in the test's temporary folder and the
repository root on PYTHONPATH (so that workers import `tests.support.jobs`). Every process it
starts inherits an environment tag; teardown always stops the daemon (SIGTERM, then
SIGKILL), fails the test when anything it started outlives it, and kills what is left.
A session-wide check makes sure no daemon of this session survives the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent.parent

# Inherited by the daemon, its workers, the jobs' children and detached grandchildren
# (the daemon's own /proc/PID/environ may be overwritten by its process title, hence
# the session ids as well). Not POOLD_-prefixed: those are configuration overrides.
SWEEP_VAR = "PYTEST_POOLD_SWEEP"
SESSION_TAG = uuid.uuid4().hex
_SESSION_SIDS: set[int] = set()  # pid (= session id) of every daemon this session started

# Inherited variables that would change what the daemon does.
_FOREIGN_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC",
                "WATCHDOG_PID")
# urllib honours *_proxy variables; the daemon is always local.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
TERMINAL = frozenset({"succeeded", "failed", "timed_out", "cancelled"})
JOB_FIELDS = ("id", "fn", "args", "kwargs", "state", "priority", "timeout", "retries", "attempts",
              "key", "created_at", "started_at", "finished_at", "worker", "result", "error", "progress")
WORKER_FIELDS = ("pid", "name", "state", "job", "rss_bytes", "tasks_done", "started_at", "host")
ERROR_TYPES = ("exception", "timeout", "worker_died", "unserializable_result", "result_too_large",
               "interrupted")


# -- helpers


def base_env(**extra: str) -> dict[str, str]:
    """os.environ without POOLD_* overrides, systemd variables or proxies for localhost."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLD_") and k not in _FOREIGN_ENV}
    for k in ("no_proxy", "NO_PROXY"):
        env[k] = ",".join(x for x in (env.get(k, ""), "127.0.0.1,localhost") if x)
    env.update(extra)
    return env


def ts(s: str) -> float:
    """Seconds since the epoch of a Job timestamp such as 2026-11-24T12:00:00.000000Z."""
    assert TS_RE.fullmatch(s), s
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def proc_args(pid: int) -> str:
    """What `ps -o args` shows for pid ("" when it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline()).strip()
    except psutil.Error:
        return ""


def gone(pid: int) -> bool:
    """True when pid no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(pred: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Polls pred until it returns something true or `timeout` passes; returns its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def read_pid(path: Path, timeout: float = 10) -> int:
    """The pid a job wrote to `path` (waits for the file)."""
    ok = wait_for(lambda: path.exists() and path.read_text().strip(), timeout)
    assert ok, f"{path} was never written"
    return int(path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_config(path: Path, cfg: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    Path(path).write_text("\n".join(lines))


def store_integrity(path: str | Path) -> str:
    """SQLite's `PRAGMA integrity_check` of a store file (call it with the daemon stopped)."""
    con = sqlite3.connect(str(path), timeout=10)
    try:
        rows = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    return "; ".join(str(r[0]) for r in rows)


class Resp:
    """One HTTP answer: status, headers, raw body and the body parsed as JSON (or None)."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = body
        self.json: Any = None
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            pass

    @property
    def code(self) -> str | None:
        try:
            return self.json["error"]["code"]
        except (TypeError, KeyError):
            return None

    @property
    def message(self) -> str:
        try:
            return str(self.json["error"]["message"])
        except (TypeError, KeyError):
            return ""

    def __repr__(self) -> str:
        return f"<Resp {self.status} {self.raw[:400]!r}>"


def expect_error(r: Resp, status: int, code: str | None = None) -> dict[str, Any]:
    """Asserts the contract's error shape; returns the `error` object."""
    assert r.status == status, r
    ctype = r.headers.get("Content-Type", "")
    assert ctype.startswith("application/json"), (r, ctype)
    assert isinstance(r.json, dict) and isinstance(r.json.get("error"), dict), r
    err = r.json["error"]
    assert isinstance(err.get("code"), str), r
    assert isinstance(err.get("message"), str) and err["message"], r
    if code is not None:
        assert err["code"] == code, r
    return err


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]] | None) -> None:
    for section, values in (extra or {}).items():
        base.setdefault(section, {}).update(values)


_DEFAULT: Any = object()


class Daemon:
    """One poold instance (and its restarts) with a config and store of its own."""

    def __init__(self, tmp_path: Path, cfg: dict[str, dict[str, Any]] | None = None,
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] | list[str] = (),
                 token: str | None = None) -> None:
        self.tmp = Path(tmp_path)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.port = self._picked_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = str(self.tmp / "poold.db")
        self.cfg: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "pool": {"workers": 2},
            "jobs": {"allow": ["service.demo:*", "tests.support.jobs:*"]},
            "store": {"path": self.store},
            "supervisor": {"interval": 0.5, "kill_grace": 1.0, "shutdown_grace": 5.0},
        }
        _merge(self.cfg, cfg)
        self.store = self.cfg["store"]["path"]
        self.config_path = self.tmp / "poold.toml"
        write_config(self.config_path, self.cfg)
        self.env = base_env()
        self.env["PYTHONPATH"] = os.pathsep.join(
            x for x in (str(REPO), self.env.get("PYTHONPATH", "")) if x)
        self.tag = f"{SESSION_TAG}-{uuid.uuid4().hex[:12]}"
        self.env[SWEEP_VAR] = self.tag
        self.env.update(env or {})
        self.extra_args = list(extra_args)
        self.token = token if token is not None else (self.cfg["server"].get("token") or None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every daemon process started through this object
        self.log = self.tmp / "daemon.log"
        self.notes: dict[str, Any] = {}  # for fixtures and tests: anything to keep with the daemon

    # -- lifecycle

    def command(self) -> list[str]:
        return [sys.executable, "-m", "service", "serve", "--config", str(self.config_path),
                *self.extra_args]

    def start(self, wait: bool = True, timeout: float = 30) -> Daemon:
        for attempt in range(3):
            offset = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "ab") as logf:
                # cwd: nothing the daemon writes by a relative path lands in the repository
                self.proc = subprocess.Popen(self.command(), env=self.env, cwd=str(self.tmp),
                                             stdout=logf, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            self.pids.append(self.proc.pid)
            _SESSION_SIDS.add(self.proc.pid)
            if not wait:
                return self
            try:
                ok = wait_for(self._healthy, timeout, 0.1)
            except AssertionError:
                if attempt < 2 and len(self.pids) == attempt + 1 and self._port_taken(offset):
                    self._move_port()  # another program took the free port first
                    continue
                self.sweep()
                raise
            if not ok:
                log = self.logtext()
                self.stop()
                self.sweep()
                raise AssertionError(f"daemon not healthy within {timeout} s; log:\n{log}")
            return self
        raise AssertionError("no free port")  # pragma: no cover

    def _port_taken(self, offset: int) -> bool:
        if self.cfg["server"]["port"] != self._picked_port or "--port" in self.extra_args:
            return False
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace").lower()
        except OSError:
            return False
        return "address already in use" in text or "errno 98" in text

    def _move_port(self) -> None:
        self.port = self._picked_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cfg["server"]["port"] = self.port
        write_config(self.config_path, self.cfg)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}; log:\n{self.logtext()}")
        try:
            return self.get("/health", timeout=5).status == 200
        except OSError:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logtext(self, tail: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        """The daemon's exit status, or None when it still runs after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL of the daemon process alone (its workers are left to die on their own)."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; the exit status after SIGTERM (None if killed)."""
        if not self.running():
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.wait_exit(timeout)
        if rc is None:
            self.proc.kill()
            self.proc.wait(10)
        return rc

    def _ours(self, p: psutil.Process) -> bool:
        """True when p was started by this object's daemon(s) or by what they ran."""
        if p.pid == os.getpid():
            return False
        try:
            if os.getsid(p.pid) in self.pids:
                return True
            return p.environ().get(SWEEP_VAR) == self.tag
        except (OSError, psutil.Error):
            return False

    def leftovers(self) -> list[psutil.Process]:
        """Live processes (daemon, forkserver, workers, jobs' children) of this object's daemons."""
        out = []
        for p in psutil.process_iter():
            try:
                if self._ours(p) and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def sweep(self) -> None:
        """Kills everything `leftovers()` finds."""
        for p in self.leftovers():
            with contextlib.suppress(psutil.Error):
                p.kill()

    def cancel_all(self, grace: float = 1.0) -> None:
        """Best effort: cancels every queued and running job (quick teardown).

        Jobs that started less than half a second ago get up to `grace` seconds to end
        on their own first: a teardown should not race a job that is about to finish.
        """
        if not self.running():
            return
        with contextlib.suppress(OSError, TypeError, KeyError, AssertionError):
            end = time.monotonic() + grace
            while True:
                pending = [j for state in ("queued", "running")
                           for j in (self.get(f"/v1/jobs?state={state}&limit=1000", timeout=10).json
                                     or {}).get("jobs", [])]
                young = [j for j in pending if j["state"] == "running" and j.get("started_at")
                         and time.time() - ts(j["started_at"]) < 0.5]
                if not young or time.monotonic() > end:
                    break
                time.sleep(0.05)
            for j in pending:
                self.delete(f"/v1/jobs/{j['id']}", timeout=10)

    def close(self, grace: float = 5.0) -> None:
        """Stops the daemon and fails when it did not exit on SIGTERM or left a process behind."""
        problems = []
        was_running = self.running()
        if was_running:
            self.cancel_all()
            rc = self.stop()
            if rc is None:
                problems.append("the daemon did not exit within 20 s of SIGTERM")
            elif rc != 0:
                problems.append(f"the daemon exited with {rc} after SIGTERM")
        end = time.monotonic() + grace
        while (left := self.leftovers()) and time.monotonic() < end:
            time.sleep(0.1)
        if left:
            problems.append("processes left behind: " + ", ".join(
                f"{p.pid} {proc_args(p.pid)!r}" for p in left))
        self.sweep()
        if problems:
            raise AssertionError("; ".join(problems) + "\nlog:\n" + self.logtext())

    # -- http

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 75,
                token: Any = _DEFAULT) -> Resp:
        """One request; `token=None` sends no Authorization header, a string sends that token."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json"} if data is not None else {}
        tok = self.token if token is _DEFAULT else token
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                return Resp(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            with e:
                return Resp(e.code, e.headers, e.read())

    def get(self, path: str, **kw: Any) -> Resp:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Resp:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Resp:
        return self.request("DELETE", path, **kw)

    # -- jobs

    def submit(self, fn: str, *args: Any, expect: tuple[int, ...] = (202,), **spec: Any) -> dict[str, Any]:
        """POST /v1/jobs with `fn`, `args` and any JobSpec field; returns the Job."""
        body: dict[str, Any] = {"fn": fn, "args": list(args)}
        body.update(spec)
        r = self.post("/v1/jobs", body)
        assert r.status in expect, r
        return r.json

    def job(self, jid: str, wait: float | None = None) -> dict[str, Any]:
        path = f"/v1/jobs/{jid}" + (f"?wait={wait}" if wait is not None else "")
        r = self.get(path)
        assert r.status == 200, r
        return r.json

    def wait_done(self, jid: str, timeout: float = 30) -> dict[str, Any]:
        """Long-polls until the job is finished; fails after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            t0 = time.monotonic()
            j = self.job(jid, wait=max(1, min(10, int(left) + 1)))
            if j["state"] in TERMINAL:
                return j
            if time.monotonic() > end:
                raise AssertionError(f"job {jid} not finished within {timeout} s: {j}")
            if time.monotonic() - t0 < 0.05:
                time.sleep(0.05)  # do not spin should ?wait return early

    def wait_state(self, jid: str, *states: str, timeout: float = 15) -> dict[str, Any]:
        """Polls until the job is in one of `states` (with its worker known when running)."""
        def ready() -> dict[str, Any] | None:
            j = self.job(jid)
            if j["state"] in states and (j["state"] != "running" or j.get("worker")):
                return j
            return None

        j = wait_for(ready, timeout)
        assert j, f"job {jid} never reached {states}: {self.job(jid)}"
        return j

    def run(self, fn: str, *args: Any, wait_timeout: float = 30, **spec: Any) -> dict[str, Any]:
        """Submits and waits; returns the finished Job."""
        return self.wait_done(self.submit(fn, *args, expect=(202, 200), **spec)["id"], wait_timeout)

    def jobs(self, query: str = "limit=1000") -> list[dict[str, Any]]:
        r = self.get(f"/v1/jobs?{query}")
        assert r.status == 200, r
        return r.json["jobs"]

    def workers(self) -> list[dict[str, Any]]:
        r = self.get("/v1/workers")
        assert r.status == 200, r
        return r.json["workers"]

    def live_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.workers() if isinstance(w.get("pid"), int) and not gone(w["pid"])]

    def settled(self, n: int) -> bool:
        """True when exactly n workers are listed, all alive and idle."""
        ws = self.workers()
        return len(ws) == n and all(w["state"] == "idle" and not gone(w["pid"]) for w in ws)


# -- fixtures


@contextlib.contextmanager
def running_daemon(tmp_path: Path, **kw: Any) -> Iterator[Daemon]:
    """A started Daemon, always closed (and checked for leftovers) on the way out."""
    d = Daemon(tmp_path, **kw)
    try:
        d.start()
        yield d
    finally:
        d.close()


def _session_ours(p: psutil.Process) -> bool:
    if p.pid == os.getpid():
        return False
    try:
        if os.getsid(p.pid) in _SESSION_SIDS:
            return True
        return p.environ().get(SWEEP_VAR, "").startswith(SESSION_TAG)
    except (OSError, psutil.Error):
        return False


def session_leftovers() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if _session_ours(p) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out

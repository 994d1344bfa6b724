"""Store faults under a running daemon (needs root): a read-only directory, a full disk, the
database file deleted.

While the fault lasts, submissions get 503 with a JSON error and /health answers 503 saying why
(or, for a deleted file, the daemon writes the file back); no job it accepted (202) is lost, and
jobs that were running finish; once the fault clears the daemon recovers by itself (health 200
with nobody submitting, new jobs accepted and run), and a restart still finds every accepted job.
Every mount is undone in teardown, after the daemon has stopped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import TERMINAL, Daemon, Resp, store_integrity, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

CFG: dict[str, dict[str, Any]] = {
    "pool": {"workers": 2},
    "supervisor": {"interval": 0.5, "kill_grace": 1.0, "shutdown_grace": 5.0},
}
DETECT = 10.0  # seconds the daemon may take to notice a fault, or its end


class Mounts:
    """Mounts made by a test; all undone at teardown (lazily when something still holds them)."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def run(self, *args: str) -> None:
        subprocess.run(["mount", *args], check=True, capture_output=True, text=True)

    def tmpfs(self, where: Path, size: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.run("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        self.points.append(where)

    def read_only(self, where: Path) -> None:
        self.run("--bind", str(where), str(where))
        self.points.append(where)
        self.run("-o", "remount,ro,bind", str(where))

    def writable(self, where: Path) -> None:
        """Ends a read_only() fault (the bind mount stays until teardown: the daemon may hold files
        opened through it)."""
        self.run("-o", "remount,rw,bind", str(where))

    def undo(self, where: Path) -> None:
        subprocess.run(["umount", str(where)], check=True, capture_output=True, text=True)
        self.points.remove(where)

    def undo_all(self) -> list[str]:
        problems = []
        for where in reversed(list(self.points)):
            r = subprocess.run(["umount", str(where)], capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"umount {where}: {r.stderr.strip()}; unmounted lazily")
                subprocess.run(["umount", "-l", str(where)], capture_output=True, text=True)
            self.points.remove(where)
        return problems


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    """Request it before daemon_factory, so that the daemons stop before the unmounting."""
    m = Mounts()
    try:
        yield m
    finally:
        problems = m.undo_all()
    assert not problems, problems


def fill(directory: Path) -> Path:
    """Fills the file system of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
        small = b"\0" * 512
        with contextlib.suppress(OSError):
            while True:
                f.write(small)
    try:  # the file system really is full now
        with open(directory / "probe", "wb", buffering=0) as f:
            f.write(block)
        raise AssertionError("the file system is not full")
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    with contextlib.suppress(OSError):
        (directory / "probe").unlink()
    return filler


class Book:
    """Jobs a daemon accepted, by the 202s it sent."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.ids: list[str] = []
        self.refusals: list[Resp] = []

    def submit(self, fn: str, *args: Any, **spec: Any) -> Resp:
        r = self.d.post("/v1/jobs", {"fn": fn, "args": list(args), **spec}, timeout=30)
        assert r.status in (202, 503), r
        if r.status == 202:
            self.ids.append(r.json["id"])
        else:
            self.refusals.append(r)
        return r

    def all_final(self, timeout: float = 60) -> dict[str, dict[str, Any]]:
        """Every accepted job, once final (fails when one is missing or never ends)."""
        out = {}
        for jid in self.ids:
            r = self.d.get(f"/v1/jobs/{jid}")
            assert r.status == 200, (jid, r)
            out[jid] = self.d.wait_done(jid, timeout) if r.json["state"] not in TERMINAL else r.json
        return out


def check_refusal(r: Resp) -> None:
    """A 503 with a JSON error that says what is wrong (and when to come back)."""
    assert r.status == 503, r
    assert r.headers.get("Content-Type", "").startswith("application/json"), r
    err = r.json["error"]
    assert isinstance(err.get("code"), str) and err["code"], r
    assert "store" in err["message"].lower() or "disk" in err["message"].lower(), r


def health(d: Daemon) -> Resp:
    return d.get("/health", timeout=30)


def store_reason(r: Resp) -> bool:
    return (
        r.status == 503
        and r.json.get("status") == "unhealthy"
        and any("store" in s.lower() for s in r.json.get("reasons", []))
    )


def run_fault(d: Daemon, inject: Callable[[], None], clear: Callable[[], None], refuses: bool = True) -> Book:
    """Load, fault, refusals, recovery, restart; see the module docstring."""
    book = Book(d)
    assert book.submit("tests.support.jobs:add", 1, 2).status == 202
    # busy through the fault
    running = [book.submit("tests.support.jobs:sleep", 2.5).json["id"] for _ in range(2)]
    # start and end in it
    queued = [book.submit("tests.support.jobs:add", i, 100).json["id"] for i in range(5)]
    d.wait_state(running[0], "running")
    inject()
    if refuses:
        seen = wait_for(lambda: store_reason(health(d)), DETECT, 0.1)
        assert seen, f"/health does not report the fault: {health(d)}"
        r = book.submit("tests.support.jobs:add", 2, 2)
        check_refusal(r)
        batch = d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:add", "args": [3, 3]}]})
        check_refusal(batch)
        assert store_reason(health(d)), health(d)
    time.sleep(3.0)  # the running jobs end, the queued ones run, all during the fault
    clear()
    assert wait_for(lambda: health(d).status == 200, DETECT, 0.2), (
        f"still unhealthy {DETECT} s after the fault cleared, with nobody submitting: {health(d)}"
    )
    fresh = book.submit("tests.support.jobs:add", 20, 22)
    assert fresh.status == 202, fresh
    done = book.all_final(60)
    for jid in running + queued + [fresh.json["id"]]:
        assert done[jid]["state"] == "succeeded", done[jid]
    # durable: a restart finds every accepted job as it was
    assert d.stop() == 0, d.logtext()
    assert store_integrity(d.store) == "ok"
    d.start()
    for jid, job in done.items():
        r = d.get(f"/v1/jobs/{jid}")
        assert r.status == 200, (jid, r, "lost across the restart")
        assert r.json["state"] == job["state"], (r.json, job)
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2
    return book


def test_store_directory_read_only(mounts: Mounts, daemon_factory: Any, tmp_path: Path) -> None:
    sdir = tmp_path / "store"
    sdir.mkdir()
    d = daemon_factory(cfg={**CFG, "store": {"path": str(sdir / "poold.db")}}).start()
    run_fault(d, lambda: mounts.read_only(sdir), lambda: mounts.writable(sdir))


def test_disk_full(mounts: Mounts, daemon_factory: Any, tmp_path: Path) -> None:
    sdir = tmp_path / "store"
    mounts.tmpfs(sdir, "2m")
    d = daemon_factory(cfg={**CFG, "store": {"path": str(sdir / "poold.db")}}).start()
    filler: list[Path] = []
    run_fault(d, lambda: filler.append(fill(sdir)), lambda: filler.pop().unlink())
    d.stop()


@pytest.mark.parametrize("files", [("",), ("", "-wal", "-shm")], ids=["db", "db+wal+shm"])
def test_database_file_deleted(
    mounts: Mounts, daemon_factory: Any, tmp_path: Path, files: tuple[str, ...]
) -> None:
    """The file deleted under the running daemon: it must not go on writing to a file that no
    longer has a name (a restart would find nothing): it refuses (503) or writes the file back."""
    sdir = tmp_path / "store"
    sdir.mkdir()
    path = sdir / "poold.db"
    d = daemon_factory(cfg={**CFG, "store": {"path": str(path)}}).start()

    def delete() -> None:
        for suffix in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")

    def back() -> None:
        ok = wait_for(lambda: path.exists() or store_reason(health(d)), DETECT, 0.1)
        assert ok, f"{path} was not written back, and /health says nothing: {health(d)}"

    run_fault(d, delete, back, refuses=False)


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_start_on_a_broken_store(mounts: Mounts, daemon_factory: Any, tmp_path: Path, fault: str) -> None:
    """Started on a store it cannot write: exit 1 with a plain message naming the store (no
    traceback), or serve with /health 503 until the fault clears."""
    sdir = tmp_path / "store"
    if fault == "full":
        mounts.tmpfs(sdir, "2m")
    else:
        sdir.mkdir()
    d = daemon_factory(cfg={**CFG, "store": {"path": str(sdir / "poold.db")}}).start()
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2
    assert d.stop() == 0
    filler = fill(sdir) if fault == "full" else None
    if fault == "read-only":
        mounts.read_only(sdir)
    d.start(wait=False)
    up = wait_for(lambda: not d.running() or _answers(d), 30, 0.1)
    assert up
    if not d.running():
        rc = d.wait_exit(5)
        log = d.logtext()
        # 2: refused by the configuration check (store.path cannot be written), 1: at opening
        assert rc in (1, 2), (rc, log)
        assert "Traceback" not in log, log
        assert str(sdir / "poold.db") in log, log
        return
    assert store_reason(health(d)), health(d)
    if filler is not None:
        filler.unlink()
    else:
        mounts.writable(sdir)
    assert wait_for(lambda: health(d).status == 200, DETECT, 0.2), health(d)
    assert d.run("tests.support.jobs:add", 2, 2)["result"] == 4


def _answers(d: Daemon) -> bool:
    try:
        health(d)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_store_fault_is_logged_plainly(
    mounts: Mounts, daemon_factory: Any, tmp_path: Path, fault: str
) -> None:
    """A store fault that lasts is a plain log line or two, not a traceback every round of the
    daemon's housekeeping (which is also cut short by it)."""
    sdir = tmp_path / "store"
    if fault == "full":
        mounts.tmpfs(sdir, "2m")
    else:
        sdir.mkdir()
    d = daemon_factory(cfg={**CFG, "store": {"path": str(sdir / "poold.db")}}).start()
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2
    offset = d.log.stat().st_size
    filler = fill(sdir) if fault == "full" else None
    if fault == "read-only":
        mounts.read_only(sdir)
    d.submit("tests.support.jobs:add", 1, 2, expect=(503,))
    time.sleep(3.0)  # six rounds of housekeeping (supervisor.interval = 0.5)
    if filler is not None:
        filler.unlink()
    else:
        mounts.writable(sdir)
    assert wait_for(lambda: health(d).status == 200, DETECT, 0.2), health(d)
    with open(d.log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    tracebacks = text.count("Traceback (most recent call last)")
    i = text.find("Traceback")
    assert tracebacks == 0, (
        f"{tracebacks} tracebacks logged in 3 s of the fault; the first:\n{text[max(0, i - 200) : i + 1500]}"
    )

"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a temp dir, a free
loopback port, removed afterwards. As root it runs as the `postgres` user (the server
refuses root). Where no PostgreSQL binaries are found, `available()` says why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)


def bindir() -> Path | None:
    if (env := os.environ.get("POOLD_PG_BIN")) and Path(env, "initdb").exists():
        return Path(env)
    for pattern in BIN_GLOBS:
        found = sorted(glob.glob(pattern), key=_version)
        for d in reversed(found):
            if Path(d, "initdb").exists():
                return Path(d)
    if (initdb := shutil.which("initdb")) is not None:
        return Path(initdb).parent
    return None


def _version(d: str) -> int:
    name = Path(d).parent.name
    return int(name) if name.isdigit() else 0


def available() -> str | None:
    """Why a server cannot be started here, or None when it can."""
    if bindir() is None:
        return "no PostgreSQL binaries (initdb) found; install postgresql or set POOLD_PG_BIN"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One server; `url(db)` to connect. stop()/start() keep the data (a database restart)."""

    def __init__(self) -> None:
        b = bindir()
        assert b is not None, available()
        self.bin = b
        self.dir = Path(tempfile.mkdtemp(prefix="poold-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
        subprocess.run([*self._as, str(self.bin / "initdb"), "-D", str(self.data), "-U", "poold",
                        "-A", "trust", "-E", "UTF8", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://poold@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [*self._as, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=128MB"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    pass
                r = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
                if r.returncode == 0:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("postgres did not start in time")

    def stop(self, fast: bool = True) -> None:
        """Stops the server (SIGINT: fast shutdown, connections cut; SIGQUIT otherwise)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if fast else signal.SIGQUIT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def fresh_schema() -> str:
    """A schema name no other test uses: each test gets its own tables in one server."""
    return "t" + uuid.uuid4().hex[:12]

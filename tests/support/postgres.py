"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a temp dir, a free
loopback port, removed afterwards. As root it runs as the `postgres` user (the server
refuses root). Where no PostgreSQL binaries are found, `available()` says why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
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
        self.running = False
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
        """Starts the server through pg_ctl, so it is no child of this process (tests check
        that nothing they started outlives them) and runs in a session of its own."""
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                " -c max_connections=200 -c shared_buffers=128MB")
        r = subprocess.run([*self._as, str(self.bin / "pg_ctl"), "start", "-D", str(self.data), "-w",
                            "-t", str(int(timeout)), "-l", str(self.dir / "server.log"), "-o", opts],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if r.returncode != 0:
            log = self.dir / "server.log"
            raise RuntimeError(f"postgres did not start: {r.stderr.decode(errors='replace')}"
                               f" {log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
        self.running = True

    def stop(self, fast: bool = True) -> None:
        """Stops the server ("fast": connections cut, as a crash or an operator's stop would)."""
        if not self.running:
            return
        subprocess.run([*self._as, str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-w",
                        "-m", "fast" if fast else "immediate", "-t", "30"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.running = False

    def remove(self) -> None:
        self.stop(fast=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def fresh_schema() -> str:
    """A schema name no other test uses: each test gets its own tables in one server."""
    return "t" + uuid.uuid4().hex[:12]

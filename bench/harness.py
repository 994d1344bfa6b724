"""Starts a real `poold serve` for a benchmark and talks to it over keep-alive HTTP."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Conn:
    """One kept-alive HTTP connection with JSON in and out."""

    def __init__(self, port: int) -> None:
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        self.c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = self.c.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)

    def close(self) -> None:
        self.c.close()


@contextlib.contextmanager
def daemon(workers: int, **extra: Any) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A daemon with `workers` workers, a store in a temp dir; always stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg: dict[str, dict[str, Any]] = {"server": {"port": port}, "pool": {"workers": workers},
               "jobs": {"allow": ["bench.jobs:*", "service.demo:*"], "max_queue": 2_000_000},
               "store": {"path": str(Path(tmp) / "bench.db")}, "log": {"level": "warning"}}
        for sec, vals in extra.items():
            cfg.setdefault(sec, {}).update(vals)
        lines = []
        for sec, vals in cfg.items():
            lines.append(f"[{sec}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in vals.items()]
        (Path(tmp) / "poold.toml").write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOLD_")}
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--config",
                                 str(Path(tmp) / "poold.toml")], env=env, cwd=tmp, start_new_session=True)
        try:
            c = Conn(port)
            end = time.monotonic() + 30
            while True:
                try:
                    if c.call("GET", "/health")[0] == 200 and all(
                            w["state"] == "idle" for w in c.call("GET", "/v1/workers")[1]["workers"]):
                        break
                except OSError:
                    c.close()
                if time.monotonic() > end:
                    raise RuntimeError("daemon did not start")
                time.sleep(0.05)
            c.close()
            yield port, proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM (the daemon drains), then SIGKILL to its whole session after 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def uss_mib(pid: int) -> dict[str, float]:
    """USS of the daemon and each process under it, in MiB."""
    root = psutil.Process(pid)
    out = {"daemon": root.memory_full_info().uss / 2**20}
    for p in root.children(recursive=True):
        try:
            name = " ".join(p.cmdline())
            role = name if name.startswith("poold:") else ("forkserver" if "forkserver" in name
                                                           else "resource_tracker")
            out[role] = p.memory_full_info().uss / 2**20
        except psutil.Error:
            pass
    return out

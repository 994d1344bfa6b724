"""Crash loop under load: no accepted job is lost when the daemon is SIGKILLed again and again.

    python -m bench.crashloop [--quick] [--restarts 20] [--submitters 32] [--workers 2] [--seed N]
    python -m bench.crashloop --cluster   # three hosts on one PostgreSQL: SIGKILL, SIGSTOP, database restart

Submitter threads (http.client, one keep-alive connection each) send single jobs and batches,
some with retries, some with idempotency keys (re-sent with the same key until answered), while
the daemon is SIGKILLed and started again on the same store. Every job is `bench.jobs:record`,
which appends one line per execution to a file, so executions can be counted and dated.

Afterwards: every job the daemon answered for (202, or 200 for a key) exists and is final (checked
again after one more clean restart); no execution started after the job's success was committed
(the Job's `finished_at`) nor after a client saw it succeeded; jobs with more retries than there
were kills succeeded; one job per idempotency key; `PRAGMA integrity_check` is ok; no process of
the daemon is left. Prints the figures; exits 1 when an invariant is broken.

`run()` and `report()` live in tests/support/crashloop.py, shared with
tests/e2e/test_reliability.py, which drives the test suite's `Daemon`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from bench.harness import REPO, free_port
from tests.support.crashloop import report, run

FINAL = ("succeeded", "failed", "timed_out", "cancelled")
TAG_VAR = "BENCH_CRASHLOOP_TAG"  # inherited by the daemon and all it starts: finds leftovers


class BenchDaemon:
    """A poold on a fixed port and store, SIGKILLed and started again by the crash loop."""

    def __init__(self, tmp: Path, workers: int, extra: dict[str, dict[str, Any]] | None = None) -> None:
        """`extra`: more configuration (a [store] url and a [cluster] table make it a cluster host)."""
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.port = free_port()
        self.store = str(tmp / "crashloop.db")
        self.log = tmp / "daemon.log"
        self.tag = uuid.uuid4().hex
        self.pids: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        cfg: dict[str, dict[str, Any]] = {
            "server": {"port": self.port, "max_body_bytes": 8 << 20},
            "pool": {"workers": workers},
            "jobs": {"allow": ["bench.jobs:*"], "max_queue": 1_000_000},
            "store": {"path": self.store},
            "supervisor": {"interval": 0.5, "kill_grace": 1.0, "shutdown_grace": 5.0},
            "log": {"level": "info"},
        }
        for sec, vals in (extra or {}).items():
            cfg.setdefault(sec, {}).update(vals)
        if cfg["store"].get("url"):
            self.store = cfg["store"]["url"]
        lines = []
        for sec, vals in cfg.items():
            lines.append(f"[{sec}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in vals.items()]
        self.config = tmp / "poold.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("POOLD_")
            and k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC")
        }
        self.env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), self.env.get("PYTHONPATH", "")) if x)
        self.env[TAG_VAR] = self.tag

    def start(self, timeout: float = 60) -> BenchDaemon:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--config", str(self.config)],
                env=self.env,
                cwd=str(self.tmp),
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids.append(self.proc.pid)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}; see {self.log}")
            if health(self.port) == 200:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"the daemon was not healthy within {timeout} s; see {self.log}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def leftovers(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if (
                    os.getsid(p.pid) in self.pids or p.environ().get(TAG_VAR) == self.tag
                ) and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (OSError, psutil.Error):
                pass
        return out

    def sweep(self) -> None:
        for p in self.leftovers():
            with contextlib.suppress(psutil.Error):
                p.kill()


class Cluster:
    """Three hosts on one PostgreSQL database; the crash loop's Controller. Submitters talk to
    the first; each "kill" is one disruption, in turn: a SIGKILL of one of the other two (it is
    started again at once), a SIGSTOP of one's main process for host_timeout + 1 s (its workers
    run on), or the database stopped for a second and started again."""

    KINDS = ("SIGKILL", "SIGSTOP", "database restart")

    def __init__(self, hosts: list[BenchDaemon], host_timeout: float, server: Any) -> None:
        self.hosts, self.host_timeout, self.server = hosts, host_timeout, server
        self.port, self.store = hosts[0].port, hosts[0].store
        self.round = 0
        self.victim: tuple[BenchDaemon, str] | None = None
        self.events: collections.Counter[str] = collections.Counter()

    def kill(self) -> None:
        if self.victim is None:  # one disruption at a time, in turn
            d = self.hosts[1 + self.round % 2]
            how = self.KINDS[self.round % 3]
            self.round += 1
            assert d.proc is not None
            if how == "SIGKILL":
                d.kill()
            elif how == "SIGSTOP":
                os.kill(d.proc.pid, signal.SIGSTOP)
            else:
                self.server.stop()
            self.victim = (d, how)
            self.events[how] += 1

    def start(self) -> Cluster:
        if self.victim is not None:
            d, how = self.victim
            self.victim = None
            if how == "SIGKILL":
                d.start()
            elif how == "SIGSTOP":
                time.sleep(self.host_timeout + 1.0)
                assert d.proc is not None
                os.kill(d.proc.pid, signal.SIGCONT)
            else:
                time.sleep(1.0)
                self.server.start()
            return self
        for d in self.hosts:
            if d.proc is None or d.proc.poll() is not None:
                d.start()
        return self

    def stop(self) -> int | None:
        for d in self.hosts:
            d.stop()
        return 0


def cluster_run(a: argparse.Namespace, tmp: Path) -> int:
    """The crash loop on three hosts sharing a throwaway PostgreSQL server."""
    from tests.support import postgres

    if (why := postgres.available()) is not None:
        print(f"bench.crashloop --cluster: {why}", file=sys.stderr)
        return 2
    server = postgres.PgServer()
    server.start()
    timing = {"heartbeat_interval": 0.5, "host_timeout": 2.0}
    store = {"url": server.url(), "schema": "crashloop"}
    hosts = [BenchDaemon(tmp / f"h{i + 1}", a.workers,
                         {"store": store, "cluster": {"name": f"h{i + 1}", **timing}}) for i in range(3)]
    ctl = Cluster(hosts, timing["host_timeout"], server)
    left: list[psutil.Process] = []
    try:
        ctl.start()
        res = run(ctl, record=str(tmp / "executions.log"), submitters=a.submitters, restarts=a.restarts,
                  seed=a.seed, say=lambda s: print(s, file=sys.stderr, flush=True),
                  # a run cut off ended by its host's lease at the latest (its workers watch it)
                  ended_by=timing["host_timeout"] - timing["heartbeat_interval"])
    except Exception:
        for d in hosts:
            print(d.log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        for d in hosts:
            d.stop()
        time.sleep(0.5)
        for d in hosts:
            left += d.leftovers()
            d.sweep()
        server.remove()
    print(f"three hosts, one PostgreSQL; disruptions in turn: {dict(ctl.events)}")
    print(report(res))
    print(f"processes left behind:            {len(left)}")
    return 0 if res.ok() and not left else 1


def health(port: int) -> int | None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/health")
        r = c.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        c.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.crashloop", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 restarts, 8 submitters")
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--submitters", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cluster", action="store_true",
                    help="three hosts on one PostgreSQL: the others SIGKILLed and SIGSTOPped in turn")
    a = ap.parse_args(argv)
    if a.quick:
        a.restarts, a.submitters = 5, 8
    if a.cluster:
        with tempfile.TemporaryDirectory(prefix="crashloop-") as tmp:
            return cluster_run(a, Path(tmp))
    with tempfile.TemporaryDirectory(prefix="crashloop-") as tmp:
        d = BenchDaemon(Path(tmp), a.workers)
        try:
            d.start()
            res = run(
                d,
                record=str(Path(tmp) / "executions.log"),
                submitters=a.submitters,
                restarts=a.restarts,
                seed=a.seed,
                say=lambda s: print(s, file=sys.stderr, flush=True),
            )
        except Exception:
            print(d.log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            d.stop()
            time.sleep(0.5)
            left = d.leftovers()
            d.sweep()
        print(report(res))
        print(f"processes left behind:            {len(left)}")
        return 0 if res.ok() and not left else 1


if __name__ == "__main__":
    sys.exit(main())

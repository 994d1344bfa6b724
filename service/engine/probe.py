"""The probe: a process of the pool that answers "does this function exist?".

`poold: main` never imports job code: a module may sleep, print, fork or
crash at import time, and none of that may slow, pollute or stop the daemon.
So a lookup runs here, in "<name>: probe", one at a time: a crash or a hang
is then plainly the current lookup's, and the probe is replaced for the next.
Its stdout and stderr go to /dev/null (import-time prints are nobody's log).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import types
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

from service.engine.lookup import NotFound, resolve
from service.engine.procs import supervisor

log = logging.getLogger("poold.probe")


class Verdict(NamedTuple):
    """What the probe found: ok, or why not (`status` 403 not allowed, 422 not found)."""

    ok: bool
    status: int = 0
    message: str = ""
    lasting: bool = True  # False for a timeout or a crash: worth asking again later


FOUND = Verdict(True)


def _init(title: str, lifeline: Any) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if lifeline is not None:  # EOF once the owner is gone, even by SIGKILL (see engine.worker)
        def watch() -> None:
            try:
                while True:
                    lifeline.recv_bytes()
            except (EOFError, OSError):
                pass
            os._exit(70)

        threading.Thread(target=watch, name="poold-lifeline", daemon=True).start()


def find(fn: str, wildcard: bool) -> Verdict:
    """Runs in the probe: imports fn's module and resolves it. `wildcard`: admitted by a
    "module:*" entry, which admits only public functions defined in that module itself."""
    mod = fn.partition(":")[0]
    try:
        obj = resolve(fn)
    except NotFound as e:
        return Verdict(False, 422, f"fn: {e}")
    if wildcard and (getattr(obj, "__module__", None) != mod
                     or not isinstance(obj, (types.FunctionType, types.BuiltinFunctionType))):
        return Verdict(False, 403, f"fn: {fn!r} is not a function defined in {mod} (jobs.allow admits"
                                   " those only)")
    if not callable(obj):
        return Verdict(False, 422, f"fn: {fn!r} is not callable")
    return FOUND


def _ready() -> int:
    return os.getpid()


class Probe:
    """Lookups in a process of their own, one at a time, each within `timeout` seconds."""

    def __init__(self, start_method: str, lifeline: Any = None, name: str = "poold",
                 timeout: float = 10.0) -> None:
        self._ctx = multiprocessing.get_context(start_method)
        self._title = f"{name}: probe"
        self._lifeline = lifeline
        self.timeout = timeout
        self._executor: ProcessPoolExecutor | None = None
        self._started: Future[int] | None = None  # the probe's first call: its pid once it runs
        self._lock = asyncio.Lock()
        self.pid: int | None = None

    def start(self) -> None:
        """Starts the probe process now, in the background: the first lookup need not wait for
        it (the daemon's first job after start-up or a reload)."""
        self._executor_now()

    def _executor_now(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(1, mp_context=self._ctx, initializer=_init,
                                                 initargs=(self._title, self._lifeline))
            self._started = self._executor.submit(_ready)  # starts the process: its pid is known now,
            procs = getattr(self._executor, "_processes", None) or {}  # so the sweep spares it
            self.pid = next(iter(procs), None)
        return self._executor

    async def find(self, fn: str, wildcard: bool) -> Verdict:
        """The verdict on fn; a lookup that crashes the probe or outlasts the timeout is a 422
        saying so (not cached by callers: the module may be fixed, or merely slow today)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        timed_out = Verdict(False, 422, f"fn: the lookup of {fn!r} timed out after {self.timeout:g} s"
                                        " (its module takes too long to import)", lasting=False)
        try:
            async with asyncio.timeout_at(deadline):
                await self._lock.acquire()
        except TimeoutError:
            return timed_out  # another lookup held the probe all this time
        try:
            executor = self._executor_now()
            assert self._started is not None
            if not self._started.done():
                self.pid = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._started)),
                                                  max(0.001, deadline - loop.time()))
            asked = asyncio.wrap_future(executor.submit(find, fn, wildcard))
            return await asyncio.wait_for(asked, max(0.001, deadline - loop.time()))
        except TimeoutError:
            self.replace()
            return timed_out
        except BrokenProcessPool:
            how = self._exit()
            self.replace()
            return Verdict(False, 422, f"fn: importing the module of {fn!r} crashed the worker"
                                       f" that looked it up ({how})", lasting=False)
        finally:
            self._lock.release()

    def _exit(self) -> str:
        procs = getattr(self._executor, "_processes", None) or {}
        for p in list(procs.values()):
            p.join(1.0)
            return supervisor.describe_exit(p.exitcode)
        return "it died"

    def replace(self) -> None:
        """Drops the probe (its imports with it); the next lookup starts a fresh one."""
        executor, self._executor, self._started = self._executor, None, None
        pid, self.pid = self.pid, None
        if pid is not None:
            supervisor.kill_tree(pid, grace=0.0)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> set[int]:
        return {self.pid} if self.pid is not None else set()

    def close(self) -> None:
        self.replace()

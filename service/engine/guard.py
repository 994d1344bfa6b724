"""What keeps a worker from outliving its parent or leaving a job's processes behind.

Runs inside workers: the standard library only, psutil where it is needed on the way out.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

_forked = [False]  # the running job forked (os.fork, multiprocessing): see end_children


def set_parent_death_signal() -> None:
    """SIGKILL when the parent dies (covers "spawn" and "fork", where the parent is the owner).

    The worker is also a subreaper: what a job forks and orphans re-parents here, so at the
    job's end this worker alone can end it (see end_children)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
    os.register_at_fork(after_in_parent=_note_fork)


def _note_fork() -> None:
    _forked[0] = True


def forked() -> bool:
    return _forked[0]


def child_pids() -> list[int]:
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids


def end_children(patience: float = 0.05, limit: float = 2.0) -> None:
    """Ends what a job left running, here and now: SIGTERM at first sight, SIGKILL once
    `patience` is spent, reaping as it goes, until no child is left.

    A forked (not exec'd) process has no job tag the daemon can read in /proc, and one that keeps
    replacing itself by a fresh fork lives a millisecond: too quick for the daemon's sweep. As a
    subreaper this worker inherits each of them, one job at a time, so all it has are the ended
    job's. The daemon leaves what a job started with subprocess (it carries the job's tag) to its
    sweep, with its grace; an embedded pool, which has no sweep, ends those here too.
    """
    _forked[0] = False
    seen: dict[int, float] = {}
    start = time.monotonic()
    while (now := time.monotonic()) - start < limit:
        _reap()
        pids = child_pids()
        if not pids:
            return
        for pid in pids:
            first = seen.setdefault(pid, now)
            if first == now:
                sig = signal.SIGTERM
            elif now - first >= patience:
                sig = signal.SIGKILL
            else:
                continue
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(0.0005)


def _reap() -> None:
    """Collects the exit status of children that ended (the job is over: none is its to wait for)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def watch_owner(lifeline: Any) -> None:
    """A thread that ends this worker and everything it started once the owner is gone.

    The owner (the daemon, or the program of an embedded pool) holds the only write end of the
    lifeline pipe, so EOF here means it died, even by SIGKILL (PR_SET_PDEATHSIG cannot tell under
    forkserver, where the parent is the forkserver)."""
    threading.Thread(target=_watch, args=(lifeline,), name="poold-lifeline", daemon=True).start()


def _watch(lifeline: Any) -> None:
    try:
        while True:
            lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    _kill_descendants()
    os._exit(70)


def _kill_descendants() -> None:
    """Kills what this worker started, and everything else that carries the owner's instance
    tag (detached grandchildren of any job, the forkserver, the other workers)."""
    try:
        import psutil

        from service.engine.procs import supervisor

        doomed = psutil.Process().children(recursive=True)
        tag = os.environ.get(supervisor.INSTANCE_VAR)
        if tag:
            doomed += supervisor.tagged(tag)
        for p in reversed(doomed):
            try:
                p.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001 - best effort on the way out, nothing to report to
        pass

"""Process trees: kill them, find orphans, end a previous instance's leftovers.

The daemon is a child subreaper (PR_SET_CHILD_SUBREAPER), so what a job
detaches (double fork, setsid) re-parents to the daemon instead of PID 1,
where `find_orphans` sees it. Processes are known by pid *and* create time,
never by a name match.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

import psutil

log = logging.getLogger("poold.supervisor")

_PR_SET_CHILD_SUBREAPER = 36


def set_subreaper() -> bool:
    """Makes orphaned descendants re-parent to this process (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def describe_exit(code: int | None) -> str:
    """'was sent SIGKILL' for a death by signal, 'exited with code N' otherwise."""
    if code is None:
        return "died (exit status unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was sent {name}"
    return f"exited with code {code}"


def _tree(pid: int) -> list[psutil.Process]:
    """pid's descendants (deepest last) followed by pid itself."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return []
    try:
        kids = root.children(recursive=True)
    except psutil.Error:
        kids = []
    return [*kids, root]


def kill_trees(pids: list[int], grace: float) -> None:
    """Ends each pid with all it started: SIGTERM (unless grace is 0), SIGKILL after grace, reap."""
    procs: list[psutil.Process] = []
    for pid in pids:
        procs.extend(_tree(pid))
    _end(procs, grace)


def kill_tree(pid: int, grace: float = 0.0) -> None:
    kill_trees([pid], grace)


def _end(procs: list[psutil.Process], grace: float) -> None:
    if not procs:
        return
    first = signal.SIGTERM if grace > 0 else signal.SIGKILL
    for p in reversed(procs):  # leaves first
        try:
            p.send_signal(first)
        except psutil.Error:
            pass
    if grace > 0:
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        procs = alive
    psutil.wait_procs(procs, timeout=1.0)  # reaps those that are our own children


def reap_children(skip: set[int] | None = None) -> None:
    """Collects exit statuses of our dead children that nobody else waits for (zombies)."""
    try:
        kids = psutil.Process().children()
    except psutil.Error:
        return
    for p in kids:
        if skip and p.pid in skip:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError, OSError):
            pass


def find_orphans(known: set[int], idle_workers: list[int]) -> list[psutil.Process]:
    """Processes that outlived their job: children of the daemon it does not know (re-parented
    detached grandchildren), and children of idle workers."""
    found: list[psutil.Process] = []
    try:
        for p in psutil.Process().children():
            if p.pid not in known:
                found.append(p)
    except psutil.Error:
        pass
    for pid in idle_workers:
        try:
            found.extend(psutil.Process(pid).children())
        except psutil.Error:
            pass
    return [p for p in found if _alive(p)]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def identity(pid: int) -> tuple[int, float] | None:
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def end_previous(recorded: list[tuple[int, float, str]], grace: float) -> int:
    """Ends what a previous instance recorded, if the same processes (pid and create time) live."""
    procs = []
    for pid, ctime, role in recorded:
        if pid == os.getpid():
            continue
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ctime) < 0.01 and _alive(p):
                log.warning("ending %s (pid %d) left by a previous instance", role, pid)
                procs.extend(_tree(pid))
        except psutil.Error:
            continue
    _end(procs, grace)
    return len(procs)


def sweep(procs: list[psutil.Process], grace: float) -> None:
    """Ends leftover processes (with their own children), logging each."""
    tree: list[psutil.Process] = []
    for p in procs:
        try:
            log.warning("ending leftover process %d (%s)", p.pid, " ".join(p.cmdline())[:80])
        except psutil.Error:
            continue
        tree.extend(_tree(p.pid))
    _end(tree, grace)

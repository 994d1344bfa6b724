"""Process trees: kill them, reap them; this instance's tag and a previous instance's leftovers.

The daemon is a child subreaper (PR_SET_CHILD_SUBREAPER), so what a job
detaches (double fork, setsid) re-parents to the daemon instead of PID 1,
where service.engine.procs.leftovers looks. Processes are known by pid *and* create
time, never by a name match.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

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


def tree(pid: int) -> list[psutil.Process]:
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
        procs.extend(tree(pid))
    end(procs, grace)


def kill_tree(pid: int, grace: float = 0.0) -> None:
    kill_trees([pid], grace)


def end(procs: list[psutil.Process], grace: float) -> None:
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
    wait_gone(procs, 1.0)


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Waits until each process is dead (reaped if it is our child; a zombie another process
    must reap counts as dead: it runs nothing). Returns those still alive after `timeout`."""
    end = time.monotonic() + timeout
    delay = 0.0005
    while True:
        _, procs = psutil.wait_procs(procs, timeout=0)  # reaps those that are our own children
        procs = [p for p in procs if alive(p)]
        if not procs or time.monotonic() >= end:
            return procs
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def reap_children(skip: set[int] | None = None) -> None:
    """Collects exit statuses of our dead children that nobody else waits for (zombies).

    Peeks with waitid(WNOWAIT) and reaps only what is not in `skip` (multiprocessing's helpers,
    whose statuses it reads itself): no scan of /proc, which costs tens of milliseconds a round
    on some hosts and steals them from CPU-bound jobs.
    """
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or (skip and info.si_pid in skip):
            return
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


def children(pid: int) -> list[psutil.Process]:
    """pid's children from /proc/PID/task/*/children (cheap), else through psutil."""
    pids = child_pids(pid)
    if not pids and not os.path.exists(f"/proc/{pid}/task"):
        try:
            return psutil.Process(pid).children()
        except psutil.Error:
            return []
    return procs(pids)


def procs(pids: list[int]) -> list[psutil.Process]:
    """psutil handles for those of `pids` that still exist."""
    out = []
    for c in pids:
        try:
            out.append(psutil.Process(c))
        except psutil.Error:
            pass
    return out


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def identity(pid: int) -> tuple[int, float] | None:
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None


INSTANCE_VAR = "POOLD_INSTANCE"  # not an override: "instance" names no section


def instance_tag(pid: int, ctime: float) -> str:
    return f"{pid}-{ctime:.3f}"


def tag_instance() -> str:
    """Marks this daemon's environment, inherited by every process it starts (exec'd or not,
    detached or not), so that what it leaves behind can be found by that mark alone."""
    ident = identity(os.getpid())
    tag = instance_tag(*ident) if ident else f"{os.getpid()}-0"
    os.environ[INSTANCE_VAR] = tag
    return tag


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes (other than this one) that carry the instance tag."""
    out = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(INSTANCE_VAR) == tag and alive(p):
                out.append(p)
        except psutil.Error:
            continue
    return out


def end_tagged(tag: str, grace: float, spare: set[int] | None = None) -> None:
    """Ends every process carrying the instance tag (with what they started), but `spare`."""
    procs = [p for p in tagged(tag) if not spare or p.pid not in spare]
    for p in procs:
        log.warning("ending leftover process %d at shutdown", p.pid)
    end([q for p in procs for q in tree(p.pid)], grace)


def running_daemon(recorded: list[tuple[int, float, str]]) -> int | None:
    """The pid of a recorded daemon that still runs (the store is in use), else None."""
    for pid, ctime, role in recorded:
        if role == "daemon" and pid != os.getpid() and _same(pid, ctime):
            return pid
    return None


def _same(pid: int, ctime: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - ctime) < 0.01 and alive(p)
    except psutil.Error:
        return False


def end_previous(recorded: list[tuple[int, float, str]], grace: float) -> int:
    """Ends what a previous (dead) instance left: the processes it recorded (same pid and create
    time) and every process carrying its instance tag (detached grandchildren included)."""
    procs: list[psutil.Process] = []
    for pid, ctime, role in recorded:
        if role == "daemon":
            procs += tagged(instance_tag(pid, ctime))
        elif _same(pid, ctime):
            procs += tree(pid)
    unique = list({p.pid: p for p in procs}.values())
    for p in unique:
        log.warning("ending process %d left by a previous instance", p.pid)
    end(unique, grace)
    return len(unique)


def child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids


def stop_helpers() -> None:
    """Ends multiprocessing's forkserver and resource tracker, so no process outlives the daemon.

    Each is told to stop (its pipe closed); one that a leftover keeps alive (a process holding a
    copy of that pipe) gets SIGKILL after a second rather than hanging the shutdown."""
    from multiprocessing import forkserver, resource_tracker

    for obj, attr in ((getattr(forkserver, "_forkserver", None), "_forkserver_pid"),
                      (getattr(resource_tracker, "_resource_tracker", None), "_pid")):
        pid = getattr(obj, attr, None)
        stop = getattr(obj, "_stop", None)
        if stop is None:
            continue
        if isinstance(pid, int):
            killer = threading.Timer(1.0, kill_quietly, (pid,))
            killer.daemon = True
            killer.start()
        try:
            stop()
        except (OSError, AttributeError):
            pass
        if isinstance(pid, int):
            killer.cancel()


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def oom_kills() -> int:
    """How many processes the kernel's OOM killer has ended since boot (0 where unknown)."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def multiprocessing_helpers() -> set[int]:
    """Processes of multiprocessing itself (forkserver, resource tracker), and this one."""
    from multiprocessing import forkserver, resource_tracker

    pids: set[int] = set()
    for obj, attr in ((getattr(forkserver, "_forkserver", None), "_forkserver_pid"),
                      (getattr(resource_tracker, "_resource_tracker", None), "_pid")):
        pid = getattr(obj, attr, None)
        if isinstance(pid, int):
            pids.add(pid)
    return pids | {os.getpid()}

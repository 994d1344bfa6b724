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


_SLACK = 0.05  # create times are kept in clock ticks: allow for their rounding


JOB_VAR = "POOLD_JOB_ID"  # set in a worker's environment for each job: exec'd children carry it
_JOB_PREFIX = f"{JOB_VAR}=".encode()


def job_of(p: psutil.Process) -> str | None:
    """The job a process was started by, when its environment says so."""
    try:
        return p.environ().get(JOB_VAR)
    except psutil.Error:
        return None


def _owned(p: psutil.Process, running: dict[str, float], since: float | None) -> bool:
    """May p belong to a job that still runs? By its job tag when it has one; else by age: a
    process younger than a running job (`since`: that job's start) may be that job's."""
    owner = job_of(p)
    if owner is not None:
        return owner in running
    return _young(p, since)


def find_leftovers(known: set[int], workers: dict[int, str | None],
                   running: dict[str, float]) -> list[psutil.Process]:
    """Processes that outlived their job.

    - children of the daemon it does not know: detached grandchildren that re-parented here,
      unless they may belong to a job that still runs (`running`: job id -> start time);
    - children of a worker (`workers`: pid -> the job it runs now, or None) that are not the
      running job's.
    """
    found: list[psutil.Process] = []
    earliest = min(running.values(), default=None)
    for p in children(os.getpid()):
        if p.pid not in known and not _owned(p, running, earliest):
            found.append(p)
    for pid, jid in workers.items():
        mine = {jid: running[jid]} if jid in running else {}
        found += [p for p in children(pid) if not _owned(p, mine, mine.get(jid or ""))]
    return [p for p in found if _alive(p)]


def orphans_of(known: set[int], jid: str, since: float, others: dict[str, float]) -> list[psutil.Process]:
    """Detached processes of one job (ending now): by its tag, or else started after it began
    and too old to belong to any other running job."""
    out = []
    earliest = min(others.values(), default=None)
    for p in children(os.getpid()):
        if p.pid in known or not _alive(p):
            continue
        owner = job_of(p)
        if owner == jid or (owner is None and _young(p, since) and not _young(p, earliest)):
            out.append(p)
    return out


def _young(p: psutil.Process, since: float | None) -> bool:
    """True when p started after `since` (so may belong to the job that started then)."""
    if since is None:
        return False
    try:
        return p.create_time() + _SLACK >= since
    except psutil.Error:
        return False


def children(pid: int) -> list[psutil.Process]:
    """pid's children from /proc/PID/task/*/children (cheap), else through psutil."""
    pids = _child_pids(pid)
    if not pids and not os.path.exists(f"/proc/{pid}/task"):
        try:
            return psutil.Process(pid).children()
        except psutil.Error:
            return []
    out = []
    for c in pids:
        try:
            out.append(psutil.Process(c))
        except psutil.Error:
            pass
    return out


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
            if p.environ().get(INSTANCE_VAR) == tag and _alive(p):
                out.append(p)
        except psutil.Error:
            continue
    return out


def end_tagged(tag: str, grace: float, spare: set[int] | None = None) -> None:
    """Ends every process carrying the instance tag (with what they started), but `spare`."""
    procs = [p for p in tagged(tag) if not spare or p.pid not in spare]
    for p in procs:
        log.warning("ending leftover process %d at shutdown", p.pid)
    _end([q for p in procs for q in _tree(p.pid)], grace)


def running_daemon(recorded: list[tuple[int, float, str]]) -> int | None:
    """The pid of a recorded daemon that still runs (the store is in use), else None."""
    for pid, ctime, role in recorded:
        if role == "daemon" and pid != os.getpid() and _same(pid, ctime):
            return pid
    return None


def _same(pid: int, ctime: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - ctime) < 0.01 and _alive(p)
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
            procs += _tree(pid)
    unique = list({p.pid: p for p in procs}.values())
    for p in unique:
        log.warning("ending process %d left by a previous instance", p.pid)
    _end(unique, grace)
    return len(unique)


def sweep(procs: list[psutil.Process], grace: float, jobs: set[str] | None = None,
          parents: tuple[int, ...] = ()) -> None:
    """Ends leftover processes (with their own children), logging each; then chases what the
    same jobs (and `jobs`) keep starting, among this daemon's children and `parents`' (workers)."""
    tree: list[psutil.Process] = []
    chased = set(jobs or ())
    for p in procs:
        try:
            log.warning("ending leftover process %d (%s)", p.pid, " ".join(p.cmdline())[:80])
        except psutil.Error:
            continue
        if (jid := job_of(p)) is not None:
            chased.add(jid)
        tree.extend(_tree(p.pid))
    _end(tree, grace)
    if chased:
        n = chase(chased, 0.0 if tree else grace, (os.getpid(), *parents))
        if n:
            log.warning("ended %d short-lived leftover processes of job(s) %s", n, ", ".join(sorted(chased)))


def stray_jobs(known: set[int], running: set[str], parents: tuple[int, ...]) -> set[str]:
    """Ended jobs whose processes still run as children of this daemon or of `parents` (workers).
    A raw scan of /proc: quick enough to see a process that lives a millisecond (one that keeps
    replacing itself by a fork)."""
    out = set()
    for pid in (c for parent in (os.getpid(), *parents) for c in _child_pids(parent)):
        if pid not in known and (jid := _job_var(pid)) is not None and jid not in running:
            out.add(jid)
    return out


def _job_var(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(_JOB_PREFIX):
            return item[len(_JOB_PREFIX):].decode("utf-8", "replace")
    return None


def chase(jobs: set[str], grace: float, parents: tuple[int, ...], quiet: float = 0.05,
          limit: float = 3.0) -> int:
    """Signals the children of `parents` (this daemon, its workers) that carry one of `jobs`
    (ended jobs) as fast as they appear, until none has for `quiet` seconds; returns how many.

    A process that keeps replacing itself by a fresh fork lives a millisecond: a sweep only ever
    finds its dead predecessor, whose successor re-parents to the nearest subreaper. Each gets
    SIGTERM while the jobs' grace lasts, SIGKILL after. A raw kill by pid is safe enough: a child
    keeps its pid until its parent reaps it.
    """
    hit: set[int] = set()
    start = last = time.monotonic()
    while (now := time.monotonic()) - last < quiet and now - start < grace + limit:
        sig = signal.SIGTERM if now - start < grace else signal.SIGKILL
        for pid in (c for parent in parents for c in _child_pids(parent)):
            if _job_var(pid) not in jobs:
                continue
            last = time.monotonic()
            if sig == signal.SIGTERM and pid in hit:
                continue
            try:
                os.kill(pid, sig)
                hit.add(pid)
            except OSError:
                pass
        time.sleep(0.0005)
    return len(hit)


def _child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids

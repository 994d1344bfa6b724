"""Leftovers: processes that outlived the job that started them, found and ended.

A job's processes say whose they are by `POOLD_JOB_ID` in their environment
(exec'd ones; a forked one shows the environment of its last exec), else by
age: a process younger than a running job may be that job's. The daemon and
the workers are subreapers, so what a job detaches re-parents to one of them,
where these scans look. Workers end what a forking job left at its end
(service.engine.worker); what remains is found here, on the periodic sweep.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import psutil

from service.engine.procs.supervisor import alive, child_pids, children, end, procs, tree

log = logging.getLogger("poold.supervisor")


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


def child_map(parents: tuple[int, ...]) -> dict[int, list[int]]:
    """The children of this daemon and of `parents` (workers), read once for a whole round."""
    return {pid: child_pids(pid) for pid in (os.getpid(), *parents)}


def find_leftovers(known: set[int], workers: dict[int, str | None], running: dict[str, float],
                   kids: dict[int, list[int]] | None = None) -> list[psutil.Process]:
    """Processes that outlived their job.

    - children of the daemon it does not know: detached grandchildren that re-parented here,
      unless they may belong to a job that still runs (`running`: job id -> start time);
    - children of a worker (`workers`: pid -> the job it runs now, or None) that are not the
      running job's.

    `kids` (child_map) saves reading the children again.
    """
    kids = kids if kids is not None else child_map(tuple(workers))
    found: list[psutil.Process] = []
    earliest = min(running.values(), default=None)
    for p in procs([c for c in kids.get(os.getpid(), []) if c not in known]):
        if not _owned(p, running, earliest):
            found.append(p)
    for pid, jid in workers.items():
        mine = {jid: running[jid]} if jid in running else {}
        found += [p for p in procs(kids.get(pid, [])) if not _owned(p, mine, mine.get(jid or ""))]
    return [p for p in found if alive(p)]


def orphans_of(known: set[int], jid: str, since: float, others: dict[str, float]) -> list[psutil.Process]:
    """Detached processes of one job (ending now): by its tag, or else started after it began
    and too old to belong to any other running job."""
    out = []
    earliest = min(others.values(), default=None)
    for p in children(os.getpid()):
        if p.pid in known or not alive(p):
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


def sweep(procs: list[psutil.Process], grace: float, jobs: set[str] | None = None,
          parents: tuple[int, ...] = ()) -> None:
    """Ends leftover processes (with their own children), logging each; then chases what the
    same jobs (and `jobs`) keep starting, among this daemon's children and `parents`' (workers)."""
    doomed: list[psutil.Process] = []
    chased = set(jobs or ())
    for p in procs:
        try:
            log.warning("ending leftover process %d (%s)", p.pid, " ".join(p.cmdline())[:80])
        except psutil.Error:
            continue
        if (jid := job_of(p)) is not None:
            chased.add(jid)
        doomed.extend(tree(p.pid))
    end(doomed, grace)
    if chased:
        n = chase(chased, 0.0 if doomed else grace, (os.getpid(), *parents))
        if n:
            log.warning("ended %d short-lived leftover processes of job(s) %s", n, ", ".join(sorted(chased)))


def stray_jobs(known: set[int], running: set[str], kids: dict[int, list[int]]) -> set[str]:
    """Ended jobs whose processes still run as children of this daemon or of its workers (`kids`:
    child_map). A raw scan of /proc: quick enough to see a process that lives a millisecond (one
    that keeps replacing itself by a fork)."""
    out = set()
    for pid in (c for pids in kids.values() for c in pids):
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
        for pid in (c for parent in parents for c in child_pids(parent)):
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

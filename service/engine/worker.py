"""What runs inside a worker process ("poold: worker N").

Kept free of aiohttp and the daemon's modules so that workers stay small.
A worker gets jobs in batches (one executor call for several short jobs) and
reports each job's start, progress and outcome over its own pipe as it goes,
so a batch cut short by a kill loses nothing that already finished. The
results are JSON text made here, once: the daemon stores them as they are.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import threading
import time
import traceback
from typing import Any

from service.engine import output
from service.engine.ledger import Writer as _Ledger
from service.progress import channel as _channel
from service.progress import flush as _flush_progress

# a job's tuple: (id, fn, args JSON, kwargs JSON, seq, attempts before this one); the arguments are
# decoded here, in parallel, not in the daemon
JobTuple = tuple[str, str, str, str, int, int]

_events: Any = None  # multiprocessing Connection: worker -> daemon
_control: Any = None  # multiprocessing Connection: daemon -> worker (cancelled ids)
_cancelled: set[str] = set()
_lifeline: list[Any] = []  # the read end of the daemon's lifeline pipe: readable (EOF) once it died
_functions: dict[str, Any] = {}
_ledger = _Ledger(None)  # where this worker notes each start before it makes it (service.engine.ledger)
_JOB_VAR = "POOLD_JOB_ID"  # service.engine.procs.leftovers.JOB_VAR (not imported: workers stay small)


def init(slot: int, events: Any, control: Any, lifeline: Any, preload: tuple[str, ...],
         close_fds: tuple[int, ...], ledger: str | None = None, label_output: bool = True) -> None:
    """Executor initializer: title, signal policy, death watch, preload.

    `close_fds` are the daemon's own pipe ends that a forked (start method
    "fork") worker inherits and must not keep open.
    """
    global _events, _control, _ledger
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _set_parent_death_signal()
    try:
        import setproctitle

        title = f"poold: worker {slot}"
        setproctitle.setproctitle(title)

        def retitle() -> None:
            """A process a job forks (os.fork, a fork-started multiprocessing child) is not this
            worker: `ps` shows one "poold: worker N" per slot. A title the job set is kept."""
            if setproctitle.getproctitle() == title:
                setproctitle.setproctitle(f"poold: job child (worker {slot})")

        os.register_at_fork(after_in_child=retitle)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    # The daemon decides when a worker ends; a Ctrl-C in the terminal must not kill jobs mid-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _events, _control = events, control
    if label_output:  # a job's prints name it in the daemon's log (service.engine.output)
        output.label(lambda: f"job {_channel.job_id}" if _channel.job_id else f"worker {slot}")
    _ledger = _Ledger(ledger)
    _lifeline.append(lifeline)
    _channel.send = events.send
    threading.Thread(target=_watch_daemon, args=(lifeline,), name="poold-lifeline", daemon=True).start()
    for mod in preload:
        importlib.import_module(mod)


def _set_parent_death_signal() -> None:
    """SIGKILL when the parent dies (covers "spawn" and "fork", where the parent is the daemon).

    The worker is also a subreaper: what a job forks and orphans re-parents here, so at the
    job's end this worker alone can end it (see _end_forked)."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
    os.register_at_fork(after_in_parent=_note_fork)


_forked = [False]  # the running job forked (os.fork, multiprocessing): see _end_forked


def _note_fork() -> None:
    _forked[0] = True


def _end_forked(patience: float = 0.05, limit: float = 2.0) -> None:
    """Ends what a job that forked left running, here and now: SIGTERM at first sight, SIGKILL
    once `patience` is spent, reaping as it goes, until no child is left.

    A forked (not exec'd) process has no job tag the daemon can read in /proc, and one that keeps
    replacing itself by a fresh fork lives a millisecond: too quick for the daemon's sweep. As a
    subreaper this worker inherits each of them, one job at a time, so all it has are the ended
    job's. What a job started without forking from Python (subprocess) carries its job tag and is
    left to the daemon's sweep, with its grace.
    """
    from service.engine.procs.supervisor import child_pids  # only jobs that fork come here

    _forked[0] = False
    seen: dict[int, float] = {}
    start = time.monotonic()
    while (now := time.monotonic()) - start < limit:
        _reap()
        pids = child_pids(os.getpid())
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


def _watch_daemon(lifeline: Any) -> None:
    """Ends this worker and everything it started once the daemon is gone.

    The daemon holds the only write end of the lifeline pipe, so EOF here means
    the daemon died, even by SIGKILL (PR_SET_PDEATHSIG cannot tell under
    forkserver, where the parent is the forkserver).
    """
    try:
        while True:
            lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    _kill_descendants()
    os._exit(70)


def _kill_descendants() -> None:
    """Kills what this worker started, and everything else that carries the daemon's instance
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


def hello() -> tuple[int, float]:
    """The first call on a new worker: its pid, once it is ready for jobs."""
    return os.getpid(), time.time()


def _resolve(fn: str) -> Any:
    f = _functions.get(fn)
    if f is None:
        mod, _, name = fn.partition(":")
        obj: Any = importlib.import_module(mod)
        for part in name.split("."):
            obj = getattr(obj, part)
        f = _functions[fn] = obj
    return f


def _error(kind: str, message: str, exc: BaseException | None = None) -> dict[str, Any]:
    tb = None
    if exc is not None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"type": kind, "message": message, "exception": type(exc).__name__ if exc else None,
            "traceback": tb}


def _run_one(job: JobTuple, max_result_bytes: int) -> tuple[str, Any]:
    """Runs one job; ("ok", result JSON text) or ("error", error dict)."""
    _, fn, args, kwargs, _, _ = job
    try:
        result = _resolve(fn)(*json.loads(args), **json.loads(kwargs))
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return "error", _error("exception", f"{type(e).__name__}: {e}", e)
    finally:
        _flush_progress()
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        return "error", _error("unserializable_result",
                               f"the result of type {type(result).__name__} is not JSON: {e}")
    if len(text) > max_result_bytes:
        return "error", _error("result_too_large",
                               f"the result is {len(text)} bytes, more than jobs.max_result_bytes"
                               f" ({max_result_bytes})")
    return "ok", text


def _rss_mb() -> float:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _take_cancels() -> None:
    while _control.poll():
        _cancelled.update(_control.recv())


def run_batch(jobs: list[JobTuple], max_result_bytes: int, max_memory_mb: int) -> int:
    """Runs jobs in order, reporting each; stops early when over max_memory_mb. Returns jobs run.

    One message per job: ("start", id, t) for the first, then ("done", id, kind, payload,
    seconds, next id, next start time) — a job's end and the next one's start travel together.
    """
    send = _events.send
    done = 0
    ended: tuple[Any, ...] | None = None
    daemon_gone = _lifeline[0].poll if _lifeline else (lambda: False)
    for job in jobs:
        if daemon_gone():  # EOF on the lifeline: the daemon is gone, start nothing more
            break
        _take_cancels()
        jid = job[0]
        if jid in _cancelled:
            _cancelled.discard(jid)
            continue
        now = time.time()
        _ledger.mark(job[4], job[5], now)  # before anyone can know it started: see service.engine.ledger
        if ended is None:
            send(("start", jid, now))
        else:
            send((*ended, jid, now))
            ended = None
        _channel.job_id = jid
        os.environ[_JOB_VAR] = jid  # what the job starts carries it: its leftovers can be told apart
        t = time.perf_counter()
        try:
            kind, payload = _run_one(job, max_result_bytes)
        finally:
            output.flush()
            _channel.job_id = None
        ended = ("done", jid, kind, payload, time.perf_counter() - t)
        if _forked[0]:
            _end_forked()
        done += 1
        if max_memory_mb and _rss_mb() > max_memory_mb:
            break
    if ended is not None:
        send((*ended, None, 0.0))
    return done

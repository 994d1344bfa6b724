"""What runs inside a worker process ("<name>: worker N").

Kept free of aiohttp and the daemon's modules so that workers stay small.
A worker gets jobs in batches (one executor call for several short jobs) and
reports each job's start, progress and outcome over its own pipe as it goes
(service.engine.protocol), so a batch cut short by a kill loses nothing that
already finished. A daemon job's result is JSON text made here, once (the
store keeps it as it is); an embedded pool's call comes and goes pickled.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from typing import Any

from service.engine import guard, lease, output
from service.engine.ledger import Writer as _Ledger
from service.engine.lookup import NotFound, resolve
from service.engine.pickled import PROTOCOL, dump_exception
from service.engine.protocol import (
    ERROR,
    OK,
    RAISED,
    Done,
    Job,
    JsonJob,
    Progress,
    Started,
    WorkerSetup,
    encode,
)
from service.model import ErrorType, job_error
from service.progress import channel as _channel
from service.progress import flush as _flush_progress

_events: Any = None  # multiprocessing Connection: worker -> parent
_control: Any = None  # multiprocessing Connection: parent -> worker (ids not to start)
_cancelled: set[str] = set()
_lifeline: list[Any] = []  # the read end of the owner's lifeline pipe: readable (EOF) once it died
_lease: list[Any] = []  # a cluster host's lease (service.engine.lease), when it keeps one
_functions: dict[str, Any] = {}
_ledger = _Ledger(None)  # where this worker notes each start before it makes it (service.engine.ledger)
_setup = WorkerSetup(0)
_JOB_VAR = "POOLD_JOB_ID"  # service.engine.procs.leftovers.JOB_VAR (not imported: workers stay small)
_QUICK = 50e-6  # a call shorter than this started no process: no need to look for leftovers


def init(setup: WorkerSetup, events: Any, control: Any, lifeline: Any, lease_value: Any = None) -> None:
    """Executor initializer: title, signal policy, death watch, preload."""
    global _events, _control, _ledger, _setup
    _setup = setup
    for fd in setup.close_fds:  # the parent's pipe ends a fork-started worker inherited
        try:
            os.close(fd)
        except OSError:
            pass
    guard.set_parent_death_signal()
    _set_title(f"{setup.name}: worker {setup.slot}", f"{setup.name}: job child (worker {setup.slot})")
    # The owner decides when a worker ends; a Ctrl-C in the terminal must not kill jobs mid-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _events, _control = events, control
    if setup.label_output:  # a job's prints name it in the daemon's log (service.engine.output)
        output.label(lambda: f"job {_channel.job_id}" if _channel.job_id else f"worker {setup.slot}")
    _ledger = _Ledger(setup.ledger)
    _lifeline.append(lifeline)
    send = events.send
    _channel.send = lambda msg: send(encode(Progress(msg[1], *msg[2])))
    guard.watch_owner(lifeline)
    if lease_value is not None:
        _lease.append(lease_value)
        lease.watch(lease_value, lambda: _channel.job_id)
    for mod in setup.preload:
        __import__(mod)


def _set_title(title: str, child_title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a declared dependency
        return
    setproctitle.setproctitle(title)

    def retitle() -> None:
        """A process a job forks (os.fork, a fork-started multiprocessing child) is not this
        worker: `ps` shows one worker title per slot. A title the job set is kept."""
        if setproctitle.getproctitle() == title:
            setproctitle.setproctitle(child_title)

    os.register_at_fork(after_in_child=retitle)


def hello() -> tuple[int, float]:
    """The first call on a new worker: its pid, once it is ready for jobs."""
    return os.getpid(), time.time()


def _resolve(fn: str) -> Any:
    f = _functions.get(fn)
    if f is None:
        f = _functions[fn] = resolve(fn)
    return f


def _run_json(job: JsonJob, max_result_bytes: int) -> tuple[str, Any]:
    """A daemon job: (OK, result JSON text) or (ERROR, error dict)."""
    try:
        f = _resolve(job.fn)
    except NotFound as e:
        return ERROR, job_error(ErrorType.FUNCTION_NOT_FOUND, str(e))
    try:
        result = f(*json.loads(job.args), **json.loads(job.kwargs))
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return ERROR, job_error(ErrorType.EXCEPTION, f"{type(e).__name__}: {e}", e)
    finally:
        _flush_progress()
    try:
        text = json.dumps(result, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        return ERROR, job_error(ErrorType.UNSERIALIZABLE_RESULT,
                                f"the result of type {type(result).__name__} is not JSON: {e}")
    if len(text) > max_result_bytes:
        return ERROR, job_error(ErrorType.RESULT_TOO_LARGE,
                                f"the result is {len(text)} bytes, more than jobs.max_result_bytes"
                                f" ({max_result_bytes})")
    return OK, text


def _run_pickled(payload: bytes) -> tuple[str, Any]:
    """An embedded pool's call: (OK, the value pickled) or (RAISED, its exception pickled)."""
    try:
        fn, args, kwargs = pickle.loads(payload)
        value = fn(*args, **kwargs)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return RAISED, dump_exception(e)
    finally:
        _flush_progress()
    try:
        return OK, pickle.dumps(value, PROTOCOL)
    except Exception as e:  # noqa: BLE001 - a value that cannot be pickled fails its call alone
        return RAISED, dump_exception(e)


def _rss_mb() -> float:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _take_cancels() -> None:
    while _control.poll():
        _cancelled.update(_control.recv())


def run_batch(jobs: list[Job], max_result_bytes: int, max_memory_mb: int) -> int:
    """Runs jobs in order, reporting each; stops early when over max_memory_mb. Returns jobs run.

    One message per job: Started for the first, then Done carrying the next one's start — a
    job's end and the next one's start travel together.
    """
    send = _events.send
    done = 0
    ended: tuple[str, str, Any, float] | None = None
    owner_gone = _lifeline[0].poll if _lifeline else (lambda: False)
    end_all = _setup.end_children
    for job in jobs:
        if owner_gone():  # EOF on the lifeline: the owner is gone, start nothing more
            break
        _take_cancels()
        jid = job.id
        if jid in _cancelled:
            _cancelled.discard(jid)
            continue
        now = time.time()
        if type(job) is JsonJob:  # before anyone can know it started: see service.engine.ledger
            _ledger.mark(job.seq, job.attempts, now)
        send(encode(Started(jid, now) if ended is None else Done(*ended, jid, now)))
        if _lease and lease.out(_lease[0]):  # (the send may have waited on a frozen owner)
            lease.end(jid)
        _channel.job_id = jid
        os.environ[_JOB_VAR] = jid  # what the job starts carries it: its leftovers can be told apart
        t = time.perf_counter()
        try:
            outcome, payload = _run_json(job, max_result_bytes) if isinstance(job, JsonJob) \
                else _run_pickled(job.payload)
        finally:
            output.flush()
            _channel.job_id = None
        seconds = time.perf_counter() - t
        ended = (jid, outcome, payload, seconds)
        if guard.forked() or (end_all and seconds > _QUICK and guard.child_pids()):
            guard.end_children()
        done += 1
        if max_memory_mb and _rss_mb() > max_memory_mb:
            break
    if ended is not None:
        send(encode(Done(*ended, None, 0.0)))
    return done

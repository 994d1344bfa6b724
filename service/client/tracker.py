"""The Executor's engine: one thread submits, two threads watch, for any number of futures.

Submitting: futures queue up and the submit thread sends them as batch
requests (consecutive `submit()` calls share one). Watching (`watch.py`):
`POST /v1/jobs/wait` long-polls every job in flight at once and answers with
those that finished, so results arrive in bulk, a handful of requests for
thousands of jobs. This module keeps the books both sides share: the jobs in
flight, and settling each future exactly once.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TypeVar

from service.client import ops
from service.client.common import FINISHED, Job, outcome
from service.client.errors import PooldError, PooldUnavailable
from service.client.futures import JobFuture, Outcome, Permits
from service.client.sync import Client
from service.client.watch import Watcher

T = TypeVar("T")
_Base = concurrent.futures.Future

COALESCE_JOBS = 500  # consecutive submit() calls sent as one batch, at most this many jobs
COALESCE_BYTES = 256 * 1024  # ... and about this many bytes (the daemon's default limit is 1 MiB)


def _retry_submit(e: PooldError) -> bool:
    """Refused before anything was read (so never a duplicate), or asked to come back."""
    if e.status in (429, 503):
        return True
    return isinstance(e, PooldUnavailable) and isinstance(e.__cause__, (ConnectionRefusedError,
                                                                        FileNotFoundError))


def _splittable(e: PooldError, futs: list[JobFuture]) -> bool:
    """Whether halving a refused batch can pin the refusal on the jobs that caused it
    (or, for 429 queue_full, let parts of it fit into what room the queue has)."""
    if e.status not in (400, 403, 413, 422, 429):
        return False
    same_fn = len({f.fn for f in futs}) == 1
    return not (same_fn and e.code in ("function_not_allowed", "function_not_found"))


def _resolve(f: JobFuture, job: Job | None, error: BaseException | None) -> None:
    """Completes a claimed future (user callbacks run here, outside any lock)."""
    if error is not None:
        f.set_exception(error)
    elif job is not None and job.get("state") == "cancelled":
        if _Base.cancel(f):
            f.set_running_or_notify_cancel()
        else:  # it had been seen running: result() must still raise CancelledError
            f.set_exception(concurrent.futures.CancelledError(f"job {f.job_id} was cancelled"))
    else:
        try:
            value = outcome(job or {})
        except (PooldError, ValueError) as e:  # JobFailed, or a Job that is not finished
            f.set_exception(e)
        else:
            f.set_result(value)


class Tracker:
    """Submits, watches and settles an Executor's futures (thread-safe).

    `lock` guards the books (`outstanding`, `unstarted`, each future's flags);
    `changed` is notified whenever they change.
    """

    def __init__(self, client: Client, max_pending: int, patience: float) -> None:
        self.client = client
        self.permits = Permits(max_pending)
        self.patience = patience
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._queue: deque[tuple[list[JobFuture], bool]] = deque()
        self._sending: list[JobFuture] = []
        self.outstanding: dict[str, JobFuture] = {}  # accepted, not settled; by job id, in order
        self.unstarted: dict[str, JobFuture] = {}  # ... and not yet seen running
        self.stopping = False
        self.plain_ids = True  # every job id so far is ASCII alphanumeric (see ops.wait_jobs)
        self.watcher = Watcher(self)
        self._threads = [threading.Thread(target=self._submit_loop, name="poold-executor-submit",
                                          daemon=True), *self.watcher.threads]
        for t in self._threads:
            t.start()

    # -- callers' side
    def add(self, fn: str, specs: list[bytes], coalesce: bool) -> list[JobFuture]:
        """Queues jobs for submission, first waiting until `max_pending` allows them."""
        if self.stopping:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if len(specs) > self.permits.limit:
            raise ValueError(f"{len(specs)} jobs at once exceed max_pending={self.permits.limit}")
        self.permits.acquire(len(specs))
        futs = [JobFuture(self, fn, spec) for spec in specs]
        with self.lock:
            if self.stopping:
                self.permits.release(len(specs))
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append((futs, coalesce))
            self.changed.notify_all()
        return futs

    def cancel(self, f: JobFuture) -> bool:
        with self.lock:
            claimed = f._claimed
            unsent = not claimed and f.job_id is None and not f._sending
            f._claimed = f._claimed or unsent
        if unsent:  # still in our queue: the submit thread skips claimed futures
            self.permits.release()
            _Base.cancel(f)
            f.set_running_or_notify_cancel()
            return True
        if not claimed:
            if f.running():
                return False  # as the stdlib: a started call cannot be cancelled
            with self.lock:  # until the daemon has answered its batch request
                self.changed.wait_for(lambda: f._claimed or f.job_id is not None)
            if f.running():
                return False
            if f.job_id is not None:
                try:
                    self.observe(f, self.client.cancel(f.job_id, queued_only=True))
                except PooldError as e:  # started, finished, gone or unreachable: not cancelled
                    if e.code == "already_started":
                        with self.lock:
                            self.mark_running([(f, None)])
                    return False
        concurrent.futures.wait([f], timeout=5.0)  # another thread may be finishing it
        return f.cancelled()

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self.lock:
            self.stopping = True
            self.changed.notify_all()
            victims = [f for futs, _ in self._queue for f in futs] if cancel_futures else []
            if cancel_futures:
                victims += [*self._sending, *self.outstanding.values()]
        for f in victims:
            if not f.running():
                f.cancel()
        if wait:
            for t in self._threads:
                t.join()
            self.client.close()

    def idle(self) -> bool:
        """Shut down and nothing left to send or watch (call with the lock held)."""
        return self.stopping and not self._queue and not self._sending and not self.outstanding

    # -- settling, shared by the threads
    def claim(self, items: Iterable[Outcome]) -> list[Outcome]:
        """The outcomes whose futures this call moves to done (call with the lock held)."""
        won = []
        for item in items:
            f = item[0]
            if f._claimed:
                continue
            f._claimed = True
            if f.job_id is not None:
                self.outstanding.pop(f.job_id, None)
                self.unstarted.pop(f.job_id, None)
            won.append(item)
        if won:
            self.changed.notify_all()
        return won

    def resolve(self, won: list[Outcome]) -> None:
        """Completes what `claim` won (without the lock: user callbacks run here)."""
        if not won:
            return
        self.permits.release(len(won))
        for f, job, error in won:
            if job is not None:
                f.job = job
            _resolve(f, job, error)

    def settle(self, items: Iterable[Outcome]) -> int:
        """Moves futures to done, each exactly once; how many this call finished."""
        with self.lock:
            won = self.claim(items)
        self.resolve(won)
        return len(won)

    def mark_running(self, seen: Iterable[tuple[JobFuture, Job | None]]) -> int:
        """Futures whose jobs were seen running (call with the lock held); how many were new."""
        n = 0
        for f, job in seen:
            if f.job_id is not None:
                self.unstarted.pop(f.job_id, None)
            if f._claimed or f.done() or f.running():
                continue
            if job is not None:
                f.job = job
            f.set_running_or_notify_cancel()
            n += 1
        return n

    def observe(self, f: JobFuture, job: Job) -> int:
        """Takes note of a Job as fetched; 1 when that finished the future."""
        state = job.get("state")
        if state in FINISHED:
            return self.settle([(f, job, None)])
        f.job = job
        if state == "running":
            with self.lock:
                self.mark_running([(f, job)])
        return 0

    def patiently(self, action: Callable[[], T], retry: Callable[[PooldError], bool]) -> T:
        """Runs action, retrying what `retry` allows for up to `patience` seconds."""
        first: float | None = None
        delay = 0.2
        while True:
            try:
                return action()
            except PooldError as e:
                now = time.monotonic()
                first = now if first is None else first
                if not retry(e) or now - first >= self.patience:
                    raise
                time.sleep(max(0.05, min(e.retry_after or delay, self.patience - (now - first))))
                delay = min(delay * 2, 5.0)

    # -- the submit thread
    def _submit_loop(self) -> None:
        while True:
            with self.lock:
                while not self._queue and not self.stopping:
                    self.changed.wait()
                if not self._queue:
                    self.changed.notify_all()  # the watchers may be waiting for this
                    return
                futs, coalesce = self._queue.popleft()
                batch = [f for f in futs if not f._claimed]
                size = sum(len(f._spec) for f in batch)
                while (coalesce and self._queue and self._queue[0][1] and len(batch) < COALESCE_JOBS
                       and size < COALESCE_BYTES):
                    more = [f for f in self._queue.popleft()[0] if not f._claimed]
                    batch += more
                    size += sum(len(f._spec) for f in more)
                for f in batch:
                    f._sending = True
                self._sending = batch
            try:
                self._send(batch)
            except Exception as e:  # noqa: BLE001 - a bug here must fail the futures, not hang them
                self.settle((f, None, e) for f in batch)
            finally:
                with self.lock:
                    self._sending = []
                    self.changed.notify_all()

    def _send(self, futs: list[JobFuture]) -> None:
        if not futs:
            return
        try:
            jobs = self.patiently(
                lambda: self.client._do(ops.submit_encoded([f._spec for f in futs])),
                lambda e: _retry_submit(e) and not (e.status == 429 and len(futs) > 1))
        except PooldError as e:
            if len(futs) > 1 and _splittable(e, futs):
                half = len(futs) // 2
                self._send(futs[:half])
                self._send(futs[half:])
                return
            self.settle((f, None, e) for f in futs)
            return
        done: list[Outcome] = []
        with self.lock:
            for f, job in zip(futs, jobs, strict=True):
                jid = job["id"]
                f.job_id, f.job, f._sending = jid, job, False
                if not (jid.isascii() and jid.isalnum()):
                    self.plain_ids = False
                state = job.get("state")
                if f._claimed:
                    continue
                if state in FINISHED:
                    done.append((f, job, None))
                    continue
                self.outstanding[jid] = f
                self.unstarted[jid] = f
                if state == "running":
                    self.mark_running([(f, job)])
            self.watcher.sent()
            won = self.claim(done)
            self.changed.notify_all()
        self.resolve(won)

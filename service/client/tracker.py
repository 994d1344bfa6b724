"""The Executor's engine: one thread submits, one thread watches, for any number of futures.

Submitting: futures queue up and the submit thread sends them as batch
requests (consecutive `submit()` calls share one). Watching: rather than a
request per future, the watch thread long-polls the oldest unfinished job; when
it answers (finished, or after a short wait) it sweeps the other jobs in
submission order, skipping those the daemon lists as running and stopping at
the first one that has not started yet, since the daemon runs an executor's
jobs in that order. A finished job costs one GET, an idle round two or three.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from service.client import ops
from service.client.common import FINISHED, Job, outcome
from service.client.errors import PooldError, PooldUnavailable
from service.client.futures import JobFuture, Permits
from service.client.sync import Client

T = TypeVar("T")
_Base = concurrent.futures.Future

COALESCE_JOBS = 500  # consecutive submit() calls sent as one batch, at most this many jobs
COALESCE_BYTES = 256 * 1024  # ... and about this many bytes (the daemon's default limit is 1 MiB)
MIN_STEP, MAX_STEP = 0.2, 5.0  # seconds a watch round may long-poll; grows while nothing happens
RUNNING_LIST = 1000  # GET /v1/jobs?state=running&limit=...: complete unless this many run


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


class Tracker:
    """Submits, watches and settles an Executor's futures (thread-safe)."""

    def __init__(self, client: Client, max_pending: int, patience: float) -> None:
        self.client = client
        self.permits = Permits(max_pending)
        self._patience = patience
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[tuple[list[JobFuture], bool]] = deque()
        self._sending: list[JobFuture] = []
        self._outstanding: dict[str, JobFuture] = {}  # by job id, in submission order
        self._fresh = False  # jobs were added since the watcher last looked
        self._stopping = False
        self._threads = [threading.Thread(target=self._submit_loop, name="poold-executor-submit",
                                          daemon=True),
                         threading.Thread(target=self._watch_loop, name="poold-executor-watch",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    # -- callers' side
    def add(self, fn: str, specs: list[bytes], coalesce: bool) -> list[JobFuture]:
        """Queues jobs for submission, first waiting until `max_pending` allows them."""
        if self._stopping:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if len(specs) > self.permits.limit:
            raise ValueError(f"{len(specs)} jobs at once exceed max_pending={self.permits.limit}")
        self.permits.acquire(len(specs))
        futs = [JobFuture(self, fn, spec) for spec in specs]
        with self._lock:
            if self._stopping:
                self.permits.release(len(specs))
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append((futs, coalesce))
            self._changed.notify_all()
        return futs

    def cancel(self, f: JobFuture) -> bool:
        with self._lock:
            claimed = f._claimed
            unsent = not claimed and f.job_id is None and not f._sending
            f._claimed = f._claimed or unsent
        if unsent:  # still in our queue: the submit thread skips claimed futures
            self.permits.release()
            f._sent.set()
            _Base.cancel(f)
            f.set_running_or_notify_cancel()
            return True
        if not claimed:
            if f.running():
                return False  # as the stdlib: a started call cannot be cancelled
            f._sent.wait()
            if f.running():
                return False
            if f.job_id is not None:
                try:
                    self._observe(f, self.client.cancel(f.job_id, queued_only=True))
                except PooldError as e:  # started, finished, gone or unreachable: not cancelled
                    if e.code == "already_started":
                        self._mark_running(f)
                    return False
        concurrent.futures.wait([f], timeout=5.0)  # another thread may be finishing it
        return f.cancelled()

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
            victims = [f for futs, _ in self._queue for f in futs] if cancel_futures else []
            if cancel_futures:
                victims += [*self._sending, *self._outstanding.values()]
        for f in victims:
            if not f.running():
                f.cancel()
        if wait:
            for t in self._threads:
                t.join()
            self.client.close()

    # -- bookkeeping shared by the threads
    def _settle(self, f: JobFuture, job: Job | None = None, error: BaseException | None = None) -> bool:
        """Moves a future to done exactly once; user callbacks run outside the lock."""
        with self._lock:
            if f._claimed:
                return False
            f._claimed = True
            if f.job_id is not None:
                self._outstanding.pop(f.job_id, None)
            self._changed.notify_all()
        self.permits.release()
        f._sent.set()
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
        return True

    def _mark_running(self, f: JobFuture) -> None:
        with self._lock:
            if not f._claimed and not f.running():
                f.set_running_or_notify_cancel()

    def _observe(self, f: JobFuture, job: Job) -> int:
        """Takes note of a Job as fetched; 1 when that finished the future."""
        f.job = job
        state = job.get("state")
        if state in FINISHED:
            return int(self._settle(f, job=job))
        if state == "running":
            self._mark_running(f)
        return 0

    def _patiently(self, action: Callable[[], T], retry: Callable[[PooldError], bool]) -> T:
        """Runs action, retrying what `retry` allows for up to `patience` seconds."""
        first: float | None = None
        delay = 0.2
        while True:
            try:
                return action()
            except PooldError as e:
                now = time.monotonic()
                first = now if first is None else first
                if not retry(e) or now - first >= self._patience:
                    raise
                time.sleep(max(0.05, min(e.retry_after or delay, self._patience - (now - first))))
                delay = min(delay * 2, 5.0)

    # -- the submit thread
    def _submit_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if not self._queue:
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
                for f in batch:
                    self._settle(f, error=e)
            finally:
                with self._lock:
                    self._sending = []
                    self._changed.notify_all()

    def _send(self, futs: list[JobFuture]) -> None:
        if not futs:
            return
        try:
            jobs = self._patiently(
                lambda: self.client._do(ops.submit_encoded([f._spec for f in futs])),
                lambda e: _retry_submit(e) and not (e.status == 429 and len(futs) > 1))
        except PooldError as e:
            if len(futs) > 1 and _splittable(e, futs):
                half = len(futs) // 2
                self._send(futs[:half])
                self._send(futs[half:])
                return
            for f in futs:
                self._settle(f, error=e)
            return
        with self._lock:
            for f, job in zip(futs, jobs, strict=True):
                f.job_id, f.job, f._sending = job["id"], job, False
                self._outstanding[job["id"]] = f
            self._fresh = True
            self._changed.notify_all()
        for f in futs:
            f._sent.set()

    # -- the watch thread
    def _watch_loop(self) -> None:
        step = MIN_STEP
        while True:
            with self._lock:
                while not self._outstanding and not (self._stopping and not self._queue
                                                     and not self._sending):
                    self._changed.wait()
                if not self._outstanding:
                    break
                order = list(self._outstanding.values())
                if self._fresh:
                    step, self._fresh = MIN_STEP, False
            try:
                done = self._patiently(lambda o=order, s=step: self._round(o, s),  # type: ignore[misc]
                                       lambda e: isinstance(e, PooldUnavailable))
            except Exception as e:  # noqa: BLE001 - unreachable for `patience` seconds (or a bug):
                for f in order:  # fail these futures rather than leave their callers hanging
                    self._settle(f, error=e)
                continue
            step = MIN_STEP if done else min(MAX_STEP, step * 2)
        self.client.close()

    def _fetch(self, f: JobFuture, wait: float | None = None) -> Job | None:
        """The job now (or after a long-poll); None when the daemon refused (future failed)."""
        assert f.job_id is not None
        try:
            return self.client.get(f.job_id, wait=wait)
        except PooldUnavailable:
            raise
        except PooldError as e:  # 404: expired or lost with an in-memory store
            self._settle(f, error=e)
            return None

    def _round(self, order: list[JobFuture], step: float) -> int:
        """One long-poll of the oldest job and a sweep of the others; how many finished."""
        target, rest = order[0], [f for f in order[1:] if not f.done()]
        job = self._fetch(target, wait=step) if not target.done() else None
        done = 1 if job is None else self._observe(target, job)
        if job is not None and job.get("state") == "queued" and not job.get("attempts"):
            return done  # the oldest has not started: neither have the others
        running: dict[str, Job] | None = None
        if len(rest) > 1:
            listed = self.client.jobs(state="running", limit=RUNNING_LIST)
            running = {j["id"]: j for j in listed} if len(listed) < RUNNING_LIST else None
        for f in rest:
            if f.job_id in (running or {}):
                self._observe(f, (running or {})[f.job_id or ""])
                continue
            job = self._fetch(f)
            done += 1 if job is None else self._observe(f, job)
            if job is not None and job.get("state") == "queued" and not job.get("attempts"):
                break
        return done

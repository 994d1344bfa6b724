"""How an Executor learns that its jobs have ended: long-polls over every job in flight.

`POST /v1/jobs/wait` answers as soon as one of the listed jobs has finished,
with every one of them finished by then, so one request brings results in bulk
however many jobs are in flight. Two threads share the watching: a thread
long-polls (up to LONG_POLL seconds) the jobs that no request covers yet; while
that poll is out, the other thread covers the jobs sent since with polls of a
few seconds at most, so that a quick job is not stuck behind a poll on slow
ones. Between polls, when jobs have started or ended, a thread lists the
daemon's running jobs (often while things move, rarely when they do not) so
that `Future.running()` turns true.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from service.client import ops
from service.client.common import Job
from service.client.errors import PooldError, PooldUnavailable
from service.client.futures import Book, Outcome

LONG_POLL = 30.0  # seconds the main poll may be held (the daemon allows 60)
SHORT_MIN, SHORT_MAX = 0.1, 2.0  # an overlapping poll; it doubles while nothing finishes
OVERLAP_AFTER = 0.02  # seconds a poll must have been out before the other thread starts one
CHECK_MIN, CHECK_MAX = 0.1, 5.0  # seconds between listings of running jobs; doubles while none start
RUNNING_LIST = 1000  # GET /v1/jobs?state=running&limit=...


@dataclass(eq=False)
class _Poll:
    ids: list[str]
    timeout: float
    long: bool
    started: float


_CHECK = object()  # the task: list the running jobs


def _retry_wait(e: PooldError) -> bool:
    return isinstance(e, PooldUnavailable) or e.status in (502, 503, 504)


class Watcher:
    """The watch threads of one Tracker; their state is guarded by the tracker's lock."""

    def __init__(self, tracker: Book) -> None:
        self.t = tracker
        self._polls: list[_Poll] = []  # out now
        self._covered: set[str] = set()  # the ids of the polls out now
        self._dirty = False  # ids were sent or came back uncovered since the last look
        self._short = SHORT_MIN
        self._window = ops.WAIT_IDS  # ids per poll; halved when the daemon finds the body too large
        self._rotor = 0
        self._check_due = math.inf
        self._check_every = CHECK_MIN
        self._checking = False
        self._alive = 2
        self.threads = [threading.Thread(target=self._loop, name=f"poold-executor-watch-{i}",
                                         daemon=True) for i in (1, 2)]

    def sent(self) -> None:
        """New jobs are in `outstanding` (the tracker calls this with its lock held)."""
        self._dirty = True
        self._short = SHORT_MIN
        self._moved(time.monotonic())

    def _moved(self, now: float) -> None:
        """Jobs were sent or ended, so others may start: look at the running ones soon."""
        self._check_every = CHECK_MIN
        self._check_due = min(self._check_due, now + CHECK_MIN)

    def _loop(self) -> None:
        try:
            while True:
                with self.t.lock:
                    task = self._next()
                if task is None:
                    return
                if isinstance(task, _Poll):
                    self._poll(task)
                else:
                    self._check()
        finally:
            with self.t.lock:
                self._alive -= 1
                last = self._alive == 0
                self.t.changed.notify_all()
            if last:
                self.t.client.close()

    def _next(self) -> _Poll | object | None:
        """The next task, waiting until there is one; None once the executor is done."""
        t = self.t
        while not t.idle():
            now = time.monotonic()
            wake = math.inf
            if self._dirty:
                fresh = [jid for jid in t.outstanding if jid not in self._covered]
                since = min((now - p.started for p in self._polls), default=math.inf)
                if not fresh:
                    self._dirty = False
                elif since >= OVERLAP_AFTER:
                    return self._start(fresh, now)
                else:
                    wake = OVERLAP_AFTER - since
            if t.unstarted and not self._checking:
                if now >= self._check_due:
                    self._checking = True
                    return _CHECK
                wake = min(wake, self._check_due - now)
            t.changed.wait(None if wake == math.inf else max(wake, 0.001))
        return None

    def _start(self, fresh: list[str], now: float) -> _Poll:
        long = not any(p.long for p in self._polls)
        if long or len(fresh) <= self._window:
            ids = fresh[:self._window]
        else:  # more than one window's worth: overlapping polls take turns over the rest
            first = self._rotor % len(fresh)
            ids = (fresh[first:] + fresh[:first])[:self._window]
            self._rotor = first + len(ids)
        self._dirty = len(ids) < len(fresh)
        p = _Poll(ids, LONG_POLL if long else self._short, long, now)
        self._polls.append(p)
        self._covered.update(ids)
        return p

    def _poll(self, p: _Poll) -> None:
        t = self.t
        jobs: list[Job] = []
        error: BaseException | None = None
        shrunk = False
        try:
            jobs = t.patiently(lambda: t.client._do(ops.wait_jobs(p.ids, p.timeout,
                                                                  plain_ids=t.plain_ids)),
                               _retry_wait)
        except PooldError as e:
            if e.status == 413 and len(p.ids) > 1:  # server.max_body_bytes is small: fewer ids
                shrunk = True
            else:
                error = e
        except Exception as e:  # noqa: BLE001 - a bug here must fail the futures, not hang them
            error = e
        now = time.monotonic()
        with t.lock:
            items: list[Outcome]
            if error is not None:  # unreachable for `patience` seconds, or refused
                items = [(f, None, error) for jid in p.ids if (f := t.outstanding.get(jid))]
            else:
                items = [(f, job, None) for job in jobs if (f := t.outstanding.get(job["id"]))]
            won = t.claim(items)
            if shrunk:
                self._window = max(1, min(self._window, len(p.ids) // 2))
            self._polls.remove(p)
            self._covered.difference_update(p.ids)
            self._dirty = True
            if won:
                self._moved(now)
            if not p.long:
                self._short = SHORT_MIN if won else min(SHORT_MAX, self._short * 2)
            t.changed.notify_all()
        t.resolve(won)
        if not jobs and error is None and not shrunk and now - p.started < p.timeout / 2:
            # An empty answer before the poll's time was up: the daemon knows none of these
            # jobs (expired, or lost with an in-memory store). Ask for each to find out.
            self._probe(p.ids)

    def _probe(self, ids: list[str]) -> None:
        t = self.t
        for jid in ids:
            with t.lock:
                f = t.outstanding.get(jid)
            if f is None:
                continue
            try:
                job = t.client.get(jid)
            except PooldUnavailable:
                return  # the next poll retries, patiently
            except PooldError as e:  # 404: the future fails with it
                t.settle([(f, None, e)])
                continue
            t.observe(f, job)

    def _check(self) -> None:
        t = self.t
        try:
            listed = t.client.jobs(state="running", limit=RUNNING_LIST)
        except Exception:  # noqa: BLE001 - best effort: a later check makes up for it
            listed = []
        with t.lock:
            seen = [(f, job) for job in listed if (f := t.unstarted.get(job.get("id", "")))]
            started = t.mark_running(seen)
            self._checking = False
            self._check_every = CHECK_MIN if started else min(CHECK_MAX, self._check_every * 2)
            self._check_due = time.monotonic() + self._check_every
            t.changed.notify_all()

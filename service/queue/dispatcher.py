"""Pairs queued jobs with free slots and turns what workers report into job states.

The queue lives in the store; memory holds only what is dispatched or
running. Short jobs go to a worker several at a time (sized from each
function's measured run time) so their cost per job stays small; a long or
unknown function goes one at a time, so priorities and cancels stay prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from service.config import Config
from service.engine.batching import RunTimes
from service.engine.options import PoolOptions
from service.engine.procs import leftovers, supervisor
from service.engine.protocol import OK, Done, Event, JsonJob, Progress, Started
from service.engine.slots import LEASE_EXPIRED, Slot, Slots
from service.model import ErrorType, job_error
from service.queue.metrics import Metrics
from service.queue.waiters import Waiters
from service.store.base import Claimed, JobStore, StoreError

log = logging.getLogger("poold.scheduler")

@dataclass
class Running:
    claimed: Claimed
    slot: Slot
    started_at: float
    deadline: float  # on the loop's clock
    progress: dict[str, Any] | None = None
    written: bool = False  # its start is in the store


def options(cfg: Config) -> PoolOptions:
    """The engine's options from the `[pool]` table."""
    p = cfg.pool
    return PoolOptions(p.workers, p.start_method, tuple(p.preload), p.max_tasks_per_worker, p.max_memory_mb)


class Scheduler:
    def __init__(self, cfg: Config, store: JobStore, metrics: Metrics, *, host: str = "",
                 poll: float | None = None) -> None:
        """`host`: this host's cluster name; `poll`: seconds between looks at the store when
        nothing kicks (a store shared by several hosts: one's submits are another's work)."""
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.host, self.poll = host, poll
        self.pool = Slots(options(cfg), self, ledger_base=store.start_ledger, leased=poll is not None)
        # handed to a worker (in this batch of that slot), not ended
        self.dispatched: dict[str, tuple[Slot, list[Claimed]]] = {}
        self.running: dict[str, Running] = {}  # started, not ended
        self.cancelled_pending: set[str] = set()
        self.waiters = Waiters()
        self.stats = RunTimes()
        self._timers: dict[Slot, tuple[float, asyncio.Handle]] = {}
        self.accepting = True  # False while draining: nothing new starts
        self._kicked = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool.start(self.cfg.pool.size)
        self._filler = self.loop.create_task(self._fill_loop(), name="poold dispatch")

    async def stop(self) -> None:
        """Ends the dispatch task (before the slots end)."""
        if self._filler is not None:
            self._filler.cancel()
            await asyncio.gather(self._filler, return_exceptions=True)
            self._filler = None

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.pool.cfg = options(cfg)
        self.pool.resize(cfg.pool.size)
        self.pool.renew()  # every job that starts from now on imports its code afresh
        self.kick()

    # -- dispatch
    def kick(self) -> None:
        """Asks for a dispatch pass (one, however often asked before it runs)."""
        self._kicked.set()

    async def _fill_loop(self) -> None:
        pause = 0.0
        while True:
            if self.poll is None:
                await self._kicked.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kicked.wait(), self.poll)
            self._kicked.clear()
            try:
                await self._fill()
                pause = 0.0
            except StoreError:  # the store says why (in /health); try again, backing off
                pause = min(max(2 * pause, 0.05), 2.0)
                await asyncio.sleep(pause)
                self._kicked.set()

    async def _fill(self) -> None:
        """Claims a job per free slot, then as many more as each slot's batch takes (sized from
        that job's function): nothing is claimed that no slot takes, so other hosts get it."""
        if not self.accepting or (self.pool.lease is not None and not self.pool.lease.valid()):
            return  # a host whose lease is out takes no job until it has renewed it
        free = [s for s in self.pool.slots.values() if self._can_take(s)]
        if not free:
            return
        held = set(self.dispatched)
        firsts = await self.store.claim(len(free), held)
        if not firsts:
            return
        # jobs queued in the store and not yet handed to a worker (sizes batches only)
        waiting = self.store.queued + len(firsts)
        if not self.store.claim_dequeues:  # still counted as queued until they start
            waiting -= len(self.dispatched) - len(self.running)
        free = [s for s in free if self._can_take(s)] if self.accepting else []  # it may have waited
        plan = []  # (slot, its first job, how many more)
        for slot, c in zip(free, firsts, strict=False):
            size = min(self.stats.batch_size(c.fn), max(1, math.ceil(waiting / len(free))))
            if self.cfg.pool.max_tasks_per_worker:  # a batch never runs past the recycling point
                held_now = sum(len(b) for b in slot.batches)
                size = min(size, self.cfg.pool.max_tasks_per_worker - slot.tasks_done - held_now)
                if size <= 0:
                    continue
            plan.append((slot, c, size - 1))
        more = sum(n for _, _, n in plan)
        rest = await self.store.claim(more, held | {c.id for c in firsts}) if more else []
        taken = {c.id for _, c, _ in plan}
        pos = 0
        for slot, c, n in plan:
            if not self.accepting or not self._can_take(slot):
                taken.discard(c.id)
                continue
            batch = [c, *rest[pos:pos + n]]
            pos += n
            for b in batch:
                self.dispatched[b.id] = (slot, batch)
            self.pool.submit(slot, batch, [JsonJob(b.id, b.fn, b.args, b.kwargs, b.seq, b.attempts)
                                           for b in batch], self.cfg.jobs.max_result_bytes)
        unused = [c for c in firsts if c.id not in taken] + rest[pos:]
        if unused:
            self.store.release(unused)

    def _can_take(self, s: Slot) -> bool:
        """An idle slot takes a batch; a busy one takes a second when the batch it runs is of
        short jobs (it ends in milliseconds), so the worker never waits for the daemon."""
        if not s.taking():
            return False
        if s.state == "idle" and not s.batches:
            return True
        return (s.state == "busy" and len(s.batches) == 1
                and self.stats.short(s.batches[0][-1].fn))

    # -- worker reports
    # the slots' Owner
    def slot_ready(self, slot: Slot) -> None:
        self.kick()

    def slot_failed(self, slot: Slot, exc: BaseException) -> None:
        pass  # logged by the slots, which try again; /health says when none is alive

    def slot_replaced(self, why: str) -> None:
        self.metrics.worker_restarts.labels(why).inc()

    def slot_events(self, slot: Slot, msgs: list[Event]) -> None:
        claimed = {c.id: c for b in slot.batches for c in b}
        finished: list[str] = []
        for msg in msgs:
            if type(msg) is Done:
                r = self.running.get(msg.id)
                if r is not None and r.slot is slot:
                    del self.running[msg.id]
                    self._done(r, msg.outcome, msg.payload, msg.seconds)
                    finished.append(msg.id)
                if msg.next_id is not None and (c := claimed.get(msg.next_id)) is not None:
                    self._started(slot, c, msg.next_t)
            elif type(msg) is Started:
                c = claimed.get(msg.id)
                if c is not None:
                    self._started(slot, c, msg.t)
            elif type(msg) is Progress:
                r = self.running.get(msg.id)
                if r is not None:
                    r.progress = {"current": msg.current, "total": msg.total, "message": msg.message}
        for r in self.running.values():
            if r.slot is slot and not r.written:
                self._write_start(r)
        if finished:
            self.store.after_commit(lambda: self.waiters.wake(finished))
        self.kick()

    def _worker_info(self, slot: Slot) -> str:
        return json.dumps({"pid": slot.pid, "name": slot.name, "host": self.host}, separators=(",", ":"))

    def _started(self, slot: Slot, c: Claimed, t: float) -> None:
        assert self.loop is not None
        r = Running(c, slot, t, self.loop.time() + c.timeout)
        self.running[c.id] = r
        slot.current, slot.current_started = c.id, t
        if c.id in self.cancelled_pending:  # cancelled while it waited in the worker: end it now
            slot.kill_reason[c.id] = "cancel"
            self.pool.kill(slot, "cancel")
            return
        self._arm(slot, r.deadline)

    def _arm(self, slot: Slot, when: float) -> None:
        """One deadline timer per slot, not one per job: short jobs end long before it fires."""
        armed = self._timers.get(slot)
        if armed is not None and armed[0] <= when:
            return
        if armed is not None:
            armed[1].cancel()
        assert self.loop is not None
        # the deadline is kept beside the handle: for a time already past uvloop returns a plain
        # Handle, which has no when()
        self._timers[slot] = (when, self.loop.call_at(when, self._deadline, slot))

    def _deadline(self, slot: Slot) -> None:
        self._timers.pop(slot, None)
        r = self.running.get(slot.current) if slot.current else None
        if r is None or r.slot is not slot:
            return
        assert self.loop is not None
        if self.loop.time() < r.deadline - 0.001:
            self._arm(slot, r.deadline)  # the job it was armed for has ended: watch this one
            return
        log.info("job %s timed out after %g s: killing worker %d", r.claimed.id, r.claimed.timeout, slot.n)
        slot.kill_reason[r.claimed.id] = "timeout"
        self._kill_job(r, "timeout")

    def _write_start(self, r: Running) -> None:
        self.store.start(r.claimed.seq, r.started_at, self._worker_info(r.slot))
        r.written = True

    def _done(self, r: Running, kind: str, payload: Any, seconds: float) -> None:
        c = r.claimed
        if (entry := self.dispatched.get(c.id)) is not None and entry[0] is r.slot:
            del self.dispatched[c.id]
        r.slot.current = None
        r.slot.tasks_done += 1
        self.stats.update(c.fn, seconds)
        self.metrics.duration.observe(seconds)
        if kind == OK:
            self._final(r, "succeeded", result_json=payload)
        else:
            self._failed(r, "failed", payload)

    def _final(self, r: Running, state: str, *, result_json: str | None = None,
               error: dict[str, Any] | None = None) -> None:
        self.store.finish(r.claimed, state, r.started_at, self._worker_info(r.slot), r.written,
                          result_json=result_json, error=error, progress=r.progress)
        self.metrics.finished.labels(state).inc()

    def _failed(self, r: Running, state: str, error: dict[str, Any]) -> None:
        """A failed attempt: retried while retries are left, else final."""
        c = r.claimed
        if c.attempts + 1 <= c.retries:
            if not r.written:
                self._write_start(r)
            self.store.retry(c.seq, error, attempts=c.attempts)
            self.metrics.retried.inc()
        else:
            self._final(r, state, error=error)

    def batch_ended(self, slot: Slot, batch: list[Claimed], exc: BaseException | None) -> None:
        unstarted = []
        for c in batch:
            # never started (or ended) here: back to the queue as it is — unless it was already
            # handed to another slot (a retry), which owns it now
            entry = self.dispatched.get(c.id)
            if entry is not None and entry[1] is batch and c.id not in self.running:
                del self.dispatched[c.id]
                if c.id not in self.cancelled_pending:
                    unstarted.append(c)
                self.cancelled_pending.discard(c.id)
        if unstarted:
            self.store.release(unstarted)
        if exc is not None:
            self._worker_lost(slot, batch)
        self.kick()

    def _worker_lost(self, slot: Slot, batch: list[Claimed]) -> None:
        ended = []
        for c in batch:
            r = self.running.get(c.id)
            if r is None or r.slot is not slot:
                continue
            del self.running[c.id]
            ended.append(c.id)
            self.dispatched.pop(c.id, None)
            self.cancelled_pending.discard(c.id)
            reason = slot.kill_reason.pop(c.id, None)
            if reason == "cancel":
                continue  # already cancelled in the store
            if reason == "timeout":
                err = job_error(ErrorType.TIMEOUT,
                                f"the job ran longer than its timeout ({c.timeout:g} s) and was killed")
                self._failed(r, "timed_out", err)
                continue
            if slot.exit == LEASE_EXPIRED:  # another host may have the job now: an interruption
                self._failed(r, "failed", job_error(ErrorType.INTERRUPTED, f"the worker {slot.exit}"))
                continue
            self._failed(r, "failed",
                         job_error(ErrorType.WORKER_DIED, f"the worker process (pid {slot.pid}) {slot.exit}"))
        if ended:
            self.store.after_commit(lambda: self.waiters.wake(ended))

    def _kill_job(self, r: Running, why: str) -> None:
        """SIGKILL at once: the worker's tree, and what the job detached that no other job can own."""
        self.pool.kill(r.slot, why)
        others = {jid: o.started_at for jid, o in self.running.items() if o is not r}
        known = self.pool.helper_pids() | set(self.pool.processes())
        for p in leftovers.orphans_of(known, r.claimed.id, r.started_at, others):
            supervisor.kill_tree(p.pid)

    # -- requests from the API
    async def cancel(self, jid: str, queued_only: bool) -> str:
        """Cancels a job; returns "cancelled", "not_found", "already_finished" or "already_started"."""
        r = self.running.get(jid)
        if r is not None and r.slot.kill_reason.get(jid) == "cancel":
            return "already_finished"  # cancelled a moment ago; its worker is still going down
        if r is not None:
            if queued_only:
                return "already_started"
            # killed first: while the store is asked, the worker could go on to its next job
            r.slot.kill_reason[jid] = "cancel"
            self._kill_job(r, "cancel")
            try:
                await self.store.cancel(jid, r.progress)
            except StoreError:  # the job is dead here: its end is kept and written once it can be
                self.store.finish(r.claimed, "cancelled", r.started_at, self._worker_info(r.slot), r.written,
                                  progress=r.progress)
                raise
        else:
            left = await self.store.cancel(jid, queued_only=queued_only)
            if left is None:
                return "not_found"
            if left not in ("queued", "running"):
                return "already_finished"
            if queued_only and left == "running":
                return "already_started"  # on another host
            entry = self.dispatched.get(jid)
            if entry is not None:  # waiting inside a worker's batch: tell it to skip the job
                self.cancelled_pending.add(jid)
                self.pool.cancel_pending(entry[0], jid)
        self.metrics.finished.labels("cancelled").inc()
        self.store.after_commit(lambda: self.waiters.wake([jid]))
        return "cancelled"

    async def wait(self, ids: list[str], timeout: float, need_all: bool = True) -> None:
        """Returns when the jobs end (one of them, unless need_all) or after timeout seconds."""
        await self.waiters.wait(ids, timeout, need_all)

    def progress_json(self, jid: str) -> str | None:
        """Live progress of a running job as JSON text (None when it reported none)."""
        r = self.running.get(jid)
        return None if r is None or r.progress is None else json.dumps(r.progress)

    # -- shutdown
    def idle(self) -> bool:
        return not self.running and not self.dispatched

    def hold_back(self) -> None:
        """Draining: workers skip the jobs they hold but have not started (they stay queued)."""
        for jid, (slot, _) in self.dispatched.items():
            if jid not in self.running:
                self.pool.cancel_pending(slot, jid)

    def interrupt_all(self) -> None:
        """Ends the book of every running job: retried on the next start if retries are left.

        Not on a store whose claims other hosts see: a job requeued now could start elsewhere
        while its worker here is still being killed; the host's leave() gives them back once
        its workers are gone."""
        err = job_error(ErrorType.INTERRUPTED, "the daemon stopped while the job ran")
        for r in list(self.running.values()) if not self.store.claim_dequeues else []:
            if not r.written:
                self._write_start(r)
            if r.claimed.attempts + 1 <= r.claimed.retries:
                self.store.retry(r.claimed.seq, err, attempts=r.claimed.attempts)
            else:
                self.store.finish(r.claimed, "failed", r.started_at, self._worker_info(r.slot), True,
                                  error=err, progress=r.progress)
        self.running.clear()
        self.dispatched.clear()

    def state(self) -> dict[str, Any]:
        workers: dict[str, int] = {}
        for s in self.pool.slots.values():
            workers[s.state] = workers.get(s.state, 0) + 1
        return {"queued": self.store.queued, "running": len(self.running), "workers": workers,
                "draining": not self.accepting}

    def workers(self) -> list[dict[str, Any]]:
        return [w | {"host": self.host} for w in self.pool.workers()]

    def drop(self, ids: list[str]) -> None:
        """Jobs the store no longer has as this host's (cancelled on another host, rescued by
        one): killed here, their tree too, with nothing more written."""
        for jid in ids:
            r = self.running.get(jid)
            if r is not None:
                if r.slot.kill_reason.get(jid) != "cancel":
                    r.slot.kill_reason[jid] = "cancel"
                    self._kill_job(r, "cancel")
            elif (entry := self.dispatched.get(jid)) is not None:
                self.cancelled_pending.add(jid)
                self.pool.cancel_pending(entry[0], jid)

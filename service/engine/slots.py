"""Worker slots: one single-worker ProcessPoolExecutor per slot — the engine both faces share.

A bare ProcessPoolExecutor fails every pending future when one of its
workers dies; one executor per slot keeps a death local to its slot, which is
rebuilt alone. Each slot has its own pipes (events from the worker, cancels
to it), so a worker killed mid-write corrupts nothing but its own pipe. The
slots decide nothing about jobs: they report events and batch ends to their
owner (the daemon's dispatcher, or an embedded service.Pool).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import psutil

from service.engine import exitstatus, lease, ledger, protocol, worker
from service.engine.frames import FrameReader
from service.engine.lease import Lease
from service.engine.options import PoolOptions
from service.engine.procs import supervisor
from service.engine.protocol import Job, WorkerSetup
from service.engine.slot import Owner, Slot
from service.model import iso

log = logging.getLogger("poold.pool")

# Slot.exit of a worker that ended its job because this host's lease ran out
LEASE_EXPIRED = ("ended its job: this host's lease on its jobs ran out"
                 " (no heartbeat reached the store in time)")

class Slots:
    """Starts, replaces and kills slots; forwards worker events to their owner."""

    def __init__(self, cfg: PoolOptions, owner: Owner, *, ledger_base: str | None = None,
                 label_output: bool = True, end_children: bool = False, leased: bool = False) -> None:
        self.cfg = cfg
        self.ledger = ledger_base  # the store's path: workers keep their start rings beside it
        self.label_output, self.end_children = label_output, end_children
        self.ctx = multiprocessing.get_context(cfg.start_method)
        if cfg.start_method == "forkserver":
            exitstatus.whole_reads()
            # workers fork from a server that has already imported what they need: fast and
            # shared. Never job code (the preload modules included): a reload must import afresh.
            self.ctx.set_forkserver_preload(["service.engine.worker", "json", "psutil", "pickle"])
        self.owner = owner
        self._lifeline_r, self._lifeline_w = self.ctx.Pipe(duplex=False)
        # a cluster host's lease on its jobs (service.engine.lease): workers end theirs once it is out
        self.lease = Lease(self.ctx) if leased else None
        self.slots: dict[int, Slot] = {}
        self.restarts = 0
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle
    def start(self, size: int) -> None:
        self._loop = asyncio.get_running_loop()
        for n in range(1, size + 1):
            self._launch(self._new(n))

    def _new(self, n: int, generation: int = 0) -> Slot:
        return Slot(n, f"{self.cfg.name}: worker {n}", generation=generation)

    def renew(self) -> None:
        """Replaces every worker gracefully (a reload): an idle one now, a busy one once its
        batch ends; the jobs it holds but has not started are given back (they start elsewhere,
        on a fresh worker), so every job that starts from now on runs on fresh imports."""
        for slot in list(self.slots.values()):
            if slot.state == "starting" or slot.killed or slot.dying:
                continue
            if not slot.batches:
                self.replace(slot, "reload")
                continue
            slot.renewing = True
            for jid in slot.pending_ids() - {slot.current}:
                self.cancel_pending(slot, jid)

    def resize(self, size: int) -> None:
        """Grows at once; shrinks by retiring the highest slots once they are idle."""
        for n in range(1, size + 1):
            if n not in self.slots:
                self._launch(self._new(n))
            else:
                self.slots[n].retiring = False  # kept after all (a shrink undone before it happened)
        for n, slot in list(self.slots.items()):
            if n > size:
                slot.retiring = True
                if not slot.batches:
                    self._drop(slot)

    def _launch(self, slot: Slot) -> None:
        if self.stopping:
            return
        self.slots[slot.n] = slot
        self._spawn(self._start_slot(slot))

    async def _start_slot(self, slot: Slot) -> None:
        slot.state, slot.pid, slot.tasks_done, slot.current = "starting", None, 0, None
        slot.generation += 1
        events_r, events_w = self.ctx.Pipe(duplex=False)
        control_r, control_w = self.ctx.Pipe(duplex=False)
        inherited: tuple[int, ...] = ()
        if self.cfg.start_method == "fork":
            inherited = tuple(c.fileno() for s in self.slots.values()
                              for c in (s.events, s.control) if c is not None)
            inherited += (self._lifeline_w.fileno(), events_r.fileno(), control_w.fileno())
        setup = WorkerSetup(slot.n, self.cfg.name, tuple(self.cfg.preload), inherited,
                            ledger.path(self.ledger, slot.n) if self.ledger else None,
                            self.label_output, self.end_children)
        executor = ProcessPoolExecutor(1, mp_context=self.ctx, initializer=worker.init,
                                       initargs=(setup, events_w, control_r, self._lifeline_r,
                                                 None if self.lease is None else self.lease.value))
        slot.executor, slot.events, slot.control = executor, events_r, control_w
        try:
            try:
                hello = executor.submit(worker.hello)  # starts the process: the pipe ends are now its own
            finally:
                events_w.close()
                control_r.close()
            slot.process = next(iter(getattr(executor, "_processes", {}).values()), None)
            slot.pid = getattr(slot.process, "pid", None)
            assert self._loop is not None
            slot.reader = FrameReader(events_r.fileno(), protocol.decode)
            self._loop.add_reader(events_r.fileno(), self._read, slot, slot.reader)
            pid, _ = await asyncio.wrap_future(hello)
        except Exception as e:  # noqa: BLE001 - a worker that cannot start is retried after a pause
            log.error("worker %d could not start: %s", slot.n, e)
            self._close(slot)
            self.owner.slot_failed(slot, e)
            await asyncio.sleep(1.0)
            if self.slots.get(slot.n) is slot:
                self._launch(slot)
            return
        slot.pid, slot.started_at, slot.oom_kills = pid, time.time(), supervisor.oom_kills()
        slot.state = "idle"
        log.debug("worker %d started (pid %d)", slot.n, pid)
        self.owner.slot_ready(slot)

    def _read(self, slot: Slot, reader: FrameReader) -> None:
        try:
            msgs = reader.read()
        except EOFError:  # the worker is gone
            assert self._loop is not None
            self._loop.remove_reader(reader.fd)
            msgs = reader.messages()
            if msgs:
                self.owner.slot_events(slot, msgs)
            if not slot.batches and slot.state == "idle" and self.slots.get(slot.n) is slot \
                    and not self.stopping:
                self._broken(slot, None)  # died between jobs: no future will tell
            return
        if msgs:
            self.owner.slot_events(slot, msgs)

    def drain(self, slot: Slot) -> None:
        """Reads what the worker sent before its batch ended (the pipe is read before the result)."""
        if slot.reader is not None and slot.events is not None and not slot.events.closed:
            self._read(slot, slot.reader)

    def submit(self, slot: Slot, batch: list[Any], jobs: list[Job], max_result_bytes: int = 0) -> None:
        """Hands the worker a batch: `batch` (the owner's Items) travels as `jobs`, in order."""
        assert slot.executor is not None
        fut: Future[int] = slot.executor.submit(worker.run_batch, jobs, max_result_bytes,
                                                self.cfg.max_memory_mb)
        slot.batches.append(batch)
        slot.state = "busy"
        gen = slot.generation
        assert self._loop is not None
        loop = self._loop
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._batch_done, slot, gen, batch, f))

    def _batch_done(self, slot: Slot, gen: int, batch: list[Any], fut: Future[int]) -> None:
        if gen != slot.generation or batch not in slot.batches:
            return  # a batch of a worker already replaced: handled when it broke
        self.drain(slot)
        exc = fut.exception()
        if exc is not None:
            self._broken(slot, exc)
            return
        slot.batches.remove(batch)
        if not slot.batches:
            slot.state = "idle"
        self.owner.batch_ended(slot, batch, None)
        if not slot.batches and slot.killed:  # killed (a cancel) just as its batch ended
            self.replace(slot, slot.killed)
        elif not slot.batches and slot.renewing:
            self.replace(slot, "reload")
        elif not slot.batches and (slot.retiring or self._due_for_recycling(slot)):
            self.replace(slot, "recycled")

    def _due_for_recycling(self, slot: Slot) -> bool:
        if self.cfg.max_tasks_per_worker and slot.tasks_done >= self.cfg.max_tasks_per_worker:
            return True
        if self.cfg.max_memory_mb and slot.pid is not None:
            try:
                return psutil.Process(slot.pid).memory_info().rss > self.cfg.max_memory_mb * 2**20
            except psutil.Error:
                return True
        return False

    def _broken(self, slot: Slot, exc: BaseException | None) -> None:
        """The worker died: its batches end with the exception, then the slot is rebuilt.

        A death we did not order waits (briefly, off the loop's back) for the executor's own
        thread to collect the exit status: reading it twice would lose it."""
        if slot.dying:
            return
        slot.dying = True
        if slot.killed:
            self._end_broken(slot, exc)
            return

        async def later() -> None:
            # the executor's own thread reads the exit status (under forkserver, from a pipe whose
            # two readers would each get half of it: 255): wait for it rather than read it too
            popen = getattr(slot.process, "_popen", None)
            for _ in range(1000):
                if popen is None or popen.returncode is not None:
                    break
                await asyncio.sleep(0.005)
            slot.exit = self.exit_description(slot)
            if getattr(slot.process, "exitcode", None) == lease.EXPIRED_EXIT and self.lease is not None \
                    and not self.lease.valid():  # (a job may exit with 75 too)
                slot.exit = LEASE_EXPIRED
            elif "SIGKILL" in slot.exit:  # not ours (a kill of ours is slot.killed): memory, most likely
                oom = supervisor.oom_kills() > slot.oom_kills
                slot.exit += (" by the kernel's OOM killer (out of memory)" if oom
                              else " — perhaps out of memory?")
            log.error("worker %d (pid %s) %s", slot.n, slot.pid, slot.exit)
            self._end_broken(slot, exc)

        self._spawn(later())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _end_broken(self, slot: Slot, exc: BaseException | None) -> None:
        # what the worker said before it died first: a job it started (or ended) is no job to give
        # back as never started
        self.drain(slot)
        batches, slot.batches = slot.batches, []
        for batch in batches:
            self.owner.batch_ended(slot, batch, exc or RuntimeError("the worker died"))
        self.replace(slot, slot.killed or "died")

    def cancel_pending(self, slot: Slot, job_id: str) -> None:
        """Tells the worker to skip a job it holds but has not started."""
        if slot.control is not None:
            try:
                slot.control.send([job_id])
            except (OSError, ValueError):  # closed: the worker is going anyway
                pass

    # -- ending workers
    def exit_description(self, slot: Slot) -> str:
        """How the worker ended, gunicorn style: "was sent SIGKILL" or "exited with code 3"."""
        code = getattr(slot.process, "exitcode", None)
        if code is None and slot.process is not None:
            slot.process.join(0.2)
            code = slot.process.exitcode
        return supervisor.describe_exit(code)

    def kill(self, slot: Slot, why: str = "killed") -> None:
        """SIGKILLs the worker and every process it started, at once (`why` names the cause)."""
        slot.killed = slot.killed or why
        if slot.pid is not None:
            supervisor.kill_tree(slot.pid, grace=0.0)

    async def end(self, slot: Slot, why: str) -> None:
        """Kills the worker and every process it started, and returns once they are gone."""
        slot.killed = slot.killed or why
        if slot.pid is not None:
            await asyncio.to_thread(supervisor.kill_tree, slot.pid)

    def replace(self, slot: Slot, why: str) -> None:
        """Gives the slot a fresh worker (or drops it when it is being retired)."""
        self.kill(slot, why)
        self._close(slot)
        self.restarts += 1
        self.owner.slot_replaced(why)
        if slot.retiring:
            self.slots.pop(slot.n, None)
            return
        self._launch(self._new(slot.n, slot.generation))

    def _drop(self, slot: Slot) -> None:
        self.kill(slot, "retired")
        self._close(slot)
        self.slots.pop(slot.n, None)

    def _close(self, slot: Slot) -> None:
        if slot.events is not None:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(slot.events.fileno())
                except (OSError, ValueError):
                    pass
            slot.events.close()
        if slot.control is not None:
            slot.control.close()
        if slot.executor is not None:
            slot.executor.shutdown(wait=False, cancel_futures=True)
        slot.generation += 1
        slot.events = slot.control = slot.executor = None

    async def stop(self, grace: float) -> None:
        """Ends every worker: SIGTERM, then SIGKILL after `grace`, then reap."""
        self.stopping = True
        for slot in self.slots.values():
            slot.killed = slot.killed or "shutdown"
        pids = [s.pid for s in self.slots.values() if s.pid is not None]
        await asyncio.to_thread(supervisor.kill_trees, pids, grace)
        for slot in list(self.slots.values()):
            self._close(slot)
        self.slots.clear()
        for task in list(self._tasks):
            task.cancel()
        self._lifeline_w.close()

    async def stop_helpers(self) -> None:
        """Ends the forkserver and resource tracker (after every process that holds their pipes)."""
        await asyncio.to_thread(supervisor.stop_helpers)

    def workers(self) -> list[dict[str, Any]]:
        """The Worker objects of the HTTP API (CONTRACT.md, "Worker")."""
        out = []
        for s in sorted(self.slots.values(), key=lambda s: s.n):
            rss = 0
            if s.pid is not None:
                try:
                    rss = psutil.Process(s.pid).memory_info().rss
                except psutil.Error:
                    pass
            out.append({"pid": s.pid, "name": s.name, "state": s.state, "job": s.current,
                        "rss_bytes": rss, "tasks_done": s.tasks_done,
                        "started_at": iso(s.started_at or time.time())})
        return out

    def processes(self) -> list[int]:
        return [s.pid for s in self.slots.values() if s.pid is not None]

    def helper_pids(self) -> set[int]:
        """Processes of multiprocessing itself (forkserver, resource tracker): not orphans."""
        return supervisor.multiprocessing_helpers()

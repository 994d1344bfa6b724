"""`service.Pool`: the daemon's engine inside any asyncio program — no daemon, HTTP or store.

Calls cross to the workers pickled, as with ProcessPoolExecutor, but each worker is its own
slot (service.engine.slots): a call can time out or be cancelled by killing its worker's whole
process tree, and a worker's death fails (or retries) its one call while the others go on.
Short calls go to a worker several at a time, sized from their measured run time
(service.engine.batching), and every result comes back over the worker's event pipe as it is
made, not through the executor's result queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import pickle
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from service.engine.batching import MAX_BATCH, RunTimes
from service.engine.errors import WorkerDied
from service.engine.options import PoolOptions
from service.engine.pickled import Raised, dump_call, load_exception
from service.engine.protocol import OK, Done, Event, PickledCall, Progress, Started
from service.engine.slots import Slot, Slots

log = logging.getLogger("poold.engine")

ProgressCallback = Callable[[float, float | None, str | None], Any]
_STOP_GRACE = 1.0  # seconds close() gives the workers between SIGTERM and SIGKILL


@dataclass(eq=False)
class _Call:
    """One attempt of a run(): waiting, held by a slot, or running there."""

    id: str
    key: Hashable  # the function, for its measured run time
    payload: bytes
    future: asyncio.Future[Any]
    timeout: float | None
    on_progress: ProgressCallback | None
    slot: Slot | None = None  # handed to this slot's worker
    running: bool = False
    ending: str = ""  # "timeout" | "cancel": being killed by us
    timer: asyncio.TimerHandle | None = None


def _key(fn: Any) -> Hashable:
    name = getattr(fn, "__qualname__", None)
    return (getattr(fn, "__module__", None), name) if name else id(fn)


class Pool:
    """A pool of named worker processes for an asyncio program (CONTRACT.md, "The engine as an
    asyncio library")."""

    def __init__(self, workers: int | None = None, *, start_method: str = "forkserver",
                 preload: Iterable[str] = (), max_tasks_per_worker: int = 0, max_memory_mb: int = 0,
                 name: str = "poold") -> None:
        self.options = PoolOptions(workers or 0, start_method, tuple(preload), max_tasks_per_worker,
                                   max_memory_mb, name)
        self._slots: Slots | None = None
        self._queue: deque[_Call] = deque()  # waiting for a worker
        self._held: dict[str, _Call] = {}  # handed to a worker, not ended
        self._times = RunTimes()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()  # kills after a timeout
        self._failure: BaseException | None = None  # why a worker could not start
        self._changed = asyncio.Event()
        self._kicked = False
        self._closed = False

    # -- life cycle
    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Starts the workers and returns once they are ready (a preload that fails raises)."""
        if self._slots is not None:
            return
        self._slots = Slots(self.options, self, label_output=False, end_children=True)
        self._slots.start(self.options.size)
        while not all(s.state != "starting" for s in self._slots.slots.values()):
            if self._failure is not None:
                await self.close()
                raise RuntimeError(f"a worker could not start: {self._failure}") from self._failure
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        """Waits for the calls still running, then stops every process the pool started."""
        self._closed = True
        slots = self._slots
        if slots is None:
            return
        while (self._queue or self._held) and self._failure is None:
            self._changed.clear()
            await self._changed.wait()
        self._slots = None
        await slots.stop(_STOP_GRACE)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for call in [*self._queue, *self._held.values()]:
            if not call.future.done():
                call.future.set_exception(RuntimeError("the pool was closed"))

    @property
    def workers(self) -> list[dict[str, Any]]:
        """The workers, as the HTTP API's Worker objects."""
        return self._slots.workers() if self._slots is not None else []

    # -- calls
    async def run(self, fn: Callable[..., Any], *args: Any, kwargs: dict[str, Any] | None = None,
                  timeout: float | None = None, retries: int = 0,
                  on_progress: ProgressCallback | None = None) -> Any:
        """fn(*args, **kwargs) in a worker: its value, or its exception re-raised here."""
        if self._closed or self._slots is None:
            raise RuntimeError("the pool is not running (use `async with Pool() as pool`)")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        payload = dump_call(fn, args, kwargs or {})  # what cannot be pickled is refused here
        key = _key(fn)
        for attempt in range(retries + 1):
            try:
                return await self._attempt(key, payload, timeout, on_progress)
            except Exception:
                if attempt == retries or self._closed:
                    raise
        raise AssertionError("unreachable")

    async def map(self, fn: Callable[..., Any], iterable: Iterable[Any] | AsyncIterable[Any], *,
                  timeout: float | None = None, concurrency: int | None = None) -> AsyncIterator[Any]:
        """fn(item) for each item, in input order, at most `concurrency` calls in flight (default
        2 x workers); an exception stops it and cancels what is in flight."""
        limit = concurrency or 2 * self.options.size
        if limit < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency!r}")
        flight: deque[asyncio.Task[Any]] = deque()
        items = _aiter(iterable)
        try:
            async for item in items:
                flight.append(asyncio.ensure_future(self.run(fn, item, timeout=timeout)))
                if len(flight) >= limit:
                    yield await flight.popleft()
            while flight:
                yield await flight.popleft()
        finally:
            for task in flight:
                task.cancel()
            await asyncio.gather(*flight, return_exceptions=True)

    async def _attempt(self, key: Hashable, payload: bytes, timeout: float | None,
                       on_progress: ProgressCallback | None) -> Any:
        loop = asyncio.get_running_loop()
        call = _Call(f"c{next(self._ids)}", key, payload, loop.create_future(), timeout, on_progress)
        self._queue.append(call)
        self._kick()
        try:
            return await call.future
        except asyncio.CancelledError:
            await self._abandon(call)
            raise

    async def _abandon(self, call: _Call) -> None:
        """The caller is gone: drop the call, or kill its tree and wait until it is gone."""
        if call in self._queue:
            self._queue.remove(call)
            return
        slot = call.slot
        if slot is not None and self._slots is not None:
            self._slots.drain(slot)  # a start the worker has reported but the loop not yet read
        if slot is None or call.id not in self._held:
            return  # it has ended
        call.ending = "cancel"
        if not call.running:  # held, not started: the worker skips it (killed if it starts)
            assert self._slots is not None
            self._slots.cancel_pending(slot, call.id)
            return
        ending = asyncio.ensure_future(self._end(slot))
        while not ending.done():  # a second cancel must not cut the kill short
            try:
                await asyncio.shield(ending)
            except asyncio.CancelledError:
                continue

    async def _end(self, slot: Slot) -> None:
        if self._slots is not None:
            await self._slots.end(slot, "cancel")

    # -- dispatch
    def _kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._fill)

    def _fill(self) -> None:
        self._kicked = False
        slots = self._slots
        if slots is None or not self._queue:
            return
        free = [s for s in slots.slots.values() if self._can_take(s)]
        for slot in free:
            if not self._queue:
                break
            size = min(self._times.batch_size(self._queue[0].key), MAX_BATCH,
                       max(1, math.ceil(len(self._queue) / len(free))))
            if self.options.max_tasks_per_worker:  # a batch never runs past the recycling point
                held = sum(len(b) for b in slot.batches)
                size = min(size, self.options.max_tasks_per_worker - slot.tasks_done - held)
                if size <= 0:
                    continue
            batch = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
            for call in batch:
                call.slot = slot
                self._held[call.id] = call
            slots.submit(slot, batch, [PickledCall(c.id, c.payload) for c in batch])

    def _can_take(self, s: Slot) -> bool:
        if not s.taking():
            return False
        if s.state == "idle" and not s.batches:
            return True
        return s.state == "busy" and len(s.batches) == 1 and self._times.short(s.batches[0][-1].key)

    # -- the slots' Owner
    def slot_ready(self, slot: Slot) -> None:
        self._changed.set()
        self._kick()

    def slot_failed(self, slot: Slot, exc: BaseException) -> None:
        self._failure = exc
        self._changed.set()

    def slot_replaced(self, why: str) -> None:
        pass

    def slot_events(self, slot: Slot, msgs: list[Event]) -> None:
        for msg in msgs:
            if type(msg) is Done:
                call = self._held.get(msg.id)
                if call is not None and call.slot is slot:
                    self._done(call, msg)
                if msg.next_id is not None:
                    self._started(slot, msg.next_id)
            elif type(msg) is Started:
                self._started(slot, msg.id)
            elif type(msg) is Progress:
                call = self._held.get(msg.id)
                if call is not None and call.on_progress is not None and not call.future.done():
                    try:
                        call.on_progress(msg.current, msg.total, msg.message)
                    except Exception:  # a callback's bug is logged, the call goes on
                        log.exception("on_progress raised")

    def _started(self, slot: Slot, cid: str) -> None:
        call = self._held.get(cid)
        if call is None or call.slot is not slot:
            return
        call.running = True
        slot.current = cid
        if call.ending:  # abandoned while it waited in the worker: killed now it has started
            self._spawn(self._end(slot))
        elif call.timeout is not None:
            call.timer = asyncio.get_running_loop().call_later(call.timeout, self._expire, call)

    def _expire(self, call: _Call) -> None:
        if call.id in self._held and call.slot is not None and not call.ending:
            call.ending = "timeout"
            self._spawn(self._timed_out(call, call.slot))

    async def _timed_out(self, call: _Call, slot: Slot) -> None:
        await self._end(slot)
        if not call.future.done():  # raised once the tree is gone, not before
            call.future.set_exception(TimeoutError(
                f"the call ran longer than its timeout ({call.timeout:g} s); its process tree was killed"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _done(self, call: _Call, msg: Done) -> None:
        self._forget(call)
        assert call.slot is not None
        call.slot.current = None
        call.slot.tasks_done += 1
        self._times.update(call.key, msg.seconds)
        if call.future.done() or call.ending:
            return
        if msg.outcome == OK:
            try:
                call.future.set_result(pickle.loads(msg.payload))
            except Exception as e:  # noqa: BLE001 - a value that cannot be unpickled here fails its call
                call.future.set_exception(e)
        else:
            raised: Raised = msg.payload
            call.future.set_exception(load_exception(raised))

    def _forget(self, call: _Call) -> None:
        self._held.pop(call.id, None)
        if call.timer is not None:
            call.timer.cancel()
        if not self._queue and not self._held:
            self._changed.set()

    def batch_ended(self, slot: Slot, batch: list[Any], exc: BaseException | None) -> None:
        back: list[_Call] = []
        calls: list[_Call] = batch
        for call in calls:
            if self._held.get(call.id) is not call:
                continue  # ended already
            if not call.running and not call.ending:
                back.append(call)  # never started: it goes first to the next worker
                del self._held[call.id]
                call.slot = None
                continue
            self._forget(call)
            if call.ending or call.future.done():
                continue  # killed by us: its caller has its answer (TimeoutError, CancelledError)
            if exc is None:
                call.future.set_exception(WorkerDied("the worker ended the call without a result"))
            else:
                call.future.set_exception(WorkerDied(f"worker {slot.n} (pid {slot.pid}) {slot.exit}"))
        self._queue.extendleft(reversed(back))
        self._changed.set()
        self._kick()


async def _aiter(iterable: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(iterable, AsyncIterable):
        async for item in iterable:
            yield item
    else:
        for item in iterable:
            yield item

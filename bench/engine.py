"""poold's embedded `service.Pool` beside the other asyncio ways to run a call in a process, in one run.

    python -m bench.engine [--workers 2] [--jobs 10000] [--calls 2000] [--rounds 5] [--quick]

The sides, each with --workers workers at its own default start method: the executor (the
baseline: `loop.run_in_executor(ProcessPoolExecutor)`), `anyio.to_process.run_sync` (cancellable,
a CapacityLimiter of --workers; its workers belong to the event loop, so they outlive a round),
`aiomultiprocess.Pool.apply` (its defaults: spawn, 16 coroutines per child), pebble's
`ProcessPool.schedule` through `asyncio.wrap_future`, and poold's `service.Pool.run`.

(a) --jobs no-op calls gathered at once, (b) --calls no-op calls one at a time (p50 and p99 over
all of them). Both run in --rounds interleaved rounds, each opening every side's pool afresh in a
rotated order, as the machine is shared and noisy: noise only ever adds time, so the best batch
counts. (c) Capabilities, each tried on a fresh pool rather than taken from the docs: a call past
its deadline, a cancelled call (both the job `hold`, which forks a child `sleep` and beats a file
while it runs), a call whose worker SIGKILLs itself beside other calls. Last, no process may be
left: any child of this process, or process a job reported, still alive is reported and killed.

Targets (the contract): throughput >= 1.0 x the executor's; one call at a time p50 <= 1.2 x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from bench import engine_jobs as J
from bench.concurrency import wait_quiet

Fn = Callable[..., Any]
TARGET_THROUGHPUT, TARGET_P50 = 1.0, 1.2
DEADLINE, HOLD, HANG = 1.0, 4.0, 5.0  # a call's timeout; hold's run time; a call not back is hung
TRACKED: list[tuple[str, psutil.Process]] = []  # (side, process) of every `hold` and its child


class Side:
    """One way to run a call in a worker process; `missing` says why it cannot run here."""

    name = ""
    module = ""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.missing: str | None = None
        try:
            importlib.import_module(self.module)
        except ImportError as e:
            self.missing = f"not importable: {e}"

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def call(self, fn: Fn, *args: Any) -> Awaitable[Any]:
        raise NotImplementedError

    def timed(self, fn: Fn, *args: Any, timeout: float) -> Awaitable[Any]:
        return asyncio.wait_for(self.call(fn, *args), timeout)


class Executor(Side):
    name, module = "executor", "concurrent.futures"

    async def open(self) -> None:
        self.ex, self.loop = ProcessPoolExecutor(self.workers), asyncio.get_running_loop()

    def call(self, fn: Fn, *args: Any) -> Awaitable[Any]:
        return self.loop.run_in_executor(self.ex, fn, *args)

    async def close(self) -> None:
        await asyncio.to_thread(self.ex.shutdown, True, cancel_futures=True)


class Anyio(Side):
    name, module = "anyio", "anyio.to_process"

    async def open(self) -> None:
        from anyio import CapacityLimiter, to_process
        self.limiter, self.run_sync = CapacityLimiter(self.workers), to_process.run_sync

    def call(self, fn: Fn, *args: Any) -> Awaitable[Any]:
        return self.run_sync(fn, *args, cancellable=True, limiter=self.limiter)


class Aiomp(Side):
    name, module = "aiomultiprocess", "aiomultiprocess"
    ASYNC: dict[Fn, Fn] = {
        J.noop: J.a_noop, J.nap: J.a_nap, J.die: J.a_die, J.hold: J.a_hold}

    async def open(self) -> None:
        import aiomultiprocess
        self.pool = aiomultiprocess.Pool(processes=self.workers)

    def call(self, fn: Fn, *args: Any) -> Awaitable[Any]:
        return self.pool.apply(self.ASYNC[fn], args)

    async def close(self) -> None:
        self.pool.terminate()
        await self.pool.join()


class Pebble(Side):
    name, module = "pebble", "pebble"

    async def open(self) -> None:
        import pebble
        self.pool = pebble.ProcessPool(max_workers=self.workers)

    def call(self, fn: Fn, *args: Any) -> Awaitable[Any]:
        return asyncio.wrap_future(self.pool.schedule(fn, args=args))

    def timed(self, fn: Fn, *args: Any, timeout: float) -> Awaitable[Any]:
        return asyncio.wrap_future(self.pool.schedule(fn, args=args, timeout=timeout))

    async def close(self) -> None:
        self.pool.stop()
        await asyncio.to_thread(self.pool.join)


class Poold(Side):
    name, module = "poold", "service"

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        if self.missing is None and not hasattr(importlib.import_module("service"), "Pool"):
            self.missing = "skipped: `from service import Pool` fails (service/engine/pool.py not there yet)"

    async def open(self) -> None:
        from service import Pool  # type: ignore[attr-defined,unused-ignore]
        self.stack = contextlib.AsyncExitStack()
        self.pool = await self.stack.enter_async_context(Pool(workers=self.workers))

    def call(self, fn: Fn, *args: Any) -> Awaitable[Any]:
        return self.pool.run(fn, *args)

    def timed(self, fn: Fn, *args: Any, timeout: float) -> Awaitable[Any]:
        return self.pool.run(fn, *args, timeout=timeout)

    async def close(self) -> None:
        await self.stack.aclose()


@contextlib.asynccontextmanager
async def opened(side: Side) -> AsyncIterator[None]:
    """The side's pool, warm: processes started, the jobs imported, each path taken once; closed."""
    await side.open()
    try:
        await asyncio.gather(*(side.call(J.noop, i) for i in range(side.workers * 4)))
        for i in range(20):
            await side.call(J.noop, i)
        yield
    finally:
        await side.close()


async def batch(side: Side, n: int) -> float:
    t = time.perf_counter()
    out = await asyncio.gather(*(side.call(J.noop, i) for i in range(n)))
    dt = time.perf_counter() - t
    assert list(out) == list(range(n)), side.name
    return dt


async def one_by_one(side: Side, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        assert await side.call(J.noop, i) == i
        out.append(time.perf_counter() - t)
    return out


async def speed(sides: list[Side], a: argparse.Namespace) -> tuple[dict[str, float], dict[str, list[float]]]:
    best = {s.name: float("inf") for s in sides}
    lat: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(a.rounds):
        line = []
        for s in sides[r % len(sides):] + sides[:r % len(sides)]:
            if s.missing:
                continue
            try:
                async with opened(s):
                    lat[s.name] += await one_by_one(s, max(1, a.calls // a.rounds))
                    dt = await batch(s, a.jobs)
            except Exception as e:  # noqa: BLE001 - a side that fails is a row of the table
                s.missing, dt = f"failed in round {r + 1}: {type(e).__name__}: {e}", float("inf")
            best[s.name] = min(best[s.name], dt)
            line.append(f"{s.name} {dt:.2f} s")
        print(f"  round {r + 1}: {', '.join(line)}", flush=True)
    return best, lat


async def pids(side: Side, path: Path) -> tuple[psutil.Process, psutil.Process]:
    """The worker running `hold` and its child, once it wrote them (tracked for the final check)."""
    end = time.monotonic() + HANG
    while not path.exists():
        if time.monotonic() > end:
            raise RuntimeError("hold did not start")
        await asyncio.sleep(0.01)
    worker, child = (psutil.Process(int(x)) for x in path.read_text().split())
    TRACKED.extend([(side.name, worker), (side.name, child)])
    return worker, child


async def aftermath(path: Path, child: psutil.Process) -> tuple[bool, bool]:
    """(call stopped, child gone), each within 1 s: no beat for 0.3 s; the child dead or a zombie."""
    end, beat = time.monotonic() + 1.0, Path(f"{path}.beat")
    last, since, stopped = beat.stat().st_size, time.monotonic(), False
    while not stopped and time.monotonic() < end:
        await asyncio.sleep(0.05)
        if (size := beat.stat().st_size) != last:
            last, since = size, time.monotonic()
        stopped = time.monotonic() - since >= 0.3
    while not (gone := not alive(child)) and time.monotonic() < end:
        await asyncio.sleep(0.02)
    return stopped, gone


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tree_note(stopped: bool, gone: bool) -> tuple[str, str]:
    if stopped and gone:
        return "yes", "call and its child killed"
    if stopped:
        return "partial", "call killed, its child `sleep` left"
    return "no", "the call runs on" if gone else "the call and its child run on"


async def try_timeout(side: Side, tmp: Path) -> str:
    path, t = tmp / f"{side.name}-timeout", time.monotonic()
    task = asyncio.ensure_future(asyncio.wait_for(side.timed(J.hold, str(path), HOLD, timeout=DEADLINE),
                                                  DEADLINE + HANG))
    _, child = await pids(side, path)
    await asyncio.wait({task})
    took, err = time.monotonic() - t, task.exception()
    if err is None:
        return f"no: ran to its end ({took:.1f} s)"
    if took > DEADLINE + 1.0:
        return f"no: {type(err).__name__} only after {took:.1f} s"
    verdict, note = tree_note(*await aftermath(path, child))
    return f"{'partial' if verdict == 'no' else verdict}: {type(err).__name__} at {took:.2f} s; {note}"


async def try_cancel(side: Side, tmp: Path) -> str:
    path = tmp / f"{side.name}-cancel"
    task = asyncio.ensure_future(side.call(J.hold, str(path), HOLD))
    _, child = await pids(side, path)
    t = time.monotonic()
    task.cancel()
    await asyncio.wait({task}, timeout=HANG)
    took = time.monotonic() - t
    if not task.done():
        return f"no: still not cancelled after {took:.0f} s"
    verdict, note = tree_note(*await aftermath(path, child))
    return f"{verdict}: cancelled in {took:.2f} s; {note}"


async def attempt(side: Side, fn: Fn, *args: Any) -> str | None:
    """None if the call succeeded, else what it raised ("hung": nothing within HANG s)."""
    try:
        await asyncio.wait_for(side.call(fn, *args), HANG)
        return None
    except TimeoutError:
        return "hung"
    except Exception as e:  # noqa: BLE001 - what the side raises is the measurement
        return type(e).__name__


async def try_death(side: Side, tmp: Path) -> str:
    n = 2 * side.workers
    dying, *others = await asyncio.gather(attempt(side, J.die),
                                          *(attempt(side, J.nap, 0.3) for _ in range(n)))
    later = await asyncio.gather(*(attempt(side, J.noop, i) for i in range(n)))
    ok_others, ok_later = others.count(None), later.count(None)
    verdict = ("yes" if dying not in (None, "hung") and ok_others == n and ok_later == n
               else "no" if ok_later == 0 else "partial")
    call = "the call hangs" if dying == "hung" else f"the call raises {dying}"
    return f"{verdict}: {call}; {ok_others}/{n} beside it ok; {ok_later}/{n} later ok"


async def capabilities(side: Side, tmp: Path) -> list[str]:
    cells = []
    for test in (try_timeout, try_cancel, try_death):
        mark = len(TRACKED)
        try:
            async with opened(side):
                cells.append(await test(side, tmp))
        except Exception as e:  # noqa: BLE001 - a side that fails is a cell of the table
            cells.append(f"error: {type(e).__name__}: {e}")
        if left := [p for _, p in TRACKED[mark:] if alive(p)]:  # its orphans: kill them now
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            cells[-1] += f"; {len(left)} of its processes left after close (killed by the bench)"
    return cells


async def bench(a: argparse.Namespace) -> tuple[list[Side], dict[str, float], dict[str, list[float]],
                                                dict[str, list[str]]]:
    sides: list[Side] = [cls(a.workers) for cls in (Executor, Anyio, Aiomp, Pebble, Poold)]
    for s in sides:
        if s.missing:
            print(f"{s.name}: {s.missing}", flush=True)
    wait_quiet(10 if a.quick else 30)
    best, lat = await speed(sides, a)
    caps: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        for s in sides:
            if not s.missing:
                caps[s.name] = await capabilities(s, Path(tmp))
    return sides, best, lat, caps


def leftovers() -> tuple[list[str], list[str]]:
    """(left: named and killed, staying): children of this process and processes `hold` reported.
    Staying are the program's, which end with it: multiprocessing's forkserver and resource tracker
    (as the contract allows) and aiomultiprocess's global SyncManager (a spawned process)."""
    manager = getattr(getattr(sys.modules.get("aiomultiprocess.core"), "_manager", None), "_process", None)
    end = time.monotonic() + 2.0
    while True:
        procs = {p.pid: p for p in psutil.Process().children(recursive=True) if alive(p)}
        procs.update((p.pid, p) for _, p in TRACKED if alive(p))
        staying: dict[int, str] = {}
        for pid, p in procs.items():
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if "forkserver import" in cmd or "resource_tracker import" in cmd:
                    staying[pid] = f"{cmd.split('multiprocessing.')[1].split()[0]} {pid}"
            if manager is not None and pid == manager.pid:
                staying[pid] = f"aiomultiprocess's manager {pid}"
        if len(procs) == len(staying) or time.monotonic() > end:
            break
        time.sleep(0.1)
    side_of, left = {p.pid: name for name, p in TRACKED}, []
    for pid, p in procs.items():
        if pid not in staying:
            with contextlib.suppress(psutil.Error):
                left.append(f"{side_of.get(pid, '?')}: pid {pid} {' '.join(p.cmdline())[:60]!r}")
                p.kill()
    return left, list(staying.values())


def report(a: argparse.Namespace, sides: list[Side], best: dict[str, float], lat: dict[str, list[float]],
           caps: dict[str, list[str]], left: list[str], staying: list[str]) -> None:
    base, base_p50 = best["executor"], statistics.median(lat["executor"])
    p50 = {k: statistics.median(v) if v else float("nan") for k, v in lat.items()}
    p99 = {k: sorted(v)[int(len(v) * 0.99) - 1] if v else float("nan") for k, v in lat.items()}
    rows = {s.name: [f"{s.missing} | |"] * 3 if s.missing else [
        f"{best[s.name]:.3f} | {a.jobs / best[s.name]:,.0f} | {base / best[s.name]:.2f}",
        f"{p50[s.name] * 1e3:.3f} | {p99[s.name] * 1e3:.3f} | {p50[s.name] / base_p50:.2f}",
        " | ".join(caps[s.name])] for s in sides}
    heads = [f"(a) {a.jobs:,} no-op calls gathered at once, {a.workers} workers, best of {a.rounds}"
             " rounds\n\n"
             "| side | best s | calls/s | x executor |",
             f"(b) one call at a time, {max(1, a.calls // a.rounds) * a.rounds} calls a side\n\n"
             "| side | p50 ms | p99 ms | p50 x executor |",
             f"(c) capabilities, each tried (deadline {DEADLINE:g} s, `hold` runs {HOLD:g} s)\n\n"
             "| side | times out | cancel kills tree | survives worker death |"]
    for k, head in enumerate(heads):
        print(f"\n{head}\n|---|---|---|---|")
        for s in sides:
            print(f"| {s.name} | {rows[s.name][k]} |")
    print(f"\nleft behind, killed now: {'; '.join(left) if left else 'nothing'}"
          f" (staying till exit, the program's: {', '.join(staying) or 'none'})")
    skip = any(s.missing for s in sides if s.name == "poold")
    for measure, target, x, ok in (
            (f"{a.jobs:,} no-op calls gathered, throughput poold / executor", f">= {TARGET_THROUGHPUT}",
             base / best["poold"], base / best["poold"] >= TARGET_THROUGHPUT),
            ("one call at a time, p50 poold / executor", f"<= {TARGET_P50}",
             p50["poold"] / base_p50, p50["poold"] / base_p50 <= TARGET_P50)):
        figure = "skipped (no service.Pool)" if skip else f"{x:.2f}"
        print(f"target: {measure} {target}: {figure} -> {'HOLDS' if ok and not skip else 'MISSED'}")
        print("RESULT " + json.dumps({"measure": f"engine: {measure}", "target": target, "figure": figure,
                                      "ok": bool(ok and not skip)}))
    verdicts = "/".join(c.split(":")[0] for c in caps.get("poold", ["skipped"]))
    print("RESULT " + json.dumps({"measure": "engine: poold times out/cancel kills tree/survives death",
                                  "target": "yes/yes/yes", "figure": verdicts,
                                  "ok": verdicts == "yes/yes/yes"}))
    print("RESULT " + json.dumps({"measure": "engine: processes left behind", "target": "0",
                                  "figure": str(len(left)), "ok": not left}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=10000, help="no-op calls gathered at once")
    ap.add_argument("--calls", type=int, default=2000, help="no-op calls one at a time, over all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved; the best batch of each side counts")
    ap.add_argument("--quick", action="store_true", help="2000 gathered, 300 one at a time, 2 rounds")
    a = ap.parse_args()
    if a.quick:
        a.jobs, a.calls, a.rounds = 2000, 300, 2
    sides, best, lat, caps = asyncio.run(bench(a))
    report(a, sides, best, lat, caps, *leftovers())


if __name__ == "__main__":
    main()

"""The embedded engine, `service.Pool`, as an asyncio program uses it: real worker processes,
real kills, and `ps` after each test (CONTRACT.md, "The engine as an asyncio library")."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from service import Pool, WorkerDied
from tests.support import engine_jobs as J
from tests.support.daemon import gone, wait_for

PERSISTENT = ("forkserver", "resource_tracker")  # multiprocessing's own: the program's, not ours


def ours() -> list[psutil.Process]:
    """This test process's descendants, but multiprocessing's helpers."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not any(h in " ".join(p.cmdline()) for h in PERSISTENT):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    yield
    assert wait_for(lambda: not ours(), 5), [(p.pid, p.cmdline()) for p in ours()]


def run(coro: Callable[[Pool], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        async with Pool(**{"workers": 2, **kw}) as pool:
            return await coro(pool)

    return asyncio.run(main())


def pids_of(pidfile: Path) -> list[int]:
    assert wait_for(pidfile.exists, 10)
    return [int(x) for x in pidfile.read_text().split()]


# -- values and exceptions


def test_values_cross_pickled_as_with_process_pool_executor() -> None:
    async def go(pool: Pool) -> Any:
        return (await pool.run(J.add, 2, 3), await pool.run(J.echo, {1, 2}, b"x", kwargs={"k": (1,)}),
                await pool.run(J.add, [1], [2]))

    assert run(go) == (5, (({1, 2}, b"x"), {"k": (1,)}), [1, 2])


def test_the_calls_exception_is_raised_with_the_workers_traceback() -> None:
    async def go(pool: Pool) -> BaseException:
        with pytest.raises(ValueError, match="from the worker") as e:
            await pool.run(J.boom, "from the worker")
        return e.value

    exc = run(go)
    assert "in boom" in str(exc.__cause__) and "Traceback" in str(exc.__cause__), exc.__cause__


@pytest.mark.parametrize(("fn", "args", "raised"), [
    (lambda: 1, (), (pickle.PicklingError, AttributeError)),  # not importable by a worker
    (J.echo, (lambda: 1,), (pickle.PicklingError, AttributeError)),
    (J.unpicklable_value, (), (pickle.PicklingError, AttributeError, TypeError)),
])
def test_what_cannot_be_pickled_fails_that_call_alone(fn: Any, args: tuple[Any, ...],
                                                      raised: tuple[type[BaseException], ...]) -> None:
    async def go(pool: Pool) -> int:
        with pytest.raises(raised):
            await pool.run(fn, *args)
        return int(await pool.run(J.add, 1, 1))

    assert run(go) == 2


# -- timeouts, cancellation, deaths


def test_a_timeout_kills_the_whole_tree_and_nothing_else(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"

    async def go(pool: Pool) -> tuple[float, list[int], float]:
        other = asyncio.ensure_future(pool.run(J.nap, 1.5))
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.run(J.tree, str(pidfile), 60, timeout=1.0)
        took = time.monotonic() - t
        pids = pids_of(pidfile)
        assert all(gone(p) for p in pids), pids  # killed before TimeoutError was raised
        return took, pids, await other

    took, _pids, other = run(go)
    assert 1.0 <= took < 2.0, took
    assert other == 1.5


@pytest.mark.parametrize("how", ["task-cancel", "asyncio.timeout", "wait_for", "taskgroup"])
def test_cancelling_the_caller_kills_the_calls_tree_first(tmp_path: Path, how: str) -> None:
    pidfile = tmp_path / "pids"

    async def call(pool: Pool) -> None:
        await pool.run(J.tree, str(pidfile), 60)

    async def fail_soon() -> None:
        await asyncio.sleep(0.5)
        raise KeyError("sibling failed")

    async def go(pool: Pool) -> Any:
        other = asyncio.ensure_future(pool.run(J.nap, 1.0))
        if how == "task-cancel":
            task = asyncio.ensure_future(call(pool))
            await asyncio.to_thread(pids_of, pidfile)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        elif how == "asyncio.timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await call(pool)
        elif how == "wait_for":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call(pool), 0.5)
        else:
            with pytest.raises(ExceptionGroup):
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(call(pool))
                    tg.create_task(fail_soon())
        pids = pids_of(pidfile)
        assert all(gone(p) for p in pids), [(p, psutil.Process(p).status()) for p in pids if not gone(p)]
        return await other, await pool.run(J.add, 1, 2)

    assert run(go) == (1.0, 3)


def test_a_call_cancelled_before_it_starts_never_runs(tmp_path: Path) -> None:
    async def go(pool: Pool) -> Any:
        busy = asyncio.ensure_future(pool.run(J.nap, 0.5))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(pool.run(J.tree, str(tmp_path / "never"), 60))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await busy

    assert run(go, workers=1) == 0.5
    assert not (tmp_path / "never").exists()


def test_a_worker_death_names_the_signal_and_spares_the_others(tmp_path: Path) -> None:
    async def go(pool: Pool) -> Any:
        others = [asyncio.ensure_future(pool.run(J.nap, 0.3)) for _ in range(3)]
        with pytest.raises(WorkerDied, match=r"worker \d \(pid \d+\) was sent SIGKILL"):
            await pool.run(J.die)
        return await asyncio.gather(*others), await pool.run(J.die_once, str(tmp_path / "m"), retries=1)

    assert run(go) == ([0.3] * 3, "second attempt")


def test_retries_after_an_exception_and_a_timeout(tmp_path: Path) -> None:
    async def go(pool: Pool) -> None:
        with pytest.raises(ValueError):
            await pool.run(J.boom, "again", retries=2)
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.run(J.nap, 10, timeout=0.3, retries=1)
        assert time.monotonic() - t >= 0.6  # two attempts

    run(go)


# -- map, progress, workers


def test_map_keeps_input_order_and_stops_at_an_exception() -> None:
    async def go(pool: Pool) -> Any:
        slow_first = [v async for v in pool.map(J.nap, [0.2, 0.0, 0.1, 0.0])]
        many = [v async for v in pool.map(abs, range(-100, 0), concurrency=3)]
        got = []
        with pytest.raises(ValueError, match="bad"):
            async for v in pool.map(J.boom, ["bad"] * 3):
                got.append(v)
        return slow_first, many, got

    assert run(go) == ([0.2, 0.0, 0.1, 0.0], list(range(100, 0, -1)), [])


def test_progress_reaches_the_callback_with_the_last_report() -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def go(pool: Pool) -> Any:
        return await pool.run(J.report, 1000, on_progress=lambda c, t, m: seen.append((c, t, m)))

    assert run(go) == 1000
    assert seen and seen[-1] == (1000.0, 1000.0, "step 1000"), seen[-3:]
    assert len(seen) < 100  # rate-limited


def test_workers_are_named_and_what_a_call_leaves_is_ended(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"

    async def go(pool: Pool) -> Any:
        names = [(w["name"], psutil.Process(w["pid"]).name()) for w in pool.workers]
        assert await pool.run(J.leave_child, str(pidfile)) == "returned"
        child = int(pidfile.read_text())
        assert await asyncio.to_thread(wait_for, lambda: gone(child), 5), child
        return names

    names = run(go, name="crunch")
    assert sorted(n for n, _ in names) == ["crunch: worker 1", "crunch: worker 2"]


def test_a_preload_that_fails_raises_at_start() -> None:
    with pytest.raises(RuntimeError, match="could not start"):
        run(lambda pool: pool.run(J.add, 1, 1), preload=("no_such_module_for_poold",))


def test_a_closed_pool_refuses_calls() -> None:
    async def go() -> None:
        pool = Pool(workers=1)
        async with pool:
            assert await pool.run(J.add, 1, 1) == 2
        with pytest.raises(RuntimeError, match="not running"):
            await pool.run(J.add, 1, 1)
        assert pool.workers == []

    asyncio.run(go())


OWNER = """
import asyncio, sys
from service import Pool
from tests.support import engine_jobs as J

async def main():
    async with Pool(workers=2) as pool:
        calls = [asyncio.ensure_future(pool.run(J.tree, sys.argv[1], 120))]
        print(" ".join(str(w["pid"]) for w in pool.workers), flush=True)
        await asyncio.gather(*calls)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_the_workers_die_with_the_program_even_on_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    pidfile = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(pidfile)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout is not None
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2, workers
        job = pids_of(pidfile)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_for(lambda: all(gone(p) for p in workers + job), 10), \
            [p for p in workers + job if not gone(p)]
    finally:
        proc.kill()
        proc.wait()

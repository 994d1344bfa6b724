"""Start-up and two-phase shutdown, signals and reload: the order in which things live and die.

Signal handlers only record (an Event); the main coroutine does the work.
SIGTERM/SIGINT: stop taking jobs (503 draining), let running jobs finish for
up to `supervisor.shutdown_grace`, then end them (interrupted; retried on the
next start when retries are left), then SIGTERM → SIGKILL → reap the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import web

import service
from service import config as config_mod
from service.config import Config, ConfigError
from service.daemon import logs, stores, systemd
from service.daemon.housekeeping import Watch
from service.engine.probe import Probe
from service.engine.procs import leftovers, supervisor
from service.http.routes import Context, make_app, refuse_expectation
from service.http.runner import Runner
from service.queue.allow import Allow
from service.queue.dispatcher import Scheduler
from service.queue.metrics import Metrics

if TYPE_CHECKING:
    from service.queue.cluster import HostKeeper
from service.store.base import JobStore, StoreError

log = logging.getLogger("poold")


def run(cfg: Config, early: list[int] | None = None) -> int:
    """Runs the daemon until SIGTERM or SIGINT; 0 after a clean shutdown, 1 on a fatal error.

    `early`: signals that came before the event loop's handlers were in place (noted by the
    caller); the daemon then stops as soon as it has started."""
    logs.setup(cfg.log.level, cfg.log.format)
    # the executors' threads (feeding work to workers) must not wait 5 ms for the GIL while the
    # event loop is busy: that wait would be every job's latency
    sys.setswitchinterval(0.0005)
    try:
        import setproctitle

        setproctitle.setproctitle("poold: main")
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    _warn_loose_token_file(cfg.server.token_file)
    if os.geteuid() == 0:
        log.warning("running as root: jobs run as root too; the shipped systemd/poold.service runs"
                    " poold as an unprivileged user")
    try:
        import uvloop

        return uvloop.run(_serve(cfg, early if early is not None else []))  # the same list: the
        # CLI's handlers keep noting signals into it until _serve puts the loop's own in place
    except _Fatal as e:
        log.error("%s", e)
        return 1


class _Fatal(Exception):
    pass


def _warn_loose_token_file(path: str) -> None:
    """A token others can read is no secret: say so (the daemon still starts)."""
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("server.token_file %s can be read by others (mode %o): chmod 600 it",
                    path, mode & 0o777)


@asynccontextmanager
async def _listening(app: web.Application, cfg: Config) -> AsyncIterator[list[str]]:
    """Binds the sockets (activated ones first) and serves the app; yields where it listens."""
    runner = Runner(app, refuse=refuse_expectation, access_log=None, handle_signals=False,
                    shutdown_timeout=1.0)
    await runner.setup()
    where = []
    made: list[tuple[str, int, int]] = []  # socket files this instance bound: removed on the way out
    try:
        activated = systemd.listen_sockets()
        sites: list[web.BaseSite] = [web.SockSite(runner, s) for s in activated]
        where += [f"activated socket {s.getsockname()!r}" for s in activated]
        if not activated:
            if cfg.server.port:
                sites.append(web.TCPSite(runner, cfg.server.host, cfg.server.port, reuse_address=True))
                where.append(f"http://{cfg.server.host}:{cfg.server.port}")
            if cfg.server.unix_socket:
                _remove_stale_socket(cfg.server.unix_socket)
                sites.append(web.UnixSite(runner, cfg.server.unix_socket))
                where.append(f"unix:{cfg.server.unix_socket}")
        for site in sites:
            try:
                await site.start()
            except OSError as e:
                raise _Fatal(f"cannot listen on {site.name}: {e}") from None
            if isinstance(site, web.UnixSite):
                st = os.stat(cfg.server.unix_socket)
                made.append((cfg.server.unix_socket, st.st_dev, st.st_ino))
        yield where
    finally:
        await runner.cleanup()
        for path, dev, ino in made:  # ours only: not a socket another process bound there since
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)


def _remove_stale_socket(path: str) -> None:
    """Removes a socket file left by a dead instance (never a live one's, never a regular file)."""
    if not os.path.exists(path) or not stat.S_ISSOCK(os.stat(path).st_mode):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise _Fatal(f"another process is listening on {path}")
    finally:
        probe.close()


def _keeper(cfg: Config, store: JobStore, scheduler: Scheduler) -> HostKeeper | None:
    """The cluster side of a host on PostgreSQL (None on SQLite)."""
    if not cfg.store.url:
        return None
    from service.queue.cluster import HostKeeper
    from service.store.postgres.store import PgStore

    assert isinstance(store, PgStore)
    return HostKeeper(cfg.cluster, store, scheduler, cfg.store.url)


async def _leave(keeper: HostKeeper, patience: float = 10.0) -> None:
    """The host leaves the cluster, its workers gone and its writes in: what it held goes back
    (retried or interrupted; never started: queued as it was). Tried for `patience` seconds;
    else the other hosts rescue its jobs once its heartbeat is old."""
    store = keeper.store
    end = asyncio.get_running_loop().time() + patience
    await store.settle(patience)
    while True:
        try:
            retried, failed = await store.hosts.leave()
        except StoreError:
            if asyncio.get_running_loop().time() > end:
                log.error("could not leave the cluster: the other hosts take this host's jobs"
                          " once its heartbeat is %g s old", keeper.cfg.host_timeout)
                return
            await asyncio.sleep(0.2)
            continue
        if retried or failed:
            log.info("left the cluster: %d running jobs requeued, %d failed as interrupted", retried, failed)
        return


async def _both(first: asyncio.Task[None], second: Coroutine[Any, Any, None]) -> None:
    """Runs a second long task beside the first; ends both when either ends (or on cancel)."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(second)
        await first


def _workers(n: int) -> str:
    return "1 worker" if n == 1 else f"{n} workers"


async def _serve(cfg: Config, early: list[int]) -> int:
    loop = asyncio.get_running_loop()
    stop, reload = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    if early:
        stop.set()
    supervisor.set_subreaper()
    try:
        opened = await stores.open_store(cfg)
    except stores.OpenError as e:
        raise _Fatal(str(e)) from None
    store = opened.store
    tag = supervisor.tag_instance()
    ended = supervisor.end_previous(await store.recorded_processes(), cfg.supervisor.kill_grace)
    if ended:
        log.warning("ended %d processes left by a previous instance", ended)
    if opened.retried or opened.failed:
        log.warning("recovered from an unclean stop: %d running jobs requeued, %d failed as interrupted",
                    opened.retried, opened.failed)
    scheduler: Scheduler
    metrics = Metrics(lambda: scheduler.state())
    scheduler = Scheduler(cfg, store, metrics, host=opened.host, poll=opened.poll)
    keeper = _keeper(cfg, store, scheduler)
    # function lookups run in a process of the pool's, never here (service.engine.probe)
    probe = Probe(cfg.pool.start_method, getattr(scheduler.pool, "_lifeline_r", None))
    ctx = Context(cfg=cfg, store=store, scheduler=scheduler, metrics=metrics,
                  allow=Allow(cfg.jobs.allow, probe), token=cfg.token, version=service.__version__,
                  cluster=None if keeper is None else keeper.store.hosts)
    try:
        # the sockets first: a port in use is said at once, before any worker is started
        async with _listening(make_app(ctx), cfg) as where:
            scheduler.start()
            probe.start()
            log.info("poold %s serving on %s with %s (%s), store %s", service.__version__,
                     ", ".join(where), _workers(cfg.pool.size), cfg.pool.start_method, cfg.store.where)
            watch_task = loop.create_task(Watch(ctx).run())
            if keeper is not None:
                keeper.renew(keeper.store.hosts.registered_at)  # the first lease: from the registration
                watch_task = loop.create_task(_both(watch_task, keeper.run()))
            await _wait_ready(scheduler, stop)
            if not stop.is_set():  # stopped before it was ready: no READY=1, straight to STOPPING=1
                systemd.notify("READY=1", f"STATUS=serving with {_workers(cfg.pool.size)}")
            while not stop.is_set():
                await _first(stop, reload)
                if reload.is_set() and not stop.is_set():
                    reload.clear()
                    _reload(ctx)
            if keeper is not None:
                keeper.draining = True
            await _drain(ctx)
            watch_task.cancel()
            await asyncio.gather(watch_task, return_exceptions=True)
    finally:
        probe.close()
        await scheduler.stop()
        await scheduler.pool.stop(ctx.cfg.supervisor.kill_grace)
        # whatever still carries this instance's tag (leftovers the sweep has not reached); they
        # may hold the forkserver's pipe, so they go before it
        await asyncio.to_thread(supervisor.end_tagged, tag, ctx.cfg.supervisor.kill_grace,
                                scheduler.pool.helper_pids())
        # and any child of ours but multiprocessing's helpers (re-parented orphans, tag or not)
        found = leftovers.find_leftovers(scheduler.pool.helper_pids(), {}, {})
        await asyncio.to_thread(leftovers.sweep, found, ctx.cfg.supervisor.kill_grace)
        await scheduler.pool.stop_helpers()
        if keeper is not None:
            await _leave(keeper)
        with contextlib.suppress(StoreError):
            await store.committed()
        await store.aclose()
    log.info("poold stopped")
    return 0


async def _wait_ready(scheduler: Scheduler, stop: asyncio.Event, timeout: float = 30.0) -> None:
    """Waits until a worker runs (or timeout, or a stop): READY=1 means jobs are really accepted
    and run. A SIGTERM meanwhile (workers that cannot start) drains at once, not 30 s later."""
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end and not stop.is_set():
        if any(s.state != "starting" for s in scheduler.pool.slots.values()):
            return
        await asyncio.sleep(0.02)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _reload(ctx: Context) -> None:
    """Applies a re-read configuration; a bad one is logged with its key and the old one stays."""
    systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
    try:
        new = config_mod.reload(ctx.cfg)
        token = new.token
    except Exception as e:  # whatever a reload trips over (logged), the daemon serves on
        if isinstance(e, (ConfigError, OSError)):
            log.error("reload refused, the configuration in force is kept: %s", e)
        else:
            log.exception("reload failed, the configuration in force is kept")
        systemd.notify("READY=1")
        return
    if (new.server.host, new.server.port, new.server.unix_socket) != (
            ctx.cfg.server.host, ctx.cfg.server.port, ctx.cfg.server.unix_socket):
        log.warning("reload: listening addresses change only on restart")
    logs.setup(new.log.level, new.log.format)
    # what was learned of each function is forgotten: the new workers import the code afresh
    if ctx.allow.probe is not None:
        ctx.allow.probe.replace()
        ctx.allow.probe.start()
    ctx.cfg, ctx.token, ctx.allow = new, token, Allow(new.jobs.allow, ctx.allow.probe)
    ctx.scheduler.reconfigure(new)
    log.info("configuration reloaded: %s, allow %s", _workers(new.pool.size), ", ".join(new.jobs.allow))
    systemd.notify("READY=1", f"STATUS=configuration reloaded: {_workers(new.pool.size)}")


async def _drain(ctx: Context) -> None:
    """Phase one of the stop: no new jobs, running ones get up to shutdown_grace."""
    grace = ctx.cfg.supervisor.shutdown_grace
    systemd.notify("STOPPING=1")
    ctx.draining = True
    sched = ctx.scheduler
    sched.accepting = False
    sched.hold_back()
    log.info("draining: %d jobs running, waiting up to %g s", len(sched.running), grace)
    end = asyncio.get_running_loop().time() + grace
    # dispatched too: a worker may have started a job whose start message is not read yet
    while not sched.idle() and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.05)
    if sched.running:
        log.warning("ending %d jobs still running after %g s (interrupted)", len(sched.running), grace)
    sched.interrupt_all()
    await ctx.store.committed()


def main() -> int:  # pragma: no cover - `poold serve` is the entry point
    return run(config_mod.load(None))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

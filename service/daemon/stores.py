"""Opening the configured store, and recovering what a previous instance left.

SQLite (`store.path`) is the embedded default; a `store.url` makes the store
PostgreSQL and this daemon one host of the cluster on that database and schema.
"""

from __future__ import annotations

import logging
import socket
from typing import NamedTuple

from service.config import Config
from service.engine import lease, ledger
from service.engine.procs import supervisor
from service.store.base import JobStore, StoreError

log = logging.getLogger("poold")

POLL = 1.0  # seconds: a cluster host looks at the queue this often when nothing wakes it


class OpenError(Exception):
    """The store cannot be used; the message says which and why (no password in it)."""


class Opened(NamedTuple):
    store: JobStore
    host: str  # this host's cluster name
    poll: float | None  # see service.queue.dispatcher.Scheduler
    retried: int  # a previous instance's running jobs, requeued
    failed: int  # and failed as interrupted


def host_name(cfg: Config) -> str:
    return cfg.cluster.name or f"{socket.gethostname()}:{cfg.server.port}"


async def open_store(cfg: Config) -> Opened:
    """The store, opened, with a previous instance's running jobs recovered."""
    host = host_name(cfg)
    if cfg.store.url:
        return await _open_postgres(cfg, host)
    from service.store.sqlite.store import Store

    try:
        store = Store(cfg.store.path)
    except Exception as e:  # noqa: BLE001 - any failure to open the store is fatal, said plainly
        raise OpenError(f"cannot open the store {cfg.store.path}: {e}") from None
    recorded = await store.recorded_processes()
    if (other := supervisor.running_daemon(recorded)) is not None:
        raise OpenError(f"the store {cfg.store.path} is in use by a running poold (pid {other})")
    retried, failed = await store.recover(ledger.read(cfg.store.path))
    await store.committed()
    ledger.clear(cfg.store.path)
    return Opened(store, host, None, retried, failed)


async def _open_postgres(cfg: Config, host: str) -> Opened:
    try:
        from service.store.postgres.store import PgStore
    except ImportError as e:
        raise OpenError(f"store.url is a PostgreSQL URL but its driver is missing ({e}):"
                        " pip install 'poold[postgres]'") from None
    store = PgStore(cfg.store.url, cfg.store.schema, cfg.store.where, host)
    store.hosts.timeout = cfg.cluster.host_timeout
    store.hosts.clock = lease.now  # the registration starts the first lease
    try:
        await store.open()  # registers this host: a live one of the same name elsewhere is waited for
        retried, failed = store.hosts.taken_over
        more = await store.recover()
    except StoreError as e:
        await store.aclose()
        raise OpenError(str(e)) from None
    return Opened(store, host, POLL, retried + more[0], failed + more[1])

"""The start ledger: which job attempts the workers began, kept where no SIGKILL can erase it.

The daemon writes a job's start to SQLite only once the worker has reported
it, a group commit later. A daemon killed in between leaves the job `queued`
in the store although it ran, and the next instance would run it again: more
than 1 + retries times. So a worker, before it calls a job, writes (seq,
attempt, time) into a small memory-mapped file beside the store, one ring per
slot. The page cache keeps the write whichever process dies, and the next
instance reads every ring at recovery: an attempt found there that the store
never heard of counts as one that was running (see Store.recover).

A ring holds RING entries: many times what a slot can have started and not yet
committed (two batches of at most 256 jobs, plus one commit's worth of ends).
Workers import this module: it stays free of the daemon's imports.
"""

from __future__ import annotations

import glob
import mmap
import os
import struct

RING = 8192
_HEAD = struct.Struct("<Q")  # entries ever written: the next one goes to head % RING
_ENTRY = struct.Struct("<qqd")  # job seq, attempts before this one, start time
_SIZE = _HEAD.size + RING * _ENTRY.size


def path(store_path: str, slot: int) -> str:
    return f"{store_path}-started.{slot}"


def _paths(store_path: str) -> list[str]:
    return glob.glob(glob.escape(store_path) + "-started.*")


class Writer:
    """A worker's end of its slot's ring. Never raises: without a ledger a job still runs."""

    def __init__(self, file: str | None) -> None:
        self._map: mmap.mmap | None = None
        if file is None:
            return
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size != _SIZE:
                    os.ftruncate(fd, _SIZE)
                # blocks reserved now: a write to an unbacked page of a full disk is a SIGBUS
                os.posix_fallocate(fd, 0, _SIZE)
                self._map = mmap.mmap(fd, _SIZE)
            finally:
                os.close(fd)
        except (OSError, ValueError):
            self._map = None

    def mark(self, seq: int, attempts: int, t: float) -> None:
        m = self._map
        if m is None:
            return
        head = _HEAD.unpack_from(m, 0)[0]
        _ENTRY.pack_into(m, _HEAD.size + (head % RING) * _ENTRY.size, seq, attempts, t)
        _HEAD.pack_into(m, 0, head + 1)


def read(store_path: str) -> dict[int, tuple[int, float]]:
    """seq → (attempts, start time) of every attempt the rings hold (the latest per job)."""
    found: dict[int, tuple[int, float]] = {}
    for file in _paths(store_path):
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError:
            continue
        body = data[_HEAD.size:_SIZE]
        for seq, attempts, t in _ENTRY.iter_unpack(body[:len(body) - len(body) % _ENTRY.size]):
            if seq > 0 and (seq not in found or found[seq][0] < attempts):
                found[seq] = (attempts, t)
    return found


def clear(store_path: str) -> None:
    """Once recovery is committed the rings are history: new workers start new ones."""
    for file in _paths(store_path):
        try:
            os.unlink(file)
        except OSError:
            pass

"""Enqueue on PostgreSQL, in one transaction: keys looked up, `after` resolved and its jobs
locked and marked, the rows inserted, their dependencies recorded.

A key is unique among active jobs in the database (`jobs_active_key`): a row that conflicts
lost to a job another host enqueued a moment ago, which is read and answered instead.
"""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg

from service.model import ACTIVE_STATES
from service.store.base import NewJob, StoreError, first_state, new_id
from service.store.jobjson import job_json
from service.store.postgres import queries as q

Out = list[tuple[str, str, bool]]


def _holder(rows: list[asyncpg.Record], j: NewJob) -> asyncpg.Record | None:
    """The job that holds j's key (rows: the jobs with keys, newest first)."""
    for r in rows:
        if r["key"] == j.key and (j.unique_while == "kept" or r["state"] in ACTIVE_STATES):
            return r
    return None


async def insert(conn: asyncpg.Connection, jobs: list[NewJob], channel: str,
                 progress: Any) -> tuple[Out, int]:
    """(id, Job JSON, created) for each of `jobs`, and how many were queued."""
    now = time.time()
    keys = sorted({j.key for j in jobs if j.key is not None})
    keyed = await conn.fetch(q.BY_KEYS, keys) if keys else []
    out: Out = []
    first: dict[str, int] = {}  # key -> index of its first job in this call (it wins)
    fresh: list[tuple[int, str, NewJob, list[str]]] = []
    for i, j in enumerate(jobs):
        if j.key is not None and j.key in first:
            out.append((*out[first[j.key]][:2], False))
            continue
        if j.key is not None:
            first[j.key] = i
            if (held := _holder(keyed, j)) is not None:
                out.append((held["id"], job_text(held, progress), False))
                continue
        jid = new_id()
        out.append((jid, "", True))
        fresh.append((i, jid, j, [out[int(a[1:])][0] if a.startswith("#") else a for a in j.after]))
    if not fresh:
        return out, 0
    made = {jid for _, jid, _, _ in fresh}
    named = sorted({d for *_, after in fresh for d in after if d not in made})
    states = {r["id"]: r["state"] for r in await conn.fetch(q.MARK_DEPENDED, named)} if named else {}
    rows, deps, depended = [], [], {d for *_, after in fresh for d in after if d in made}
    for i, jid, j, after in fresh:
        state, pending, error = first_state(i, j, after, states, now)
        states[jid] = state
        deps += [(jid, d) for d in pending]
        scheduled = j.run_at if j.run_at is not None and j.run_at > now else None
        fired = j.schedule or (None, None)
        rows.append((jid, j.fn, j.args, j.kwargs, state, j.priority, j.timeout, j.retries, j.key, now,
                     now if error else None, error, scheduled, json.dumps(after) if after else None,
                     j.after_failure, j.retry_delay, j.unique_while, *fired, len(pending), jid in depended))
    inserted = await conn.fetch(q.INSERT_JOBS, *[list(c) for c in zip(*rows, strict=True)])
    if deps:
        await conn.execute(q.INSERT_DEPS, *[list(c) for c in zip(*deps, strict=True)])
    by_id = {r["id"]: r for r in inserted}
    lost = [j.key for _, jid, j, _ in fresh if jid not in by_id and j.key is not None]
    holders = await conn.fetch(q.BY_KEYS, lost) if lost else []
    for i, jid, j, _ in fresh:
        if jid in by_id:
            out[i] = (jid, job_text(by_id[jid]), True)
        elif (held := _holder(holders, j)) is not None:  # another host's, a moment ago
            out[i] = (held["id"], job_text(held, progress), False)
        else:  # its key's job ended between the two statements: rare; say it plainly
            raise StoreError(f"the job with key {j.key!r} changed while it was submitted; submit again")
    for i, j in enumerate(jobs):
        if j.key is not None and first[j.key] != i:
            out[i] = (*out[first[j.key]][:2], False)
    queued = sum(1 for r in inserted if r["state"] == "queued")
    if queued:
        await conn.execute(q.NOTIFY, channel, "q")
    return out, queued


def job_text(row: asyncpg.Record, progress: Any = None) -> str:
    return job_json(tuple(row), progress(row["id"]) if progress and row["state"] == "running" else None)

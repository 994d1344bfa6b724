"""A claim under `[jobs] concurrency` on PostgreSQL: counted over every host.

Claims that involve capped functions take one advisory lock for the transaction, so two hosts
never both see room for the last slot of a cap; claims with no caps configured never take it.
Functions at their limit are left out of the candidates, so other work is not held up behind
them.
"""

from __future__ import annotations

import asyncpg

from service.store.base import CLAIMED, Cap, Claimed, admit
from service.store.postgres import queries as q

LOCK = "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ' poold caps'))"
RUNNING_BY_FN = "SELECT fn, count(*) FROM jobs WHERE state = 'running' GROUP BY fn"
TAKE = f"""
UPDATE jobs SET state = 'running', attempts = attempts + 1, claim = $2, started_at = NULL
WHERE seq = ANY($1::bigint[]) AND state = 'queued'
  AND EXISTS (SELECT 1 FROM hosts WHERE instance = $2 AND state <> 'dead')
RETURNING {q.CLAIMED}
"""


def _candidates(full: list[Cap]) -> tuple[str, list[object]]:
    parts, params = [], []
    for c in full:
        if c.pattern.endswith(":*"):
            params += [len(c.pattern) - 1, c.pattern[:-1]]
            parts.append(f"substr(fn, 1, ${len(params)}::int) = ${len(params) + 1}::text")
        else:
            params.append(c.pattern)
            parts.append(f"fn = ${len(params) + 1}::text")
    where = f" AND NOT ({' OR '.join(parts)})" if parts else ""
    return (f"SELECT {CLAIMED} FROM jobs WHERE state = 'queued'{where}"
            " ORDER BY priority DESC, seq LIMIT $1 FOR UPDATE SKIP LOCKED"), params


async def claim(conn: asyncpg.Connection, limit: int, caps: list[Cap], instance: str) -> list[asyncpg.Record]:

    await conn.execute(LOCK)
    running = {r[0]: int(r[1]) for r in await conn.fetch(RUNNING_BY_FN)}
    caps = [c._replace(held=sum(n for fn, n in running.items() if c.matches(fn))) for c in caps]
    chosen: list[int] = []
    for _ in range(4):  # a pass that fills a cap looks again without that cap's functions
        sql, params = _candidates([c for c in caps if c.held >= c.limit])
        rows = await conn.fetch(sql, limit - len(chosen), *params)
        fresh = [Claimed(*r) for r in rows if r[0] not in chosen]
        taken, caps, refused = admit(fresh, caps, limit - len(chosen))
        chosen += [c.seq for c in taken]
        if not refused or len(chosen) >= limit:
            break
    return await conn.fetch(TAKE, chosen, instance) if chosen else []

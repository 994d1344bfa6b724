"""Connecting, and creating or migrating the schema: several hosts starting at once take
turns under an advisory lock, and each step is recorded in schema_version."""

from __future__ import annotations

import logging

import asyncpg

from service.store.postgres import queries as q

log = logging.getLogger("poold.store")

CONNECT_TIMEOUT = 5.0  # seconds: a database that does not answer is down, said soon
COMMAND_TIMEOUT = 15.0


async def connect_pool(url: str, schema: str, size: int = 4) -> asyncpg.Pool:
    """A small pool whose connections see the schema's tables first."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=size, timeout=CONNECT_TIMEOUT,
                                     command_timeout=COMMAND_TIMEOUT,
                                     server_settings={"search_path": schema,
                                                      "application_name": "poold",
                                                      "plan_cache_mode": "force_custom_plan"})
    assert pool is not None
    return pool


async def migrate(pool: asyncpg.Pool, schema: str) -> int:
    """Brings the schema to queries.VERSION; the version it found."""
    async with pool.acquire() as conn, conn.transaction():
        # the schema may not exist yet: the lock is taken on a name, not a table
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"poold-migrate:{schema}")
        await conn.execute(q.CREATE_SCHEMA.format(schema=schema))
        await conn.execute(q.CREATE_VERSION)
        found = int(await conn.fetchval(q.GET_VERSION) or 0)
        for version in range(found + 1, q.VERSION + 1):
            await conn.execute(q.MIGRATIONS[version])
            await conn.execute(q.SET_VERSION, version)
        if found < q.VERSION:
            log.info("store schema %s: version %d -> %d", schema, found, q.VERSION)
    return found

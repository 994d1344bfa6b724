"""The SQLite schema, and the steps that bring an older database file up to it.

`pending` counts a waiting job's dependencies not yet ended; `dependents` marks a job that
another waits for, so that the trigger `jobs_ended` files its end in `ended`, the work list
that the store's resolve() goes through in the same transaction. A key is unique among the
jobs that are active (`jobs_active_key`); `unique_while = 'kept'` also finds ended ones.
"""

from __future__ import annotations

import sqlite3

from service.model import ACTIVE_STATES, FINAL_STATES

VERSION = 2  # PRAGMA user_version

_FINAL = ", ".join(f"'{s}'" for s in FINAL_STATES)
_ACTIVE = ", ".join(f"'{s}'" for s in ACTIVE_STATES)

TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    fn TEXT NOT NULL,
    args TEXT NOT NULL,
    kwargs TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    timeout REAL NOT NULL,
    retries INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    key TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker TEXT,
    result TEXT,
    error TEXT,
    progress TEXT
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER NOT NULL,
    create_time REAL NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (pid, create_time)
);
"""

# version 2: schedules, dependencies, back-off, unique_while (columns added to version 1's table)
COLUMNS_2 = (
    ("scheduled_at", "REAL"),
    ("after", "TEXT"),
    ("after_failure", "TEXT NOT NULL DEFAULT 'fail'"),
    ("retry_delay", "REAL NOT NULL DEFAULT 0"),
    ("unique_while", "TEXT NOT NULL DEFAULT 'kept'"),
    ("schedule_name", "TEXT"),
    ("schedule_fire_at", "REAL"),
    ("pending", "INTEGER NOT NULL DEFAULT 0"),
    ("dependents", "INTEGER NOT NULL DEFAULT 0"),
)

REST_2 = f"""
DROP INDEX IF EXISTS jobs_key;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_key ON jobs (key)
    WHERE key IS NOT NULL AND state IN ({_ACTIVE});
CREATE INDEX IF NOT EXISTS jobs_keys ON jobs (key, seq) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (priority DESC, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (scheduled_at) WHERE state = 'scheduled';
CREATE INDEX IF NOT EXISTS jobs_schedule ON jobs (schedule_name, seq) WHERE schedule_name IS NOT NULL;
CREATE TABLE IF NOT EXISTS deps (job INTEGER NOT NULL, dep TEXT NOT NULL, PRIMARY KEY (job, dep));
CREATE INDEX IF NOT EXISTS deps_dep ON deps (dep);
CREATE TABLE IF NOT EXISTS ended (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, state TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS jobs_ended AFTER UPDATE OF state ON jobs
    WHEN NEW.dependents = 1 AND NEW.state IN ({_FINAL}) AND OLD.state NOT IN ({_FINAL})
BEGIN
    INSERT INTO ended (id, state) VALUES (NEW.id, NEW.state);
END;
CREATE TRIGGER IF NOT EXISTS jobs_gone AFTER DELETE ON jobs WHEN OLD.after IS NOT NULL
BEGIN
    DELETE FROM deps WHERE job = OLD.seq;
END;
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    last_tick REAL NOT NULL,
    last_fire_at REAL,
    last_job TEXT
);
CREATE TABLE IF NOT EXISTS fires (
    name TEXT NOT NULL,
    fire_at REAL NOT NULL,
    job TEXT,
    PRIMARY KEY (name, fire_at)
);
"""


def _statements(script: str) -> list[str]:
    """The statements of a script (a trigger's body holds semicolons too)."""
    out, part = [], ""
    for line in script.splitlines(keepends=True):
        part += line
        if sqlite3.complete_statement(part):
            out.append(part.strip())
            part = ""
    return out


def migrate(conn: sqlite3.Connection) -> None:
    """Creates the schema, or brings an older file up to VERSION, in one transaction
    (executescript would commit on its own)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql in _statements(TABLES):
            conn.execute(sql)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version < 2:
            have = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
            for name, decl in COLUMNS_2:
                if name not in have:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        for sql in _statements(REST_2):
            conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise

"""Every SQL statement of the PostgreSQL store, by name (as procrastinate's queries.sql).

Tables live in the configured schema (the connections' search_path). Job rows have
SQLite's column order, so service.store.sqlite.jobjson splices them alike; times are
epoch seconds (float8) for the same reason, except the hosts' clock columns, which
are the database's `now()`: a host's death is judged by one clock, not by each
host's. `claim` is the instance that holds a running job: with `attempts` it is the
fencing token every end of an attempt is written under.
"""

from __future__ import annotations

VERSION = 1

# one statement per migration step; applied under an advisory lock, so hosts that start at
# once migrate one after the other
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE jobs (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    fn text NOT NULL,
    args text NOT NULL,
    kwargs text NOT NULL,
    state text NOT NULL,
    priority integer NOT NULL,
    timeout float8 NOT NULL,
    retries integer NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    key text,
    created_at float8 NOT NULL,
    started_at float8,
    finished_at float8,
    worker text,
    result text,
    error text,
    progress text,
    claim text
);
CREATE INDEX jobs_queue ON jobs (priority DESC, seq) WHERE state = 'queued';
CREATE UNIQUE INDEX jobs_key ON jobs (key) WHERE key IS NOT NULL;
CREATE INDEX jobs_state ON jobs (state, seq);
CREATE INDEX jobs_expiry ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_claim ON jobs (claim) WHERE state = 'running';
CREATE TABLE hosts (
    name text PRIMARY KEY,
    instance text NOT NULL,
    machine text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    state text NOT NULL DEFAULT 'alive',
    workers text NOT NULL DEFAULT '[]',
    processes text NOT NULL DEFAULT '[]'
);
""",
}

CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"
CREATE_VERSION = "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
GET_VERSION = "SELECT max(version) FROM schema_version"
SET_VERSION = "INSERT INTO schema_version (version) VALUES ($1)"

COLUMNS = ("seq, id, fn, args, kwargs, state, priority, timeout, retries, attempts, key, created_at, "
           "started_at, finished_at, worker, result, error, progress")
CLAIMED = "seq, id, fn, args, kwargs, timeout, retries, attempts - 1, priority, key, created_at"

# -- enqueue: a key already kept makes its row conflict; the kept job is read after
INSERT_JOBS = f"""
INSERT INTO jobs (id, fn, args, kwargs, state, priority, timeout, retries, key, created_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
                     $7::float8[], $8::int[], $9::text[], $10::float8[])
ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING
RETURNING {COLUMNS}
"""
BY_KEYS = f"SELECT {COLUMNS} FROM jobs WHERE key = ANY($1::text[])"
NOTIFY = "SELECT pg_notify($1, $2)"

# -- the queue
# only while this instance's host row is alive: a claim that reaches the database after the
# host was judged dead takes nothing
CLAIM = f"""
UPDATE jobs SET state = 'running', attempts = attempts + 1, claim = $2, started_at = NULL
WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' ORDER BY priority DESC, seq
              LIMIT $1 FOR UPDATE SKIP LOCKED)
  AND EXISTS (SELECT 1 FROM hosts WHERE instance = $2 AND state <> 'dead')
RETURNING {CLAIMED}
"""
UNSTARTED = f"SELECT {CLAIMED} FROM jobs WHERE state = 'running' AND claim = $1 AND started_at IS NULL"
RELEASE = """
UPDATE jobs SET state = 'queued', attempts = attempts - 1, claim = NULL
WHERE seq = $1 AND attempts = $2 AND state = 'running' AND claim = $3
"""
START = """
UPDATE jobs SET started_at = $2, worker = $3, progress = NULL, error = NULL
WHERE seq = $1 AND state = 'running' AND claim = $4
"""
FINISH = """
UPDATE jobs SET state = $1, result = $2, error = $3, progress = $4, finished_at = $5,
                started_at = COALESCE(started_at, $6), worker = $7, claim = NULL
WHERE seq = $8 AND state = 'running' AND attempts = $9 AND claim = $10
"""
# the same two for many rows in one statement (the gathered writes): the rows' arguments as
# arrays, this instance last
START_MANY = """
UPDATE jobs j SET started_at = u.started_at, worker = u.worker, progress = NULL, error = NULL
FROM unnest($1::bigint[], $2::float8[], $3::text[]) AS u(seq, started_at, worker)
WHERE j.seq = u.seq AND j.state = 'running' AND j.claim = $4
"""
FINISH_MANY = """
UPDATE jobs j SET state = u.state, result = u.result, error = u.error, progress = u.progress,
                  finished_at = u.finished_at, started_at = COALESCE(j.started_at, u.started_at),
                  worker = u.worker, claim = NULL
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[], $7::text[],
            $8::bigint[], $9::int[])
     AS u(state, result, error, progress, finished_at, started_at, worker, seq, attempts)
WHERE j.seq = u.seq AND j.state = 'running' AND j.attempts = u.attempts AND j.claim = $10
"""
MANY = {START: START_MANY, FINISH: FINISH_MANY}

RETRY = """
UPDATE jobs SET state = 'queued', error = $2, claim = NULL
WHERE seq = $1 AND state = 'running' AND claim = $3 AND ($4::int IS NULL OR attempts = $4)
"""
CANCEL_LOCK = "SELECT seq, state, started_at IS NOT NULL, claim FROM jobs WHERE id = $1 FOR UPDATE"
CANCEL = """
UPDATE jobs SET state = 'cancelled', finished_at = $2, progress = COALESCE($3, progress), claim = NULL
WHERE seq = $1
"""
EXPIRE = "DELETE FROM jobs WHERE finished_at < $1"
COUNT_QUEUED = "SELECT count(*) FROM jobs WHERE state = 'queued'"

# -- reads
GET = f"SELECT {COLUMNS} FROM jobs WHERE id = $1"
LIST = f"SELECT {COLUMNS} FROM jobs ORDER BY seq DESC LIMIT $1"
LIST_STATE = f"SELECT {COLUMNS} FROM jobs WHERE state = $1 ORDER BY seq DESC LIMIT $2"
STATES = "SELECT id, state FROM jobs WHERE id = ANY($1::text[])"
FINISHED = f"SELECT {COLUMNS} FROM jobs WHERE id = ANY($1::text[]) AND state = ANY($2::text[])"
COUNTS = "SELECT state, count(*) FROM jobs GROUP BY state"
NOT_RUNNING = "SELECT id FROM jobs WHERE id = ANY($1::text[])" \
              " AND (state <> 'running' OR claim IS DISTINCT FROM $2)"

# -- hosts: registration, heartbeats, rescue
HOST_LOCK = "SELECT instance, machine, pid, last_seen > now() - make_interval(secs => $2), state" \
            " FROM hosts WHERE name = $1 FOR UPDATE"
HOST_UPSERT = """
INSERT INTO hosts (name, instance, machine, pid) VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE SET instance = $2, machine = $3, pid = $4, started_at = now(),
                                 last_seen = now(), state = 'alive', workers = '[]'
"""
# the state before the heartbeat (read under the row lock: a rescue that declared this host dead
# a moment ago is seen), then the heartbeat
HEARTBEAT_LOCK = "SELECT state FROM hosts WHERE name = $1 AND instance = $2 FOR UPDATE"
HEARTBEAT = """
UPDATE hosts SET last_seen = now(), state = CASE WHEN $3 THEN 'draining' ELSE 'alive' END, workers = $4
WHERE name = $1 AND instance = $2
"""
HOST_GONE = "UPDATE hosts SET state = 'dead', workers = '[]' WHERE name = $1 AND instance = $2"
# at a clean stop, once the workers are gone: what was claimed and never started goes back as it
# was; the rest is rescued (RESCUE_INSTANCE)
RELEASE_UNSTARTED = """
UPDATE jobs SET state = 'queued', attempts = attempts - 1, claim = NULL
WHERE state = 'running' AND claim = $1 AND started_at IS NULL
RETURNING id
"""
# the dead: hosts silent for host_timeout by the database's clock; their jobs are rescued in
# the same statement (retried with retries left, else failed as interrupted)
RESCUE_DEAD = """
WITH dead AS (
    UPDATE hosts SET state = 'dead'
    WHERE state <> 'dead' AND last_seen < now() - make_interval(secs => $1)
    RETURNING instance
)
UPDATE jobs SET state = CASE WHEN attempts <= retries THEN 'queued' ELSE 'failed' END,
                finished_at = CASE WHEN attempts <= retries THEN NULL ELSE $3::float8 END,
                error = $2::text, claim = NULL
WHERE state = 'running' AND claim IN (SELECT instance FROM dead)
RETURNING id, state
"""
# one instance's running jobs (a host's previous instance, at its start)
RESCUE_INSTANCE = """
UPDATE jobs SET state = CASE WHEN attempts <= retries THEN 'queued' ELSE 'failed' END,
                finished_at = CASE WHEN attempts <= retries THEN NULL ELSE $3::float8 END,
                error = $2::text, claim = NULL
WHERE state = 'running' AND claim = $1
RETURNING id, state
"""
# claims no host holds (a host row replaced while it was down): rescued like a dead host's
RESCUE_ORPHANS = """
UPDATE jobs SET state = CASE WHEN attempts <= retries THEN 'queued' ELSE 'failed' END,
                finished_at = CASE WHEN attempts <= retries THEN NULL ELSE $2::float8 END,
                error = $1::text, claim = NULL
WHERE state = 'running' AND claim IS NOT NULL
  AND claim NOT IN (SELECT instance FROM hosts WHERE state <> 'dead')
RETURNING id, state
"""
HOSTS = """
SELECT name, extract(epoch FROM started_at), extract(epoch FROM last_seen), state, workers,
       (SELECT count(*) FROM jobs j WHERE j.state = 'running' AND j.claim = h.instance),
       last_seen < now() - make_interval(secs => $1)
FROM hosts h ORDER BY name
"""
SET_PROCESSES = "UPDATE hosts SET processes = $3 WHERE name = $1 AND instance = $2"
GET_PROCESSES = "SELECT processes FROM hosts WHERE name = $1"

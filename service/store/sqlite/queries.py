"""The SQLite store's statements for what waits: due times, dependencies, periodic ticks.

(The job table's own statements stay beside their operations in service.store.sqlite.store.)
`ended` is the work list the trigger `jobs_ended` fills (service.store.sqlite.schema): the
rows up to `:upto` are gone through in one pass, in the transaction that ended them.
"""

from __future__ import annotations

from service.model import ACTIVE_STATES, BACKOFF_CAP, BACKOFF_JITTER
from service.store.jobjson import COLUMNS

ACTIVE = ", ".join(f"'{s}'" for s in ACTIVE_STATES)

INSERT = ("INSERT INTO jobs (id, fn, args, kwargs, state, priority, timeout, retries, key, created_at,"
          " finished_at, error, scheduled_at, after, after_failure, retry_delay, unique_while, schedule_name,"
          " schedule_fire_at, pending, dependents)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_DEP = "INSERT OR IGNORE INTO deps (job, dep) VALUES ((SELECT seq FROM jobs WHERE id = ?), ?)"
MARK_DEPENDED = "UPDATE jobs SET dependents = 1 WHERE id = ?"
BY_KEY = f"SELECT {COLUMNS} FROM jobs INDEXED BY jobs_keys WHERE key = ? ORDER BY seq DESC LIMIT 1"
BY_KEY_ACTIVE = f"SELECT {COLUMNS} FROM jobs WHERE key = ? AND state IN ({ACTIVE})"

# a retry's wait after attempt k (service.model.backoff), for the retries written in SQL
BACKOFF = (f"min(retry_delay * (1 << min(attempts - 1, 62)), {BACKOFF_CAP})"
           f" * (1 + {BACKOFF_JITTER} * (abs(random()) % 10001) / 10000.0)")

RECOVER_LATER = ("UPDATE jobs SET state = 'scheduled', error = ?, scheduled_at = ? + " + BACKOFF +
                 " WHERE state = 'running' AND attempts <= retries AND retry_delay > 0")
PROMOTE = ("UPDATE jobs SET state = 'queued' WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_due"
           " WHERE state = 'scheduled' AND scheduled_at <= ? ORDER BY scheduled_at LIMIT ?)")
NEXT_DUE = "SELECT min(scheduled_at) FROM jobs WHERE state = 'scheduled'"

# -- dependencies: the ended jobs up to :upto, and the waiting jobs that named them
ENDED_UPTO = "SELECT max(n) FROM (SELECT n FROM ended ORDER BY n LIMIT 1000)"
_OF_ENDED = "SELECT d.job FROM deps d JOIN ended e ON e.id = d.dep WHERE e.n <= :upto"
FAIL_DEPENDENTS = f"""
UPDATE jobs SET state = 'failed', finished_at = :now,
    error = (SELECT json_object('type', 'dependency_failed',
                                'message', 'dependency ' || e.id || ' ended ' || e.state,
                                'exception', NULL, 'traceback', NULL)
             FROM deps d JOIN ended e ON e.id = d.dep
             WHERE d.job = jobs.seq AND e.n <= :upto AND e.state <> 'succeeded' LIMIT 1)
WHERE state = 'waiting' AND after_failure = 'fail'
  AND seq IN ({_OF_ENDED} AND e.state <> 'succeeded')
RETURNING id
"""
COUNT_DOWN = f"""
UPDATE jobs SET pending = pending - (SELECT count(*) FROM deps d JOIN ended e ON e.id = d.dep
                                     WHERE d.job = jobs.seq AND e.n <= :upto)
WHERE state = 'waiting' AND seq IN ({_OF_ENDED})
"""
RELEASE_WAITING = f"""
UPDATE jobs SET state = CASE WHEN scheduled_at > :now THEN 'scheduled' ELSE 'queued' END
WHERE state = 'waiting' AND pending <= 0 AND seq IN ({_OF_ENDED})
RETURNING state
"""
DROP_ENDED = "DELETE FROM ended WHERE n <= :upto"

# -- periodic schedules
SCHEDULES = "SELECT name, definition, paused, last_tick, last_fire_at, last_job FROM schedules ORDER BY name"
SCHEDULE_DEF = "SELECT definition FROM schedules WHERE name = ?"
SCHEDULE_ADD = "INSERT INTO schedules (name, definition, paused, last_tick) VALUES (?, ?, 0, ?)"
SCHEDULE_CHANGE = ("UPDATE schedules SET definition = ?, paused = 0, last_tick = max(last_tick, ?)"
                   " WHERE name = ?")
SCHEDULE_DROP = "DELETE FROM schedules WHERE name = ?"
SCHEDULE_NAMES = "SELECT name FROM schedules"
FIRE = "INSERT OR IGNORE INTO fires (name, fire_at) VALUES (?, ?)"
LAST_JOB_ACTIVE = (f"SELECT 1 FROM schedules s JOIN jobs j ON j.id = s.last_job"
                   f" WHERE s.name = ? AND j.state IN ({ACTIVE})")
FIRED = "UPDATE fires SET job = ? WHERE name = ? AND fire_at = ?"
DECIDED = "UPDATE schedules SET last_tick = max(last_tick, ?) WHERE name = ?"
FIRED_JOB = ("UPDATE schedules SET last_tick = max(last_tick, ?), last_fire_at = ?, last_job = ?"
             " WHERE name = ?")
PAUSE = ("UPDATE schedules SET paused = ?, last_tick = CASE WHEN ? THEN last_tick ELSE max(last_tick, ?) END"
         " WHERE name = ?")

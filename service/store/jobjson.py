"""A Job as JSON text, spliced from the store's columns (results, errors and arguments are
kept as JSON text): the hot path never decodes and encodes a job again. Both backends
select COLUMNS in this order."""

from __future__ import annotations

import json
from typing import Any

from service.model import iso

COLUMNS = ("seq, id, fn, args, kwargs, state, priority, timeout, retries, attempts, key, created_at, "
           "started_at, finished_at, worker, result, error, progress, scheduled_at, after, after_failure, "
           "retry_delay, unique_while, schedule_name, schedule_fire_at")


def _t(t: float | None) -> str:
    return "null" if t is None else f'"{iso(t)}"'


def _raw(text: str | None) -> str:
    return "null" if text is None else text


def _str(text: str | None) -> str:
    return "null" if text is None else json.dumps(text)


def job_json(row: tuple[Any, ...], progress: str | None = None) -> str:
    """A Job as JSON text, spliced from the stored JSON columns: nothing is decoded and encoded again.

    `fn` and `id` need no escaping (`fn` passed the module:name check, ids are hex).
    """
    (_, jid, fn, args, kwargs, state, priority, timeout, retries, attempts, key, created, started,
     finished, worker, result, error, prog, scheduled, after, after_failure, retry_delay, unique_while,
     schedule, fire_at) = row
    fired = "null" if schedule is None else f'{{"name":{json.dumps(schedule)},"fire_at":{_t(fire_at)}}}'
    return (f'{{"id":"{jid}","fn":"{fn}","args":{args},"kwargs":{kwargs},"state":"{state}",'
            f'"priority":{priority},"timeout":{timeout!r},"retries":{retries},"attempts":{attempts},'
            f'"key":{_str(key)},"created_at":{_t(created)},'
            f'"started_at":{_t(started)},"finished_at":{_t(finished)},"worker":{_raw(worker)},'
            f'"result":{_raw(result)},"error":{_raw(error)},"progress":{_raw(progress or prog)},'
            f'"scheduled_at":{_t(scheduled)},"after":{after or "[]"},"after_failure":"{after_failure}",'
            f'"retry_delay":{float(retry_delay)!r},"unique_while":"{unique_while}","schedule":{fired}}}')

"""A Job as JSON text, spliced from the store's columns (results, errors and arguments are
kept as JSON text): the hot path never decodes and encodes a job again."""

from __future__ import annotations

import json
from typing import Any

from service.model import iso


def _t(t: float | None) -> str:
    return "null" if t is None else f'"{iso(t)}"'


def _raw(text: str | None) -> str:
    return "null" if text is None else text


def job_json(row: tuple[Any, ...], progress: str | None = None) -> str:
    """A Job as JSON text, spliced from the stored JSON columns: nothing is decoded and encoded again.

    `fn` and `id` need no escaping (`fn` passed the module:name check, ids are hex).
    """
    (_, jid, fn, args, kwargs, state, priority, timeout, retries, attempts, key, created, started,
     finished, worker, result, error, prog) = row
    return (f'{{"id":"{jid}","fn":"{fn}","args":{args},"kwargs":{kwargs},"state":"{state}",'
            f'"priority":{priority},"timeout":{timeout!r},"retries":{retries},"attempts":{attempts},'
            f'"key":{"null" if key is None else json.dumps(key)},"created_at":{_t(created)},'
            f'"started_at":{_t(started)},"finished_at":{_t(finished)},"worker":{_raw(worker)},'
            f'"result":{_raw(result)},"error":{_raw(error)},"progress":{_raw(progress or prog)}}}')

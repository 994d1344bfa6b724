"""Every client operation, written once without I/O.

An operation is a generator: it yields the `Request`s it needs and is sent
back each `Response`; its return value is the method's result. `Client` drives
these with blocking sockets and `AsyncClient` with aiohttp, so both speak the
API identically (paths, bodies, long-poll loop, error mapping).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlencode

from service.client.common import (
    FINISHED,
    MAX_WAIT,
    Deadline,
    Fn,
    Job,
    batch_item,
    encode,
    error_from,
    job_path,
    job_spec,
    outcome,
    wait_param,
)
from service.client.errors import PooldError

T = TypeVar("T")

# Job ids per POST /v1/jobs/wait: the most the daemon takes in one (CONTRACT.md).
WAIT_IDS = 1000


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # relative to the API root, query included
    body: bytes | None = None
    wait: float = 0.0  # how long the daemon may hold the answer back (long-poll)


@dataclass(frozen=True)
class Response:
    status: int
    data: Any  # the decoded JSON, None when the body was not JSON
    raw: bytes = b""
    retry_after: str | None = None


Op: TypeAlias = Generator[Request, Response, T]


def drive_result(op: Op[T], send: Callable[[Request], Response]) -> T:
    """Runs an operation to its end with a blocking `send(Request) -> Response`."""
    try:
        request = next(op)
        while True:
            request = op.send(send(request))
    except StopIteration as stop:
        return stop.value


def call(request: Request, *ok: int) -> Op[Any]:
    """One request; its JSON on an expected status, else the PooldError the answer names."""
    response = yield request
    if response.status not in ok:
        raise error_from(response.status, response.data, response.raw, response.retry_after)
    if response.data is None:
        raise PooldError(f"unexpected answer to {request.method} {request.path}: "
                         f"{response.raw[:200]!r}", status=response.status)
    return response.data


def _job(data: Any, request: str) -> Job:
    if not isinstance(data, dict) or "id" not in data:
        raise PooldError(f"unexpected answer to {request}: {data!r:.200}")
    return data


def submit(fn: Fn, args: Sequence[Any], kwargs: Mapping[str, Any] | None, *,
           timeout: float | None, priority: int, retries: int, key: str | None) -> Op[Job]:
    body = encode(job_spec(fn, args, kwargs, timeout=timeout, priority=priority,
                           retries=retries, key=key))
    data = yield from call(Request("POST", "/v1/jobs", body), 200, 201, 202)
    return _job(data, "POST /v1/jobs")


def submit_encoded(specs: Sequence[bytes]) -> Op[list[Job]]:
    """One batch request of JSON-encoded specs: accepted together or not at all."""
    if not specs:
        return []
    body = b'{"jobs":[' + b",".join(specs) + b"]}"
    data = yield from call(Request("POST", "/v1/jobs/batch", body), 200, 201, 202)
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list) or len(jobs) != len(specs):
        raise PooldError(f"unexpected answer to POST /v1/jobs/batch: {data!r:.200}")
    return [_job(j, "POST /v1/jobs/batch") for j in jobs]


def submit_many(items: Iterable[Sequence[Any]], *, timeout: float | None, priority: int,
                retries: int) -> Op[list[Job]]:
    specs = [job_spec(*batch_item(item), timeout=timeout, priority=priority, retries=retries)
             for item in items]
    return (yield from submit_encoded([encode(spec) for spec in specs]))


def get(job_id: str, wait: float | None = None) -> Op[Job]:
    path = job_path(job_id)
    if wait is not None:
        path += "?wait=" + wait_param(wait)
    data = yield from call(Request("GET", path, wait=min(max(wait or 0.0, 0.0), 60.0)), 200)
    return _job(data, f"GET {path}")


def wait(job_id: str, timeout: float | None, raise_on_failure: bool) -> Op[Job]:
    """Long-polls (at most 60 s per request) until the job is finished or `timeout` passes."""
    deadline = Deadline(timeout)
    while True:
        job = yield from get(job_id, wait=deadline.next_poll())
        if job.get("state") in FINISHED:
            if raise_on_failure:
                outcome(job)
            return job
        if deadline.expired():
            raise TimeoutError(f"job {job_id} still {job.get('state')} after waiting {timeout} s")


def run(fn: Fn, args: Sequence[Any], kwargs: Mapping[str, Any] | None, *,
        timeout: float | None, priority: int, retries: int, key: str | None,
        wait_timeout: float | None) -> Op[Any]:
    job = yield from submit(fn, args, kwargs, timeout=timeout, priority=priority,
                            retries=retries, key=key)
    if job.get("state") not in FINISHED:  # a reused key may name a finished job
        job = yield from wait(job["id"], wait_timeout, False)
    return outcome(job)


def wait_jobs(job_ids: Sequence[str], timeout: float, need_all: bool = False, *,
              plain_ids: bool = False) -> Op[list[Job]]:
    """One POST /v1/jobs/wait: the finished Jobs among `job_ids` (in no particular order), once
    one of them (or, with `need_all`, each of them) has finished or after `timeout` seconds.

    The daemon leaves unknown ids out; one request watches thousands of jobs. `plain_ids`
    vouches that every id is alphanumeric (as the daemon makes them): they are then joined
    into the body as they are, a dozen times faster than JSON-encoding them.
    """
    seconds = round(min(MAX_WAIT, max(0.0, timeout)), 3)
    if plain_ids and job_ids:
        ids = '","'.join(job_ids)
        body = ('{"ids":["' + ids + '"],"timeout":' + repr(seconds)
                + (',"all":true}' if need_all else ',"all":false}')).encode()
    else:
        body = encode({"ids": list(job_ids), "timeout": seconds, "all": need_all})
    data = yield from call(Request("POST", "/v1/jobs/wait", body, wait=seconds), 200)
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list):
        raise PooldError(f"unexpected answer to POST /v1/jobs/wait: {data!r:.200}")
    return [_job(j, "POST /v1/jobs/wait") for j in jobs]


def wait_many(job_ids: Iterable[str], timeout: float | None, raise_on_failure: bool) -> Op[list[Job]]:
    """Long-polls until every job has finished; their Jobs in the order of `job_ids`.

    TimeoutError once `timeout` seconds have passed; PooldError 404 for an unknown id.
    """
    order = [str(i) for i in job_ids]
    deadline = Deadline(timeout)
    found: dict[str, Job] = {}
    left = list(dict.fromkeys(order))
    while left:
        chunk = left[:WAIT_IDS]
        started = time.monotonic()
        poll = deadline.next_poll()
        for job in (yield from wait_jobs(chunk, poll, need_all=True)):
            found[job["id"]] = job
        left = [i for i in left if i not in found]
        missing = [i for i in chunk if i not in found]
        early = time.monotonic() - started < poll / 2  # answered before the poll's end: an id is unknown
        if missing and (early or deadline.expired()):
            for job_id in missing if early else missing[:1]:
                job = yield from get(job_id)  # PooldError 404 for an unknown id
                if job.get("state") in FINISHED:
                    found[job_id] = job
            left = [i for i in left if i not in found]
        if left and deadline.expired():
            raise TimeoutError(f"{len(left)} of {len(found) + len(left)} jobs still unfinished after "
                               f"waiting {timeout} s (first: {left[0]})")
    jobs = [found[i] for i in order]
    if raise_on_failure:
        for job in jobs:
            outcome(job)
    return jobs


def cancel(job_id: str, queued_only: bool = False) -> Op[Job]:
    path = job_path(job_id) + ("?queued_only=true" if queued_only else "")
    data = yield from call(Request("DELETE", path), 200)
    return _job(data, f"DELETE {path}")


def jobs(state: str | None, limit: int) -> Op[list[Job]]:
    query: dict[str, Any] = {"limit": limit}
    if state is not None:
        query["state"] = state
    data = yield from call(Request("GET", "/v1/jobs?" + urlencode(query)), 200)
    return list(data.get("jobs", [])) if isinstance(data, dict) else []


def workers() -> Op[list[dict[str, Any]]]:
    data = yield from call(Request("GET", "/v1/workers"), 200)
    return list(data.get("workers", [])) if isinstance(data, dict) else []


def health() -> Op[bool]:
    """True when the daemon answers 200, False on 503 (unhealthy or draining)."""
    response = yield Request("GET", "/health")
    if response.status == 200:
        return True
    if response.status == 503:
        return False
    raise error_from(response.status, response.data, response.raw, response.retry_after)


def health_report() -> Op[dict[str, Any]]:
    """The /health body, as the daemon sent it, whether 200 (ok) or 503 (unhealthy)."""
    response = yield Request("GET", "/health")
    if response.status in (200, 503) and isinstance(response.data, dict):
        return response.data
    raise error_from(response.status, response.data, response.raw, response.retry_after)

"""The HTTP API (aiohttp): routes, request checks, the error middleware, long-polls.

Every answer is JSON, errors included ({"error": {"code", "message"}}). The
202 for a submission is sent only after the commit that holds the job.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiohttp import web

from service.config import Config
from service.http import openapi, spec
from service.http.spec import ApiError
from service.model import FINAL_STATES, STATES, iso
from service.queue.allow import Allow
from service.queue.dispatcher import Scheduler
from service.queue.metrics import CONTENT_TYPE, Metrics
from service.store.base import Cluster, JobStore, StoreError

log = logging.getLogger("poold.api")


@dataclass
class Context:
    """What the handlers need; `cfg` and `allow` are swapped on reload."""

    cfg: Config
    store: JobStore
    scheduler: Scheduler
    metrics: Metrics
    allow: Allow
    token: str = ""
    version: str = "0"
    draining: bool = False
    extra_health: list[Callable[[], str | None]] = field(default_factory=list)
    cluster: Cluster | None = None  # the hosts sharing the store (PostgreSQL)
    started_at: float = field(default_factory=time.time)


CTX = web.AppKey("ctx", Context)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=_dumps(data), status=status, headers=headers, content_type="application/json")


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status, headers)


_HTTP_CODES = {400: "invalid_json", 401: "unauthorized", 403: "function_not_allowed", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 422: "invalid_request"}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[CTX]
    try:
        if ctx.token and not (request.method == "GET" and request.path == "/health"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                       f"Bearer {ctx.token}".encode("utf-8", "surrogateescape")):
                raise ApiError(401, "unauthorized",
                               "a valid 'Authorization: Bearer <token>' header is required",
                               {"WWW-Authenticate": "Bearer"})
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message, e.headers)
    except StoreError as e:
        return error_response(503, "store_unavailable", f"the job store cannot be written: {e}",
                              {"Retry-After": "1"})
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        return error_response(e.status, code, e.reason or code)


async def _body(request: web.Request) -> Any:
    limit = request.app[CTX].cfg.server.max_body_bytes
    too_large = ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes"
                         " (server.max_body_bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    data = bytearray()
    try:
        while chunk := await request.content.readany():
            data += chunk
            if len(data) > limit:
                raise too_large
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - a body that cannot be decoded (bad gzip, …) is the client's
        raise ApiError(400, "invalid_json", f"the body cannot be read: {type(e).__name__}") from None
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")



def _refuse_when_draining(ctx: Context) -> None:
    if ctx.draining:
        raise ApiError(503, "draining", "the daemon is shutting down and takes no new jobs",
                       {"Retry-After": "5"})


def _check_room(ctx: Context, n: int) -> None:
    if ctx.store.queued + n > ctx.cfg.jobs.max_queue:
        raise ApiError(429, "queue_full", f"the queue is full (jobs.max_queue = {ctx.cfg.jobs.max_queue})",
                       {"Retry-After": "1"})


def _job_response(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, headers=headers, content_type="application/json")


async def submit(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    _refuse_when_draining(ctx)
    body = await _body(request)
    if (key := spec.key_of(body)) is not None \
            and (found := await ctx.store.find_key(key, ctx.scheduler.progress_json)) is not None:
        return _job_response(found)  # the contract: the kept job with this key, 200, whatever the rest says
    new = spec.parse(body, ctx.cfg.jobs, ctx.allow)
    await ctx.allow.check(new.fn)  # asks the probe the first time (the key may be taken meanwhile:
    _check_room(ctx, 1)            # enqueue_many then answers with that job, created=False)
    [(jid, text, created)] = await ctx.store.enqueue([new], ctx.scheduler.progress_json)
    if not created:  # the kept job with this key, as it is now
        return _job_response(text)
    ctx.metrics.submitted.inc()
    ctx.scheduler.kick()
    return _job_response(text, 202, {"Location": f"/v1/jobs/{jid}"})


async def submit_batch(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    _refuse_when_draining(ctx)
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
        raise ApiError(422, "invalid_request", "jobs: expected {\"jobs\": [JobSpec, ...]}")
    if set(body) - {"jobs"}:
        raise ApiError(422, "invalid_request", f"{sorted(set(body) - {'jobs'})[0]}: unknown field")
    new = []
    for i, s in enumerate(body["jobs"]):
        try:
            new.append(spec.parse(s, ctx.cfg.jobs, ctx.allow))
        except ApiError as e:
            raise ApiError(e.status, e.code, f"jobs[{i}]: {e.message}") from None
    await ctx.allow.check_all([j.fn for j in new])
    if ctx.store.queued + len(new) > ctx.cfg.jobs.max_queue:  # only then do kept keys matter
        _check_room(ctx, sum([j.key is None or await ctx.store.find_key(j.key) is None for j in new]))
    results = await ctx.store.enqueue(new, ctx.scheduler.progress_json)
    ctx.metrics.submitted.inc(sum(1 for _, _, created in results if created))
    ctx.scheduler.kick()
    return _job_response('{"jobs":[' + ",".join(text for _, text, _ in results) + "]}", 202)


def _number(request: web.Request, name: str, lo: float, hi: float) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", f"{name}: expected a number from {lo:g} to {hi:g}") from None
    if not lo <= v <= hi:  # NaN fails this too
        raise ApiError(422, "invalid_request", f"{name}: must be from {lo:g} to {hi:g}, got {raw}")
    return v


async def get_job(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    jid = request.match_info["id"]
    wait = _number(request, "wait", 0, 60)
    found = await ctx.store.get_json(jid, ctx.scheduler.progress_json)
    if found is None:
        raise ApiError(404, "not_found", f"no job {jid!r}")
    if wait and found[0] not in FINAL_STATES:
        await _until_final(ctx, [jid], wait, True)
        found = await ctx.store.get_json(jid, ctx.scheduler.progress_json) or found
    return _job_response(found[1])


async def _until_final(ctx: Context, ids: list[str], timeout: float, need_all: bool) -> None:
    """Waits until all of `ids` (or one, unless need_all) are in a final state, or `timeout`.

    The scheduler wakes waiters at the end of every attempt; a job that is retried is not
    finished, so its waiters go back to waiting for what is left of their time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    poll = ctx.scheduler.poll  # another host's end is told by NOTIFY; polled while that is down
    while ids and (left := deadline - loop.time()) > 0:
        # watched before the states are read: an end between the read and the wait is not missed
        with ctx.scheduler.waiters.watch(ids, need_all) as w:
            states = await ctx.store.states(ids)
            still = [i for i in ids if states.get(i) not in (None, *FINAL_STATES)]
            if not still or (not need_all and len(still) < len(ids)):
                return
            if len(still) < len(ids):  # some ended: watch the rest
                ids = still
                continue
            await w.until(left if poll is None else min(left, poll))


_WAIT_IDS = 1000  # ids per POST /v1/jobs/wait (CONTRACT.md): the clients send at most this many
_WAIT_FIELDS = frozenset({"ids", "timeout", "all"})


async def wait_jobs(request: web.Request) -> web.Response:
    """POST /v1/jobs/wait {"ids": [...], "timeout": S, "all": false}: one long-poll for many jobs.

    Answers with the jobs among `ids` that have finished, as soon as one has (or all have, with
    "all": true), or after S seconds (0..60) with those finished by then. An unknown id is a 404
    naming it: left out, it would look like a job still running, and the caller would wait on.
    """
    ctx = request.app[CTX]
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("ids"), list) \
            or not all(isinstance(i, str) for i in body["ids"]):
        raise ApiError(422, "invalid_request", "ids: expected a list of job ids")
    if unknown_fields := sorted(set(body) - _WAIT_FIELDS):
        raise ApiError(422, "invalid_request",
                       f"{unknown_fields[0]}: unknown field (fields: {', '.join(sorted(_WAIT_FIELDS))})")
    if not 1 <= len(body["ids"]) <= _WAIT_IDS:
        raise ApiError(422, "invalid_request",
                       f"ids: expected 1 to {_WAIT_IDS} job ids, got {len(body['ids'])}")
    timeout = body.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= 60:
        raise ApiError(422, "invalid_request", "timeout: expected a number from 0 to 60")
    need_all = body.get("all", False)
    if not isinstance(need_all, bool):
        raise ApiError(422, "invalid_request", "all: expected true or false")
    ids = list(dict.fromkeys(body["ids"]))
    states = await ctx.store.states(ids)
    if (unknown := next((i for i in ids if i not in states), None)) is not None:
        raise ApiError(404, "not_found", f"no job {unknown[:200]!r}")
    open_ids = [i for i in ids if states[i] not in FINAL_STATES]
    done = len(ids) - len(open_ids)
    if timeout and open_ids and (need_all or done == 0):
        await _until_final(ctx, open_ids, timeout, need_all)
    return _job_response('{"jobs":[' + ",".join(await ctx.store.finished_json(ids)) + "]}")


async def cancel_job(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    jid = request.match_info["id"]
    raw = request.query.get("queued_only", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid_request", "queued_only: expected true or false")
    outcome = await ctx.scheduler.cancel(jid, raw in ("true", "1"))
    if outcome == "not_found":
        raise ApiError(404, "not_found", f"no job {jid!r}")
    if outcome == "already_finished":
        raise ApiError(409, "already_finished", f"job {jid} has already finished")
    if outcome == "already_started":
        raise ApiError(409, "already_started", f"job {jid} has started (queued_only=true)")
    await ctx.store.committed()
    found = await ctx.store.get_json(jid)
    if found is None:
        raise ApiError(404, "not_found", f"no job {jid!r}")
    return _job_response(found[1])


async def list_jobs(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise ApiError(422, "invalid_request", f"state: must be one of {', '.join(STATES)}")
    raw = request.query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise ApiError(422, "invalid_request", "limit: expected an integer from 1 to 1000")
    jobs = await ctx.store.list_json(state, int(raw), ctx.scheduler.progress_json)
    return _job_response('{"jobs":[' + ",".join(jobs) + "]}")


async def workers(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    raw = request.query.get("all", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid_request", "all: expected true or false")
    if raw in ("true", "1") and ctx.cluster is not None:
        return _json({"workers": await ctx.cluster.workers()})
    return _json({"workers": ctx.scheduler.workers()})


async def hosts(request: web.Request) -> web.Response:
    """The cluster's hosts; on SQLite, this one host."""
    ctx = request.app[CTX]
    if ctx.cluster is not None:
        return _json({"hosts": await ctx.cluster.listing()})
    sched = ctx.scheduler
    live = sum(1 for s in sched.pool.slots.values() if s.state in ("idle", "busy"))
    now = iso(time.time())
    return _json({"hosts": [{"name": sched.host, "started_at": iso(ctx.started_at), "last_seen": now,
                             "workers": live, "running": len(sched.running),
                             "state": "draining" if ctx.draining else "alive"}]})


STORE_REASON = "the store cannot be written"


def health_reasons(ctx: Context) -> list[str]:
    reasons = []
    if ctx.draining:
        reasons.append("draining for shutdown")
    # a worker being started or replaced counts for STARTING_GRACE seconds: a cancel of every
    # running job, or the first request after socket activation, is not an outage
    if not any(s.state in ("idle", "busy") or s.coming() for s in ctx.scheduler.pool.slots.values()):
        reasons.append("no worker is alive")
    if not ctx.store.probe():
        reasons.append(f"{STORE_REASON}: {ctx.store.last_error}")
    for check in ctx.extra_health:
        if (reason := check()) is not None:
            reasons.append(reason)
    return reasons


async def health(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    reasons = health_reasons(ctx)
    st = ctx.scheduler.state()
    body = {"status": "unhealthy" if reasons else "ok", "reasons": reasons, "version": ctx.version,
            "queued": st["queued"], "running": st["running"], "workers": st["workers"]}
    return _json(body, 503 if reasons else 200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[CTX].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi_document(request: web.Request) -> web.Response:
    return _json(openapi.document(request.app[CTX].version))


async def _no_route(request: web.Request) -> web.Response:
    allowed: set[str] = set()  # a path may have a resource per method (/v1/jobs: GET and POST)
    for resource in request.app.router.resources():
        if resource.canonical != "/{tail}":
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        methods = ", ".join(sorted(allowed))
        raise ApiError(405, "method_not_allowed",
                       f"{request.method} is not allowed here (allowed: {methods})", {"Allow": methods})
    raise ApiError(404, "not_found", f"no such path: {request.path[:200]}")


def refuse_expectation(request: web.BaseRequest) -> web.StreamResponse | None:
    """A JSON 417 for any `Expect` but 100-continue (aiohttp's own answer fails on a header that
    is not UTF-8); None for 100-continue. service.http.runner.Runner asks it before routing."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        return None
    return error_response(417, "expectation_failed", "only 'Expect: 100-continue' is supported")


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` is honoured; any other expectation gets a JSON 417."""
    if (refusal := refuse_expectation(request)) is not None:
        return refusal
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


class Route(NamedTuple):
    """One endpoint and the query parameters it takes: any other is a 422 naming it, so that a
    misspelt or not-yet-supported filter (`?stat=failed`) is not silently ignored."""

    method: str
    path: str
    handler: Handler
    query: frozenset[str] = frozenset()


# Every endpoint, with its query parameters written here and only here (later issues add theirs:
# fn, key, schedule and cursor to GET /v1/jobs, all to GET /v1/workers).
ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/jobs", submit),
    Route("POST", "/v1/jobs/batch", submit_batch),
    Route("POST", "/v1/jobs/wait", wait_jobs),
    Route("GET", "/v1/jobs", list_jobs, frozenset({"state", "limit"})),
    Route("GET", "/v1/jobs/{id}", get_job, frozenset({"wait"})),
    Route("DELETE", "/v1/jobs/{id}", cancel_job, frozenset({"queued_only"})),
    Route("GET", "/v1/workers", workers, frozenset({"all"})),
    Route("GET", "/v1/hosts", hosts),
    Route("GET", "/health", health),
    Route("GET", "/metrics", metrics),
    Route("GET", "/openapi.json", openapi_document),
)


def _shown(name: str) -> str:
    """A query parameter's name as a message may show it (any bytes may come in a URL)."""
    return name if name and name.isprintable() and len(name) <= 100 else repr(name[:100])


def _with_query(route: Route) -> Handler:
    """The route's handler, behind the check that its query names only known parameters."""
    known, handler = route.query, route.handler
    takes = f"this endpoint takes {', '.join(sorted(known))}" if known else "this endpoint takes none"

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        for name in request.query:
            if name not in known:
                raise ApiError(422, "invalid_request", f"{_shown(name)}: unknown query parameter ({takes})")
        return await handler(request)

    return checked


def make_app(ctx: Context) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=2**31)
    app[CTX] = ctx
    for route in ROUTES:  # add_route: a GET gets no implicit HEAD
        app.router.add_route(route.method, route.path, _with_query(route), expect_handler=_expect)
    # last: unknown paths (404) and known paths with another method (405), as JSON, with our
    # Expect handling (aiohttp's own answers fail on a header that is not UTF-8)
    app.router.add_route("*", "/{tail:.*}", _no_route, expect_handler=_expect)
    return app

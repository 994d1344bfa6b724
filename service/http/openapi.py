"""The OpenAPI 3.0.3 document of the poold HTTP API, served at `GET /openapi.json`.

One data structure, written from CONTRACT.md ("HTTP API", and "What changes in
the first part" of its second part), so the document and the contract agree
(tests/unit/test_openapi.py checks the numbers, codes and query parameters). It is
3.0.3 rather than 3.1 because that is what most tooling (schemathesis,
generators) handles best; `nullable` therefore stands in for `null` types.
"""

from __future__ import annotations

import copy
from typing import Any

from service import model

JSON = "application/json"
STATES = list(model.STATES)
ERROR_TYPES = [t.value for t in model.ErrorType]
ERROR_CODES = ["invalid_json", "invalid_request", "function_not_found", "unauthorized",
               "function_not_allowed", "not_found", "method_not_allowed", "already_finished",
               "already_started", "payload_too_large", "queue_full", "draining", "store_unavailable",
               "expectation_failed"]
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
FN_PATTERN = f"^{_DOTTED}:{_DOTTED}$"  # `module:name`; dotted qualnames allowed after the colon

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: Schema, **extra: Any) -> Schema:
    """A response (or request body) whose content is JSON of `schema`."""
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _error(description: str, *codes: str) -> Schema:
    """An error response; the schema narrows `error.code` to the codes this status carries here."""
    narrowed = {"type": "object", "properties": {
        "error": {"type": "object", "properties": {"code": {"type": "string", "enum": list(codes)}}}}}
    return {"description": description, "content": {JSON: {
        "schema": {"allOf": [_ref("Error"), narrowed]},
        "example": {"error": {"code": codes[0], "message": description}}}}}


def _nullable(schema: Schema, description: str) -> Schema:
    return {**schema, "nullable": True, "description": description}


UNAUTHORIZED = _error("A token is configured and the request lacks `Authorization: Bearer <token>` "
                      "or carries a wrong one.", "unauthorized")
NOT_FOUND = _error("No job with this id (or it expired after `jobs.result_ttl`).", "not_found")
INVALID_JSON = _error("The body is not JSON.", "invalid_json")
TOO_LARGE = _error("The body is larger than `server.max_body_bytes`.", "payload_too_large")
NOT_ALLOWED = _error("The function is not matched by `jobs.allow`.", "function_not_allowed")
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "required": True, "schema": {"type": "integer", "minimum": 0}}}
STORE_UNAVAILABLE = {**_error("The job store cannot be read or written; the daemon keeps trying to "
                              "recover.", "store_unavailable"), "headers": _RETRY_AFTER}
DRAINING_OR_STORE = {**_error("The daemon is draining for shutdown and takes no new jobs (`draining`), "
                              "or the job store cannot be written (`store_unavailable`).",
                              "draining", "store_unavailable"),
                     "headers": _RETRY_AFTER}
EXPECTATION_FAILED = _error("The request has an `Expect` header other than `100-continue`.",
                            "expectation_failed")
UNKNOWN_QUERY = _error("An unknown query parameter (the message names it).", "invalid_request")
QUEUE_FULL = {**_error("More than `jobs.max_queue` jobs would be queued.", "queue_full"),
              "headers": _RETRY_AFTER}

JOB_ID = {"name": "id", "in": "path", "required": True, "description": "The job's id.",
          "schema": {"type": "string"}}

JOB_SPEC: Schema = {
    "type": "object",
    "description": "What to run. Only `fn` is required. Any other field, a wrong type or an "
                   "out-of-range value is 422 `invalid_request` naming the field. `args` and `kwargs` are "
                   "JSON values only (never pickles).",
    "required": ["fn"],
    "additionalProperties": False,
    "properties": {
        "fn": {"type": "string", "pattern": FN_PATTERN, "example": "service.demo:fib",
               "description": "The function's import path, `module:name`; it must match `jobs.allow` (else "
                              "403 `function_not_allowed`) and exist (else 422 `function_not_found`)."},
        "args": {"type": "array", "items": {}, "default": [], "description": "Positional arguments."},
        "kwargs": {"type": "object", "additionalProperties": {}, "default": {},
                   "description": "Keyword arguments."},
        "timeout": _nullable({"type": "number", "minimum": 0, "exclusiveMinimum": True, "default": None},
                             "Seconds; > 0 and ≤ `jobs.max_timeout` (default 3600). null means "
                             "`jobs.default_timeout` (default 300)."),
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000, "default": 0,
                     "description": "Higher runs first; equal priority runs in submission order."},
        "retries": {"type": "integer", "minimum": 0, "maximum": 100, "default": 0,
                    "description": "How many more attempts a failed attempt may get (exception, timeout "
                                   "or worker death; never after a cancel)."},
        "key": _nullable({"type": "string", "minLength": 1, "maxLength": 200, "default": None},
                         "Idempotency key: a submission whose key is already used by a kept job "
                         "returns that job (200) and enqueues nothing."),
    },
}

JOB: Schema = {
    "type": "object",
    "description": "A job. `state` moves `queued` → `running` → one of `succeeded`, `failed`, "
                   "`timed_out`, `cancelled`.",
    "required": ["id", "fn", "args", "kwargs", "state", "priority", "timeout", "retries", "attempts",
                 "key", "created_at", "started_at", "finished_at", "worker", "result", "error", "progress"],
    "properties": {
        "id": {"type": "string"},
        "fn": {"type": "string", "example": "service.demo:fib"},
        "args": {"type": "array", "items": {}},
        "kwargs": {"type": "object", "additionalProperties": {}},
        "state": {"type": "string", "enum": STATES},
        "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "timeout": {"type": "number", "description": "The timeout in force, in seconds."},
        "retries": {"type": "integer", "minimum": 0, "maximum": 100},
        "attempts": {"type": "integer", "minimum": 0, "description": "Attempts started so far."},
        "key": _nullable({"type": "string"}, "The idempotency key, if any."),
        "created_at": {"type": "string", "format": "date-time", "example": "2026-11-24T12:00:00.000000Z"},
        "started_at": _nullable({"type": "string", "format": "date-time"}, "When the last attempt started."),
        "finished_at": _nullable({"type": "string", "format": "date-time"}, "When the job finished."),
        "worker": _nullable({"type": "object", "required": ["pid", "name"], "properties": {
            "pid": {"type": "integer"}, "name": {"type": "string", "example": "poold: worker 1"}}},
            "The process running (or that ran) the last attempt."),
        "result": _nullable({}, "The function's return value (any JSON) when `succeeded`."),
        "error": _nullable({
            "type": "object", "required": ["type", "message", "exception", "traceback"], "properties": {
                "type": {"type": "string", "enum": ERROR_TYPES,
                         "description": "`exception`: the function raised; `timeout`; `worker_died`: the "
                                        "process died (the message names the signal or exit code); "
                                        "`unserializable_result`; `result_too_large`: above "
                                        "`jobs.max_result_bytes`; `interrupted`: the daemon stopped "
                                        "mid-job and no retry was left."},
                "message": {"type": "string"},
                "exception": _nullable({"type": "string"}, "The exception's class name."),
                "traceback": _nullable({"type": "string"}, "The formatted traceback."),
            }}, "Why the job did not succeed, when `failed` or `timed_out`."),
        "progress": _nullable({
            "type": "object", "required": ["current", "total", "message"], "properties": {
                "current": {"type": "number"},
                "total": _nullable({"type": "number"}, "The expected end, if known."),
                "message": _nullable({"type": "string"}, "A short human-readable note."),
            }}, "As last reported by the job through `service.progress()`."),
    },
}

WORKER: Schema = {
    "type": "object",
    "required": ["pid", "name", "state", "job", "rss_bytes", "tasks_done", "started_at", "host"],
    "properties": {
        "pid": {"type": "integer"},
        "host": {"type": "string", "description": "The cluster name of its host (`cluster.name`)."},
        "name": {"type": "string", "example": "poold: worker 1",
                 "description": "The process title, `poold: worker N` (N its slot)."},
        "state": {"type": "string", "enum": ["idle", "busy", "starting"]},
        "job": _nullable({"type": "string"}, "The id of the job it runs."),
        "rss_bytes": {"type": "integer", "minimum": 0},
        "tasks_done": {"type": "integer", "minimum": 0},
        "started_at": {"type": "string", "format": "date-time"},
    },
}

HOST: Schema = {
    "type": "object",
    "required": ["name", "started_at", "last_seen", "workers", "running", "state"],
    "properties": {
        "name": {"type": "string", "description": "`cluster.name` (by default hostname:port)."},
        "started_at": {"type": "string", "format": "date-time"},
        "last_seen": {"type": "string", "format": "date-time",
                      "description": "Its last heartbeat, by the database's clock."},
        "workers": {"type": "integer", "minimum": 0, "description": "Its live workers."},
        "running": {"type": "integer", "minimum": 0, "description": "Jobs running there."},
        "state": {"type": "string", "enum": ["alive", "draining", "dead"]},
    },
}

ERROR: Schema = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string", "enum": ERROR_CODES}, "message": {"type": "string"}}}},
}

HEALTH: Schema = {
    "type": "object", "required": ["status"],
    "description": "`ok` when serving; `unhealthy` with `reasons` when no worker is alive, the store "
                   "cannot be written, or the daemon is draining for shutdown.",
    "properties": {"status": {"type": "string", "enum": ["ok", "unhealthy"]},
                   "reasons": {"type": "array", "items": {"type": "string"}}},
}


WAIT_REQUEST: Schema = {
    "type": "object", "required": ["ids"], "additionalProperties": False,
    "properties": {
        "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1000,
                "description": "The jobs to wait for, 1 to 1000 ids."},
        "timeout": {"type": "number", "minimum": 0, "maximum": 60, "default": 0,
                    "description": "Seconds to wait at most, 0 to 60; 0 answers at once."},
        "all": {"type": "boolean", "default": False,
                "description": "Wait until every job has finished, not just one."},
    },
}


def _list(key: str, item: str) -> Schema:
    return {"type": "object", "required": [key], "properties": {key: {"type": "array", "items": _ref(item)}}}


def _op(op_id: str, tag: str, summary: str, description: str, responses: Schema, **extra: Any) -> Schema:
    """An operation. Every one may answer 417 (an `Expect` it cannot meet) and 422 (an unknown
    query parameter: an operation with a 422 of its own says so there); every one but /health
    may answer 401 when a token is configured."""
    responses = {"422": UNKNOWN_QUERY, **responses, "417": EXPECTATION_FAILED}
    if extra.pop("auth", True):
        responses = {**responses, "401": UNAUTHORIZED}
    return {"operationId": op_id, "tags": [tag], "summary": summary, "description": description,
            "responses": responses, **extra}


def _paths() -> Schema:
    submit_errors = {"400": INVALID_JSON, "403": NOT_ALLOWED, "413": TOO_LARGE, "429": QUEUE_FULL,
                     "503": DRAINING_OR_STORE}
    return {
        "/v1/jobs": {
            "post": _op(
                "submitJob", "jobs", "Submit a job",
                "Enqueues one job. With a `key` already used by a kept job, answers 200 with that job "
                "whatever the rest of the body, and enqueues nothing.",
                {"202": _json("Accepted and queued.", _ref("Job"), headers={"Location": {
                    "description": "`/v1/jobs/{id}` of the new job.", "schema": {"type": "string"}}}),
                 "200": _json("The existing job with this `key`; nothing new enqueued.", _ref("Job")),
                 "422": _error("A field is missing, of the wrong type, out of range or unknown, or a query "
                               "parameter is unknown (the message names it); or the function cannot be "
                               "found.", "invalid_request", "function_not_found"), **submit_errors},
                requestBody={"required": True, "content": {JSON: {"schema": _ref("JobSpec")}}}),
            "get": _op(
                "listJobs", "jobs", "List jobs", "Kept jobs, newest first.",
                {"200": _json("The jobs.", _list("jobs", "Job")),
                 "422": _error("`state` or `limit` is invalid, or another query parameter is given "
                               "(the message names it).", "invalid_request"),
                 "503": STORE_UNAVAILABLE},
                parameters=[
                    {"name": "state", "in": "query", "description": "Only jobs in this state.",
                     "schema": {"type": "string", "enum": STATES}},
                    {"name": "limit", "in": "query", "description": "At most this many jobs.",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}]),
        },
        "/v1/jobs/batch": {"post": _op(
            "submitJobs", "jobs", "Submit jobs in one request",
            "All or nothing: one invalid spec rejects the whole batch, with its index in the message; a "
            "batch that would cross `jobs.max_queue` is refused whole (429).",
            {"202": _json("All accepted; the jobs in request order.", _list("jobs", "Job")),
             "422": _error("A spec is invalid (the message names its index and the field), a query "
                           "parameter is unknown, or a function cannot be found.",
                           "invalid_request", "function_not_found"),
             **submit_errors},
            requestBody={"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["jobs"],
                "properties": {"jobs": {"type": "array", "items": _ref("JobSpec")}}}}}})},
        "/v1/jobs/wait": {"post": _op(
            "waitJobs", "jobs", "Wait for any (or all) of many jobs",
            "One long-poll for up to 1000 jobs: answers with those among `ids` that have finished, as "
            "soon as one of them has (with `all`: every one), or after `timeout` seconds with those "
            "finished by then (possibly none). An id given twice counts once.",
            {"200": _json("The finished jobs among `ids`, in no particular order.", _list("jobs", "Job")),
             "400": INVALID_JSON,
             "404": _error("An id names no job (or one that expired after `jobs.result_ttl`); the "
                           "message names the first such id.", "not_found"),
             "413": TOO_LARGE,
             "422": _error("`ids`, `timeout` or `all` is missing, of the wrong type or out of range, a "
                           "field or a query parameter is unknown (the message names it).",
                           "invalid_request"),
             "503": STORE_UNAVAILABLE},
            requestBody={"required": True, "content": {JSON: {"schema": _ref("WaitRequest")}}})},
        "/v1/jobs/{id}": {
            "parameters": [JOB_ID],
            "get": _op(
                "getJob", "jobs", "Get a job",
                "With `wait`, long-polls: answers as soon as the job is finished, or after `wait` "
                "seconds with its current state.",
                {"200": _json("The job.", _ref("Job")), "404": NOT_FOUND,
                 "422": _error("`wait` is not a number from 0 to 60, or another query parameter is "
                               "given (the message names it).", "invalid_request"),
                 "503": STORE_UNAVAILABLE},
                parameters=[{"name": "wait", "in": "query", "description": "Seconds to wait, 0 to 60.",
                             "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0}}]),
            "delete": _op(
                "cancelJob", "jobs", "Cancel a job",
                "A queued job is removed from the queue; a running job's worker process tree is killed "
                "and the worker replaced. A cancelled job is never retried.",
                {"200": _json("The job, now `cancelled`.", _ref("Job")), "404": NOT_FOUND,
                 "409": _error("The job has already finished (`already_finished`), or has started and "
                               "`queued_only` was true (`already_started`).",
                               "already_finished", "already_started"),
                 "422": _error("`queued_only` is not a boolean, or another query parameter is given "
                               "(the message names it).", "invalid_request"),
                 "503": STORE_UNAVAILABLE},
                parameters=[{"name": "queued_only", "in": "query",
                             "description": "Only cancel a job that has not started yet.",
                             "schema": {"type": "boolean", "default": False}}]),
        },
        "/v1/workers": {"get": _op(
            "listWorkers", "workers", "List the pool's workers",
            "One per slot of this host; with `all=true`, every live host's (PostgreSQL).",
            {"200": _json("The workers.", _list("workers", "Worker")),
             "422": _error("`all` is not a boolean, or another query parameter is given.", "invalid_request"),
             "503": STORE_UNAVAILABLE},
            parameters=[{"name": "all", "in": "query", "description": "Every live host's workers.",
                         "schema": {"type": "boolean", "default": False}}])},
        "/v1/hosts": {"get": _op(
            "listHosts", "workers", "List the cluster's hosts",
            "Every host sharing the store (PostgreSQL), dead ones included; on SQLite, this one.",
            {"200": _json("The hosts.", _list("hosts", "Host")), "503": STORE_UNAVAILABLE})},
        "/health": {"get": _op(
            "getHealth", "operations", "Health check",
            "Never requires a token.", auth=False, security=[],
            responses={"200": _json("Serving.", _ref("Health")),
                       "503": _json("Unhealthy; `reasons` says why.", _ref("Health"))})},
        "/metrics": {"get": _op("getMetrics", "operations", "Prometheus metrics", "Prometheus text format.",
                                {"200": {"description": "The metrics.",
                                         "content": {"text/plain": {"schema": {"type": "string"}}}}})},
        "/openapi.json": {"get": _op("getOpenAPI", "operations", "This document", "OpenAPI 3 document.",
                                     {"200": _json("The document.", {"type": "object"})})},
    }


def document(version: str) -> dict[str, Any]:
    """Returns the OpenAPI document; a fresh deep copy each call, so callers may change it."""
    return copy.deepcopy({
        "openapi": "3.0.3",
        "info": {
            "title": "poold",
            "version": version,
            "description": "Runs CPU-bound Python functions on a pool of worker processes. JSON in and "
                           "out. Errors are `{\"error\": {\"code\", \"message\"}}`; an unknown path is 404 "
                           "`not_found`, an unsupported method 405 `method_not_allowed`. Authentication "
                           "applies only when the daemon has a token configured (`server.token` or "
                           "`server.token_file`): then every endpoint except `GET /health` requires "
                           "`Authorization: Bearer <token>`. An unknown query parameter is 422 "
                           "`invalid_request` naming it; an `Expect` other than `100-continue` is 417 "
                           "`expectation_failed`.",
        },
        "tags": [{"name": "jobs"}, {"name": "workers"}, {"name": "operations"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Required only when a token is configured."}},
            "schemas": {"JobSpec": JOB_SPEC, "Job": JOB, "Worker": WORKER, "Host": HOST, "Error": ERROR,
                        "Health": HEALTH, "WaitRequest": WAIT_REQUEST},
        },
    })

"""The OpenAPI document is valid OpenAPI and says what CONTRACT.md ("HTTP API") says.

The contract's numbers, codes and paths are copied here on purpose: a change to
either side must be made to both, and this file is where the two meet.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from openapi_spec_validator import validate

import service
from service.http.openapi import document

# CONTRACT.md, "HTTP API": the endpoint table
CONTRACT_OPERATIONS = {
    ("post", "/v1/jobs"), ("post", "/v1/jobs/batch"), ("get", "/v1/jobs/{id}"),
    ("delete", "/v1/jobs/{id}"), ("get", "/v1/jobs"), ("get", "/v1/workers"), ("get", "/health"),
    ("get", "/metrics"), ("get", "/openapi.json"),
    ("post", "/v1/jobs/wait"),  # the second part, "What changes in the first part"
    ("get", "/v1/hosts"),  # the second part, "Many hosts on one PostgreSQL database"
}
# CONTRACT.md, "HTTP API": the error table, status -> codes
CONTRACT_ERRORS = {
    "400": {"invalid_json"}, "422": {"invalid_request", "function_not_found"}, "401": {"unauthorized"},
    "403": {"function_not_allowed"}, "404": {"not_found"}, "405": {"method_not_allowed"},
    "409": {"already_finished", "already_started"}, "413": {"payload_too_large"}, "429": {"queue_full"},
    "503": {"draining", "store_unavailable"}, "417": {"expectation_failed"},
}
STATES = {"queued", "running", "succeeded", "failed", "timed_out", "cancelled"}
# CONTRACT.md: the Job example, verbatim
CONTRACT_JOB = {"id": "…", "fn": "module:name", "args": [], "kwargs": {}, "state": "queued",
                "priority": 0, "timeout": 300.0, "retries": 0, "attempts": 0, "key": None,
                "created_at": "2026-11-24T12:00:00.000000Z", "started_at": None, "finished_at": None,
                "worker": None, "result": None, "error": None, "progress": None}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document(service.__version__)


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> OAS30Validator:
    """A validator for `schema` whose `$ref`s resolve against the document's components."""
    return OAS30Validator({**schema, "components": doc["components"]}, format_checker=oas30_format_checker)


def _schema(doc: dict[str, Any], name: str) -> OAS30Validator:
    return _validator(doc, {"$ref": f"#/components/schemas/{name}"})


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m, p): op for p, item in doc["paths"].items() for m, op in item.items() if m in METHODS}


def _params(doc: dict[str, Any], method: str, path: str) -> dict[str, dict[str, Any]]:
    item = doc["paths"][path]
    return {p["name"]: p for p in item.get("parameters", []) + item[method].get("parameters", [])}


def test_is_valid_openapi_and_json(doc: dict[str, Any]) -> None:
    validate(doc)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["version"] == service.__version__


def test_fresh_copy_each_call() -> None:
    first = document("1")
    first["components"]["schemas"]["JobSpec"]["required"].append("args")
    assert document("1")["components"]["schemas"]["JobSpec"]["required"] == ["fn"]


def test_every_contract_operation_present_with_unique_ids(doc: dict[str, Any]) -> None:
    ops = _operations(doc)
    assert set(ops) == CONTRACT_OPERATIONS
    ids = [op["operationId"] for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert all(op.get("summary") and op.get("description") for op in ops.values())


def test_error_codes_match_contract(doc: dict[str, Any]) -> None:
    enum = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(enum) == set().union(*CONTRACT_ERRORS.values())
    assert len(enum) == len(set(enum))


def test_every_error_response_uses_its_statuses_codes(doc: dict[str, Any]) -> None:
    for (method, path), op in _operations(doc).items():
        for status, response in op["responses"].items():
            if status not in CONTRACT_ERRORS or path == "/health":
                continue
            narrowed = response["content"]["application/json"]["schema"]["allOf"][1]
            codes = set(narrowed["properties"]["error"]["properties"]["code"]["enum"])
            assert codes and codes <= CONTRACT_ERRORS[status], (method, path, status)
            validator = _validator(doc, response["content"]["application/json"]["schema"])
            for code in codes:
                validator.validate({"error": {"code": code, "message": "m"}})
            assert not validator.is_valid({"error": {"code": "nonsense", "message": "m"}})


@pytest.mark.parametrize(("method", "path", "statuses"), [
    ("post", "/v1/jobs", {"200", "202", "400", "401", "403", "413", "422", "429", "503"}),
    ("post", "/v1/jobs/batch", {"202", "400", "401", "403", "413", "422", "429", "503"}),
    ("get", "/v1/jobs/{id}", {"200", "401", "404", "422"}),
    ("delete", "/v1/jobs/{id}", {"200", "401", "404", "409"}),
    ("get", "/v1/jobs", {"200", "401"}),
    ("get", "/v1/workers", {"200", "401", "422"}),
    ("get", "/v1/hosts", {"200", "401"}),
    ("get", "/health", {"200", "503"}),
    ("get", "/metrics", {"200", "401"}),
    ("get", "/openapi.json", {"200", "401"}),
])
def test_responses(doc: dict[str, Any], method: str, path: str, statuses: set[str]) -> None:
    assert statuses <= set(doc["paths"][path][method]["responses"])


def test_submit_headers_and_bodies(doc: dict[str, Any]) -> None:
    submit = doc["paths"]["/v1/jobs"]["post"]
    assert "Location" in submit["responses"]["202"]["headers"]
    assert "Retry-After" in submit["responses"]["429"]["headers"]
    assert "Retry-After" in doc["paths"]["/v1/jobs/batch"]["post"]["responses"]["429"]["headers"]
    batch = doc["paths"]["/v1/jobs/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    _validator(doc, batch).validate({"jobs": [{"fn": "service.demo:fib", "args": [3]}]})
    assert not _validator(doc, batch).is_valid({"jobs": [{"fn": "service.demo:fib", "priority": 5000}]})
    listed = doc["paths"]["/v1/jobs/batch"]["post"]["responses"]["202"]["content"]["application/json"]
    _validator(doc, listed["schema"]).validate({"jobs": [CONTRACT_JOB]})


def test_security(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "Required only when a token is configured."}
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "only when the daemon has a token configured" in doc["info"]["description"]
    assert all("security" not in op for (_, path), op in _operations(doc).items() if path != "/health")


def test_query_parameters(doc: dict[str, Any]) -> None:
    wait = _params(doc, "get", "/v1/jobs/{id}")["wait"]["schema"]
    assert (wait["type"], wait["minimum"], wait["maximum"]) == ("number", 0, 60)
    assert _params(doc, "delete", "/v1/jobs/{id}")["queued_only"]["schema"]["type"] == "boolean"
    listing = _params(doc, "get", "/v1/jobs")
    assert set(listing["state"]["schema"]["enum"]) == STATES
    limit = listing["limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"], limit["default"]) == ("integer", 1, 1000, 100)
    assert _params(doc, "get", "/v1/jobs/{id}")["id"]["required"] is True


def test_job_spec_constraints(doc: dict[str, Any]) -> None:
    spec = doc["components"]["schemas"]["JobSpec"]
    props = spec["properties"]
    assert spec["required"] == ["fn"]
    assert spec["additionalProperties"] is False
    assert set(props) == {"fn", "args", "kwargs", "timeout", "priority", "retries", "key"}
    assert props["args"]["type"] == "array" and props["kwargs"]["type"] == "object"
    assert props["timeout"] | {"description": ""} == {
        "type": "number", "minimum": 0, "exclusiveMinimum": True, "nullable": True, "default": None,
        "description": ""}
    assert (props["priority"]["type"], props["priority"]["minimum"], props["priority"]["maximum"]) == (
        "integer", -1000, 1000)
    assert (props["retries"]["type"], props["retries"]["minimum"], props["retries"]["maximum"]) == (
        "integer", 0, 100)
    assert (props["key"]["minLength"], props["key"]["maxLength"], props["key"]["nullable"]) == (1, 200, True)


@pytest.mark.parametrize("body", [
    {"fn": "module:name"},
    {"fn": "service.demo:fib", "args": [30], "kwargs": {}, "timeout": None, "priority": 0, "retries": 0,
     "key": None},
    {"fn": "a.b.c:f", "timeout": 0.001, "priority": -1000, "retries": 100, "key": "k" * 200},
    {"fn": "m:f", "priority": 1000, "key": "k", "kwargs": {"x": [1, {"y": None}]}},
])
def test_job_spec_accepts(doc: dict[str, Any], body: dict[str, Any]) -> None:
    _schema(doc, "JobSpec").validate(body)


@pytest.mark.parametrize("body", [
    {}, {"args": []}, {"fn": "nocolon"}, {"fn": ":f"}, {"fn": "m:"}, {"fn": 1},
    {"fn": "m:f", "args": {}}, {"fn": "m:f", "kwargs": []}, {"fn": "m:f", "timeout": 0},
    {"fn": "m:f", "timeout": -1}, {"fn": "m:f", "timeout": "1"}, {"fn": "m:f", "priority": 1001},
    {"fn": "m:f", "priority": -1001}, {"fn": "m:f", "priority": 1.5}, {"fn": "m:f", "retries": -1},
    {"fn": "m:f", "retries": 101}, {"fn": "m:f", "key": ""}, {"fn": "m:f", "key": "k" * 201},
    {"fn": "m:f", "unknown": 1},
])
def test_job_spec_rejects(doc: dict[str, Any], body: dict[str, Any]) -> None:
    assert not _schema(doc, "JobSpec").is_valid(body)


def test_job_schema_matches_contract(doc: dict[str, Any]) -> None:
    job = doc["components"]["schemas"]["Job"]
    assert set(job["required"]) == set(CONTRACT_JOB)
    assert set(job["properties"]["state"]["enum"]) == STATES
    assert set(job["properties"]["error"]["properties"]["type"]["enum"]) == {
        "exception", "timeout", "worker_died", "unserializable_result", "result_too_large", "interrupted",
        "function_not_found"}  # the second part: a job whose module is gone when it runs
    validator = _schema(doc, "Job")
    validator.validate(CONTRACT_JOB)
    finished = CONTRACT_JOB | {
        "state": "failed", "attempts": 1, "started_at": "2026-11-24T12:00:01.000000Z",
        "finished_at": "2026-11-24T12:00:02.000000Z", "worker": {"pid": 42, "name": "poold: worker 1"},
        "error": {"type": "exception", "message": "boom", "exception": "ValueError", "traceback": "Tb"},
        "progress": {"current": 3, "total": None, "message": None}}
    validator.validate(finished)
    validator.validate(CONTRACT_JOB | {"state": "succeeded", "result": {"any": ["json", 1]}})
    assert not validator.is_valid(CONTRACT_JOB | {"state": "lost"})
    assert not validator.is_valid(finished | {"error": {"type": "oops", "message": "m", "exception": None,
                                                        "traceback": None}})


def test_worker_and_health_schemas(doc: dict[str, Any]) -> None:
    worker = _schema(doc, "Worker")
    sample = {"pid": 7, "name": "poold: worker 2", "state": "idle", "job": None, "rss_bytes": 1 << 20,
              "tasks_done": 3, "started_at": "2026-11-24T12:00:00.000000Z", "host": "box:8321"}
    worker.validate(sample)
    worker.validate(sample | {"state": "busy", "job": "abc"})
    assert set(doc["components"]["schemas"]["Worker"]["required"]) == set(sample)
    assert not worker.is_valid(sample | {"state": "dead"})
    health = _schema(doc, "Health")
    health.validate({"status": "ok", "workers": 4})
    health.validate({"status": "unhealthy", "reasons": ["draining"]})
    assert not health.is_valid({"status": "fine"})
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]

"""Hostile HTTP input against a live daemon: no answer >= 500, no hang, no job lost.

Generated requests (hypothesis, strategies in tests/support/fuzzing.py) and named hostile cases
go over raw sockets to a real daemon. Each answer must come within a socket timeout, be below
500 and, when it says it is JSON, be JSON as RFC 8259 has it (no NaN/Infinity), errors in the
contract's shape. Afterwards the daemon must still answer /health with 200, run a real job, hold
every job it accepted in a final state, and its log must hold no traceback but aiohttp's for
malformed HTTP (which has a test of its own). `python -m bench.fuzz` is the long run of the
same.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, running_daemon, wait_for
from tests.support.fuzzing import (
    ALLOW,
    Answer,
    Hang,
    Req,
    Tally,
    _read_answer,
    call,
    fuzz,
    log_tracebacks,
    lost_jobs,
    real_job_runs,
    send,
    serves,
    strict_json,
)

FUZZ_CFG: dict[str, dict[str, Any]] = {
    "jobs": {"allow": ALLOW, "default_timeout": 1.0, "max_timeout": 2.0},
}
TIMEOUT = 15.0  # seconds without an answer that count as a hang


class Session:
    """The module's daemon and what the tests had it accept."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.port = d.port

    def log_size(self) -> int:
        return self.d.log.stat().st_size if self.d.log.exists() else 0

    def log_since(self, offset: int) -> str:
        with open(self.d.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def raw(self, data: bytes, **kw: Any) -> Answer:
        kw.setdefault("timeout", TIMEOUT)
        try:
            return send(self.port, data, **kw)
        except Hang as e:
            raise AssertionError(f"hang: {e} after sending {data[:300]!r}") from None

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: list[tuple[str, str]] | None = None,
        framing: str = "length",
    ) -> Answer:
        return self.raw(
            Req(method, target, headers or [], body, framing).render(self.port), head_only=method == "HEAD"
        )

    def still_serving(self, accepted: list[str], log_from: int) -> None:
        """The checks after hostile input: health, a real job, no job lost, no new traceback."""
        assert self.d.running(), self.d.logtext()
        healthy = wait_for(lambda: self.d.get("/health").status == 200, 30, 0.2)
        assert healthy, self.d.get("/health")  # workers killed by timeouts may still be restarting
        runs, job = real_job_runs(self.port, self.d.token)
        assert runs, job
        lost = lost_jobs(self.port, accepted, token=self.d.token)
        assert not lost, f"{len(lost)} accepted jobs lost or never final: {lost[:5]}"
        other = log_tracebacks(self.log_since(log_from))["other"]
        assert not other, f"{len(other)} tracebacks in the daemon's log; the first:\n{other[0]}"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """One daemon for the module's tests of targets, raw HTTP and connections."""
    with running_daemon(tmp_path_factory.mktemp("fuzz"), cfg=FUZZ_CFG) as d:
        yield Session(d)


@pytest.fixture(scope="module")
def bodies_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """A daemon of its own for hostile bodies: a job accepted with a bad value in it would make
    every later listing of jobs bad too, and fail tests that have nothing to do with it."""
    with running_daemon(tmp_path_factory.mktemp("fuzz-bodies"), cfg=FUZZ_CFG) as d:
        yield Session(d)


def check_answer(ans: Answer, what: str) -> Any:
    """< 500, strict JSON when it says JSON, errors in the contract's shape; the parsed body."""
    assert ans.status is not None, f"{what}: the connection was closed without an answer"
    assert ans.status < 500, f"{what}: {ans.status} {ans.body[:500]!r}"
    if not ans.headers.get("content-type", "").startswith("application/json") or not ans.body:
        return None
    try:
        doc = strict_json(ans.body)
    except ValueError as e:
        raise AssertionError(
            f"{what}: {ans.status} answer is not valid JSON ({e}): {ans.body[:500]!r}"
        ) from None
    if ans.status >= 400:
        err = doc.get("error") if isinstance(doc, dict) else None
        assert isinstance(err, dict) and isinstance(err.get("code"), str) and err.get("message"), (
            f"{what}: {ans.status} {ans.body[:300]!r}"
        )
    return doc


def accepted_ids(ans: Answer, doc: Any) -> list[str]:
    if ans.status != 202 or not isinstance(doc, dict):
        return []
    return [j["id"] for j in doc.get("jobs", [doc])]


# -- generated requests


def test_generated_requests(daemon_factory: Any) -> None:
    """A few hundred hypothesis-generated requests, each followed by one byte-level mutation."""
    session = Session(daemon_factory(cfg=FUZZ_CFG).start())
    offset = session.log_size()
    tally = Tally()
    # derandomized: the same run each time; a mutation left incomplete costs raw_timeout seconds
    fuzz(session.port, 250, tally, seed=None, mutations=1, raw_timeout=0.5)
    problems = tally.problems()
    assert not problems, "\n".join(f"{k}: {len(v)}; e.g. {v[:3]}" for k, v in problems.items())
    assert tally.requests >= 400, tally.requests
    assert tally.statuses, tally
    session.still_serving(tally.accepted, offset)


# -- named hostile bodies

DEEP = 10_000
_E = '{"fn":"tests.support.jobs:echo",'

# (id, path, body, statuses the contract allows)
BODIES: list[tuple[str, str, bytes, set[int]]] = [
    ("args-1e400", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":[1e400]}', {202, 400, 422}),
    ("args-minus-1e400", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":[-1e400]}', {202, 400, 422}),
    ("kwargs-1e400", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","kwargs":{"x":1e400}}', {202, 400, 422}),
    (
        "batch-args-1e400",
        "/v1/jobs/batch",
        b'{"jobs":[{"fn":"tests.support.jobs:echo","args":[1e400]}]}',
        {202, 400, 422},
    ),
    ("args-2**80", "/v1/jobs", (_E + f'"args":[{2**80},{-(2**80)}]}}').encode(), {202}),
    ("args-1e-400", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":[1e-400]}', {202}),
    ("args-5000-digits", "/v1/jobs", (_E + '"args":[' + "9" * 5000 + "]}").encode(), {202, 400, 422}),
    ("priority-2**80", "/v1/jobs", (_E + f'"priority":{2**80}}}').encode(), {422}),
    ("retries-2**80", "/v1/jobs", (_E + f'"retries":{2**80}}}').encode(), {422}),
    ("timeout-1e400", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","timeout":1e400}', {422}),
    ("timeout-1e-400", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","timeout":1e-400}', {422}),
    # the smallest positive timeouts: valid, and the job times out (its deadline is past as it starts)
    ("timeout-5e-324", "/v1/jobs", b'{"fn":"service.demo:sleep","args":[0.2],"timeout":5e-324}', {202}),
    ("timeout-1e-9", "/v1/jobs", b'{"fn":"service.demo:sleep","args":[0.2],"timeout":1e-9}', {202}),
    ("timeout-NaN", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","timeout":NaN}', {400}),
    ("args-NaN", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":[NaN]}', {400}),
    ("args-Infinity", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":[Infinity]}', {400}),
    ("args-minus-Infinity", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":[-Infinity]}', {400}),
    ("priority-true", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","priority":true}', {422}),
    ("priority-1.5", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","priority":1.5}', {422}),
    ("args-object", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":{"a":1}}', {422}),
    ("kwargs-list", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","kwargs":[1]}', {422}),
    ("fn-number", "/v1/jobs", b'{"fn":1}', {422}),
    ("fn-list", "/v1/jobs", b'{"fn":["tests.support.jobs:echo"]}', {422}),
    ("key-number", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","key":1}', {422}),
    ("key-201-chars", "/v1/jobs", (_E + '"key":"' + "k" * 201 + '"}').encode(), {422}),
    ("deep-list-body", "/v1/jobs", b"[" * DEEP + b"]" * DEEP, {400, 413, 422}),
    ("deep-object-body", "/v1/jobs", b'{"a":' * DEEP + b"1" + b"}" * DEEP, {400, 413, 422}),
    ("deep-args", "/v1/jobs", (_E + '"args":' + "[" * DEEP + "]" * DEEP + "}").encode(), {400, 413, 422}),
    (
        "deep-kwargs",
        "/v1/jobs",
        (_E + '"kwargs":{"a":' + '{"a":' * DEEP + "1" + "}" * DEEP + "}}").encode(),
        {400, 413, 422},
    ),
    ("deep-batch", "/v1/jobs/batch", b'{"jobs":' + b"[" * DEEP + b"]" * DEEP + b"}", {400, 413, 422}),
    (
        "nested-900-args",
        "/v1/jobs",
        (_E + '"args":[' + "[" * 900 + "]" * 900 + "]}").encode(),
        {202, 400, 422},
    ),
    (
        "nested-990-args",
        "/v1/jobs",
        (_E + '"args":[' + "[" * 990 + "]" * 990 + "]}").encode(),
        {202, 400, 422},
    ),
    ("invalid-utf8", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":["\xff\xfe\xc0\x80"]}', {400}),
    ("invalid-utf8-in-fn", "/v1/jobs", b'{"fn":"tests.support.jobs:ech\xc3"}', {400}),
    ("utf16-body", "/v1/jobs", '{"fn":"tests.support.jobs:echo"}'.encode("utf-16"), {202, 400}),
    ("raw-surrogate-bytes", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":["\xed\xa0\x80"]}',
     {202, 400}),
    (
        "escaped-lone-surrogate-in-args",
        "/v1/jobs",
        b'{"fn":"tests.support.jobs:echo","args":["\\ud800"]}',
        {202, 400, 422},
    ),
    (
        "escaped-lone-surrogate-in-key",
        "/v1/jobs",
        b'{"fn":"tests.support.jobs:echo","key":"\\udfff"}',
        {202, 400, 422},
    ),
    (
        "escaped-lone-surrogate-in-kwargs-name",
        "/v1/jobs",
        b'{"fn":"tests.support.jobs:echo","kwargs":{"\\ud800":1}}',
        {400, 422},
    ),
    ("escaped-lone-surrogate-in-fn", "/v1/jobs", b'{"fn":"tests.support.jobs:ech\\ud800"}', {400, 422}),
    (
        "escaped-lone-surrogate-batch-key",
        "/v1/jobs/batch",
        b'{"jobs":[{"fn":"tests.support.jobs:echo","key":"\\ud800"}]}',
        {202, 400, 422},
    ),
    ("nul-in-key", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","key":"a\\u0000b"}', {202, 422}),
    ("nul-in-args", "/v1/jobs", b'{"fn":"tests.support.jobs:echo","args":["a\\u0000b"]}', {202}),
    (
        "unicode-in-args",
        "/v1/jobs",
        '{"fn":"tests.support.jobs:echo","args":["\u00e9\u4e2d\U0001f600\u202e"]}'.encode(),
        {202},
    ),
    ("string-1MiB-over-the-limit", "/v1/jobs", (_E + '"args":["' + "x" * (1 << 20) + '"]}').encode(), {413}),
    (
        "string-just-under-the-limit",
        "/v1/jobs",
        (_E + '"args":["' + "x" * ((1 << 20) - len(_E + '"args":[""]}') - 1) + '"]}').encode(),
        {202},
    ),
    ("empty-body", "/v1/jobs", b"", {400}),
    ("whitespace-body", "/v1/jobs", b"   \r\n\t ", {400}),
    ("body-null", "/v1/jobs", b"null", {422}),
    ("body-list", "/v1/jobs", b"[]", {422}),
    ("body-string", "/v1/jobs", b'"tests.support.jobs:echo"', {422}),
    ("body-number", "/v1/jobs", b"1", {422}),
    ("trailing-garbage", "/v1/jobs", b'{"fn":"tests.support.jobs:echo"} x', {400}),
    ("two-documents", "/v1/jobs", b'{"fn":"tests.support.jobs:echo"}{"fn":"tests.support.jobs:echo"}', {400}),
    ("duplicate-field", "/v1/jobs", b'{"fn":"os:system","fn":"tests.support.jobs:echo"}', {202, 400, 422}),
    ("bom", "/v1/jobs", b'\xef\xbb\xbf{"fn":"tests.support.jobs:echo"}', {202, 400}),
    ("batch-not-a-list", "/v1/jobs/batch", b'{"jobs":{"fn":"tests.support.jobs:echo"}}', {422}),
    (
        "batch-one-bad",
        "/v1/jobs/batch",
        b'{"jobs":[{"fn":"tests.support.jobs:echo"},{"fn":"tests.support.jobs:echo","priority":1e400}]}',
        {422},
    ),
    ("batch-extra-field", "/v1/jobs/batch", b'{"jobs":[],"x":1}', {422}),
    ("wait-ids-not-strings", "/v1/jobs/wait", b'{"ids":[1,null,{}],"timeout":0}', {422}),
    ("wait-timeout-1e400", "/v1/jobs/wait", b'{"ids":[],"timeout":1e400}', {422}),
    ("wait-timeout-NaN", "/v1/jobs/wait", b'{"ids":[],"timeout":NaN}', {400}),
]


@pytest.mark.parametrize(
    ("path", "body", "allowed"),
    [pytest.param(p, b, a, id=i) for i, p, b, a in BODIES],
)
def test_hostile_body(bodies_session: Session, path: str, body: bytes, allowed: set[int]) -> None:
    session = bodies_session
    offset = session.log_size()
    ans = session.request("POST", path, body, [("Content-Type", "application/json")])
    doc = check_answer(ans, f"POST {path} {body[:200]!r}")
    assert ans.status in allowed, (ans.status, ans.body[:300])
    ids = accepted_ids(ans, doc)
    for jid in ids:  # what it shows of an accepted job later must be JSON too
        check_answer(session.request("GET", f"/v1/jobs/{jid}"), f"GET /v1/jobs/{jid}")
    session.still_serving(ids, offset)


def test_tiny_timeouts_in_batches(daemon_factory: Any) -> None:
    """Jobs whose timeout (1e-9 s, valid) is past as they start, handed to workers in batches
    (after a warm-up that makes the scheduler batch): every one ends (timed out or not), none is
    stuck, nothing is logged as a traceback, and the daemon serves on."""
    session = Session(daemon_factory(cfg=FUZZ_CFG).start())
    d = session.d
    offset = session.log_size()
    r = d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:echo"}] * 200})
    assert r.status == 202, r
    for job in r.json["jobs"]:
        d.wait_done(job["id"])
    ids = []
    for _ in range(3):
        r = d.post("/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:echo", "timeout": 1e-9}] * 60})
        assert r.status == 202, r
        ids += [j["id"] for j in r.json["jobs"]]
    session.still_serving(ids, offset)


# -- content types and encodings


def _gzip_bomb() -> bytes:
    """200 MiB of JSON in about 200 KiB of gzip (made when the test runs, not at collection)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(b'{"fn":"tests.support.jobs:echo","args":["')]
    block = b"0" * (1 << 20)
    out += [z.compress(block) for _ in range(200)]
    out += [z.compress(b'"]}'), z.flush()]
    return b"".join(out)


ENCODED: list[tuple[str, list[tuple[str, str]], bytes | Callable[[], bytes]]] = [
    ("text-plain", [("Content-Type", "text/plain")], b'{"fn":"tests.support.jobs:echo"}'),
    ("form", [("Content-Type", "application/x-www-form-urlencoded")], b"fn=tests.support.jobs%3Aecho"),
    (
        "multipart",
        [("Content-Type", "multipart/form-data; boundary=xyz")],
        b'--xyz\r\nContent-Disposition: form-data; name="fn"\r\n\r\ntests.jobs:echo\r\n--xyz--\r\n',
    ),
    ("no-content-type", [], b'{"fn":"tests.support.jobs:echo"}'),
    ("charset-latin1", [("Content-Type", "application/json; charset=latin-1")],
     b'{"fn":"tests.support.jobs:echo"}'),
    ("garbage-content-type", [("Content-Type", "\x7f;;;===")], b'{"fn":"tests.support.jobs:echo"}'),
    (
        "gzip-not-gzip",
        [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
        b'{"fn":"tests.support.jobs:echo"}',
    ),
    (
        "deflate-garbage",
        [("Content-Type", "application/json"), ("Content-Encoding", "deflate")],
        b"\x00" * 64,
    ),
    ("br-garbage", [("Content-Type", "application/json"), ("Content-Encoding", "br")], b"\xff" * 64),
    (
        "unknown-encoding",
        [("Content-Type", "application/json"), ("Content-Encoding", "x-poold")],
        b'{"fn":"tests.support.jobs:echo"}',
    ),
    (
        "gzip-valid",
        [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
        gzip.compress(b'{"fn":"tests.support.jobs:echo"}'),
    ),
    ("gzip-bomb-200MiB", [("Content-Type", "application/json"), ("Content-Encoding", "gzip")], _gzip_bomb),
]


@pytest.mark.parametrize(("headers", "body"), [pytest.param(h, b, id=i) for i, h, b in ENCODED])
def test_content_types_and_encodings(
    bodies_session: Session, headers: list[tuple[str, str]], body: bytes | Callable[[], bytes]
) -> None:
    session = bodies_session
    offset = session.log_size()
    ans = session.request("POST", "/v1/jobs", body() if callable(body) else body, headers)
    doc = check_answer(ans, f"POST /v1/jobs with {headers}")
    session.still_serving(accepted_ids(ans, doc), offset)


# -- query strings, paths and methods

TARGETS: list[tuple[str, str]] = [
    ("GET", "/v1/jobs?limit=%C2%B2"),  # '²': str.isdigit() says yes, int() says no
    ("GET", "/v1/jobs?limit=%D9%A3"),  # Arabic-Indic three
    ("GET", "/v1/jobs?limit=%E2%85%A7"),  # Roman numeral eight
    ("GET", "/v1/jobs?limit=1e400"),
    ("GET", "/v1/jobs?limit=99999999999999999999999999999"),
    ("GET", "/v1/jobs?limit=-1"),
    ("GET", "/v1/jobs?limit="),
    ("GET", "/v1/jobs?limit=1&limit=2000"),
    ("GET", "/v1/jobs?state=%00"),
    ("GET", "/v1/jobs?state=queued%00"),
    ("GET", "/v1/jobs?state=%ff"),
    ("GET", "/v1/jobs?%ff=%fe"),
    ("GET", "/v1/jobs?" + "&".join(f"x{i}={i}" for i in range(2000))),
    ("GET", "/v1/jobs/00000000000000000000000000000000?wait=1e400"),
    ("GET", "/v1/jobs/00000000000000000000000000000000?wait=nan"),
    ("GET", "/v1/jobs/00000000000000000000000000000000?wait=-inf"),
    ("GET", "/v1/jobs/00000000000000000000000000000000?wait=-0"),
    ("GET", "/v1/jobs/00000000000000000000000000000000?wait=%C2%B2"),
    ("GET", "/v1/jobs/x?wait=0x10"),
    ("DELETE", "/v1/jobs/x?queued_only=%C4%B0"),  # 'İ'.lower() is two characters
    ("DELETE", "/v1/jobs/x?queued_only=%ff"),
    ("GET", "/v1/jobs/%ED%A0%80"),  # an encoded lone surrogate
    ("GET", "/v1/jobs/%ff%fe"),
    ("GET", "/v1/jobs/%00"),
    ("DELETE", "/v1/jobs/%ED%A0%80"),
    ("DELETE", "/v1/jobs/%00"),
    ("GET", "/v1/jobs/../../../../etc/passwd"),
    ("GET", "/v1/jobs/%2e%2e/%2e%2e/etc/passwd"),
    ("GET", "/v1/jobs/..%2f..%2fetc%2fpasswd"),
    ("GET", "/" + "a" * 7000),
    ("GET", "/v1/jobs/" + "a" * 7000),
    ("GET", "//v1//jobs"),
    ("GET", "/v1/jobs;x=1"),
    ("GET", "/V1/JOBS"),
    ("GET", "*"),
    ("OPTIONS", "*"),
    ("GET", "http://127.0.0.1/v1/jobs"),
    ("GET", "/health?x=%ff"),
    ("PUT", "/v1/jobs"),
    ("PATCH", "/v1/jobs/x"),
    ("HEAD", "/v1/jobs"),
    ("TRACE", "/v1/jobs"),
    ("BREW", "/v1/jobs"),
    ("CONNECT", "127.0.0.1:1"),
    ("get", "/health"),
]


@pytest.mark.parametrize(("method", "target"), [pytest.param(m, t, id=f"{m} {t[:60]}") for m, t in TARGETS])
def test_hostile_targets(session: Session, method: str, target: str) -> None:
    offset = session.log_size()
    check_answer(session.request(method, target), f"{method} {target[:200]}")
    session.still_serving([], offset)


# -- malformed HTTP and hostile headers (raw bytes)

RAW: list[tuple[str, bytes]] = [
    ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64)),  # a TLS ClientHello
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("http-0.9", b"GET /health\r\n\r\n"),
    ("http-1.0", b"GET /health HTTP/1.0\r\n\r\n"),
    ("http-9.9", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n"),
    ("lf-only", b"GET /health HTTP/1.1\nHost: x\n\n"),
    ("nul-in-request-line", b"GET /hea\x00lth HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("nul-in-header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("non-ascii-header-value", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: \xff\xfe\r\n\r\n"),
    ("non-ascii-header-name", b"GET /health HTTP/1.1\r\nHost: x\r\nX-\xe9: a\r\n\r\n"),
    ("expect-non-utf8", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\nContent-Length: 2\r\n\r\n{}"),
    ("expect-non-utf8-get-jobs", b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\n\r\n"),
    ("expect-non-utf8-get-job", b"GET /v1/jobs/x HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\n\r\n"),
    ("expect-non-utf8-delete", b"DELETE /v1/jobs/x HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\n\r\n"),
    ("expect-non-utf8-health", b"GET /health HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\n\r\n"),
    (
        "expect-non-utf8-unknown-path",
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\nContent-Length: 2\r\n\r\n{}",
    ),
    (
        "expect-non-utf8-wrong-method",
        b"PUT /v1/jobs HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\nContent-Length: 2\r\n\r\n{}",
    ),
    # found by the long run (bench.fuzz): a CONNECT's target has no path, so no route matched
    ("expect-non-utf8-connect", b"CONNECT /?a=1 HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\n\r\n"),
    ("expect-non-utf8-connect-authority", b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\nExpect: \xb7\r\n\r\n"),
    ("connect", b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("expect-100-connect", b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"),
    ("expect-unknown", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n{}"),
    ("expect-unknown-get", b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n\r\n"),
    ("authorization-non-utf8", b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"),
    (
        "content-type-non-utf8",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: \xff/\xfe\r\n"
        b'Content-Length: 24\r\n\r\n{"fn":"tests.support.jobs:echo"}',
    ),
    ("header-100KiB", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100_000 + b"\r\n\r\n"),
    (
        "header-2000-fields",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(2000)) + b"\r\n",
    ),
    ("request-line-100KiB", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("no-host", b"GET /health HTTP/1.1\r\n\r\n"),
    (
        "two-content-lengths",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ),
    ("negative-content-length", b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}"),
    (
        "huge-content-length",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n{}",
    ),
    (
        "content-length-over-limit",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000000\r\n\r\n{}",
    ),
    (
        "chunked-and-length",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
        b"\r\n2\r\n{}\r\n0\r\n\r\n",
    ),
    (
        "chunked-bad-size",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    ),
    (
        "chunked-huge-size",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
    ),
    (
        "chunked-over-the-limit",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"10000\r\n" + b"x" * 0x10000 + b"\r\n" for _ in range(20))
        + b"0\r\n\r\n",
    ),
    (
        "transfer-encoding-unknown",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x-poold\r\n\r\n{}",
    ),
    (
        "upgrade-websocket",
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ),
    (
        "upgrade-h2c",
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    ),
    ("pipelined-garbage-after-request", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02 garbage"),
    ("header-injection-crlf-in-value", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rX-B: b\r\n\r\n"),
    ("obs-fold", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n"),
    ("space-before-colon", b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n"),
]


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in RAW])
def test_malformed_http(session: Session, data: bytes) -> None:
    """Malformed or hostile HTTP: an answer below 500 (or a closed connection), never a hang."""
    offset = session.log_size()
    try:
        ans = send(session.port, data, timeout=5)
    except Hang:  # a request the server waits to see the end of: fine while it serves everyone else
        assert serves(session.port), "the daemon stopped answering"
        ans = Answer(None, {}, b"")
    if ans.status is not None:
        assert ans.status < 500, (ans.status, ans.body[:300])
        if ans.headers.get("content-type", "").startswith("application/json") and ans.body:
            check_answer(ans, repr(data[:100]))
    session.still_serving([], offset)


def test_malformed_http_is_not_logged_as_an_error_with_traceback(session: Session) -> None:
    """A client's garbage is the client's problem: the daemon should not write an ERROR record with
    a traceback for it, or any client can flood the journal (each bad request costs ~1 KiB of log)."""
    offset = session.log_size()
    for data in (
        b"GET /he\x00lth HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-\xe9: a\r\n\r\n",
    ):
        ans = session.raw(data)
        assert ans.status in (None, 400), ans
    time.sleep(0.3)
    tbs = log_tracebacks(session.log_since(offset))
    assert not tbs["other"], tbs["other"][0]
    assert not tbs["bad_http"], (
        f"{len(tbs['bad_http'])} tracebacks logged for 3 malformed requests; the first:\n{tbs['bad_http'][0]}"
    )


def test_client_gone_mid_body_is_not_logged_as_an_error_with_traceback(session: Session) -> None:
    """A client that disconnects while sending its body is routine; the daemon should not log an
    ERROR with a traceback for each (a client can flood the journal that way)."""
    offset = session.log_size()
    for _ in range(3):
        s = _open(session.port)
        s.sendall(b'POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"fn":')
        time.sleep(0.05)
        s.close()
    time.sleep(0.3)
    tbs = log_tracebacks(session.log_since(offset))
    assert not tbs["other"], tbs["other"][0]
    assert not tbs["client_gone"], (
        f"{len(tbs['client_gone'])} tracebacks logged for 3 dropped uploads;"
        f" the first:\n{tbs['client_gone'][0]}"
    )


# -- slow, stalled, half-closed and abandoned connections


def _open(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def test_slow_clients_do_not_block_others(session: Session) -> None:
    """Slowloris: 30 connections trickle a request a byte at a time; others are served meanwhile,
    and every slow request is answered once it is complete."""
    offset = session.log_size()
    body = b'{"fn":"tests.support.jobs:add","args":[20,22]}'
    req = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body
    socks = [_open(session.port) for _ in range(30)]
    stop = threading.Event()
    sent = [0] * len(socks)

    def trickle() -> None:
        for i in range(len(req)):
            if stop.is_set():
                return
            for n, s in enumerate(socks):
                with contextlib.suppress(OSError):
                    s.sendall(req[i : i + 1])
                    sent[n] = i + 1
            time.sleep(0.01)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    accepted: list[str] = []
    try:
        for _ in range(3):  # while the slow ones trickle
            assert session.d.get("/health", timeout=TIMEOUT).status == 200
            runs, job = real_job_runs(session.port)
            assert runs, job
            accepted.append(job["id"])
        t.join(60)
        assert not t.is_alive()
        for s in socks:
            ans = _read_answer(s, head_only=False)
            doc = check_answer(ans, "a slow request")
            assert ans.status == 202, ans
            accepted += accepted_ids(ans, doc)
    finally:
        stop.set()
        for s in socks:
            s.close()
    session.still_serving(accepted, offset)


@pytest.mark.parametrize("stall", ["headers", "body"])
def test_stalled_clients_do_not_block_others(session: Session, stall: str) -> None:
    """Connections that stop mid-request (and stay open) hold nothing up; closing them is fine."""
    offset = session.log_size()
    part = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Le"
        if stall == "headers"
        else b'POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"fn":'
    )
    socks = [_open(session.port) for _ in range(50)]
    try:
        for s in socks:
            s.sendall(part)
        runs, job = real_job_runs(session.port)
        assert runs, job
    finally:
        for s in socks:
            s.close()
    session.still_serving([job["id"]], offset)


def test_half_closed_mid_body_is_not_a_job(session: Session) -> None:
    """A body cut short by the client's FIN: no answer or a 4xx, no job, no hang."""
    offset = session.log_size()
    before = {j["id"] for j in session.d.jobs()}
    ans = session.raw(
        b'POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"fn":"tests.support.jobs:echo"}',
        half_close=True,
    )
    assert ans.status is None or 400 <= ans.status < 500, ans
    assert {j["id"] for j in session.d.jobs()} == before
    session.still_serving([], offset)


def test_half_closed_after_a_complete_request_is_answered(session: Session) -> None:
    """A client may send its whole request and then shut down its sending side (`nc -N`, some
    proxies). The daemon runs the job; the client must get the answer that names it, or a job
    runs that nobody was told about. Ten tries: the outcome depends on how the FIN arrives."""
    offset = session.log_size()
    unanswered = []
    created: list[str] = []
    for i in range(10):
        before = {j["id"] for j in session.d.jobs()}
        body = b'{"fn":"tests.support.jobs:add","args":[1,%d]}' % i
        ans = session.raw(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body,
            half_close=True,
        )
        time.sleep(0.2)
        new = [j["id"] for j in session.d.jobs() if j["id"] not in before]
        created += new
        if ans.status != 202 and new:
            unanswered.append((ans.status, new))
    session.still_serving(created, offset)
    assert not unanswered, (
        f"{len(unanswered)} of 10 half-closed submissions got no answer, yet created jobs: {unanswered}"
    )


def test_abandoned_long_poll_and_reset(session: Session) -> None:
    """Clients that reset their connection mid long-poll, mid body and right after sending leave
    the daemon serving, and the jobs they waited on still finish."""
    offset = session.log_size()
    job = session.d.submit("service.demo:sleep", 0.5)
    for _ in range(20):
        s = _open(session.port)
        s.sendall(f"GET /v1/jobs/{job['id']}?wait=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
    for data in (
        b'POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"fn":',
        b'POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n{"fn":"tests.support.jobs:echo"}',
    ):
        s = _open(session.port)
        s.sendall(data)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    assert session.d.wait_done(job["id"], 30)["state"] == "succeeded"
    time.sleep(0.3)
    echo = [j["id"] for j in session.d.jobs() if j["fn"] == "tests.support.jobs:echo"]
    session.still_serving([job["id"], *echo], offset)


def test_pipelined_and_unread_answers(session: Session) -> None:
    """200 pipelined requests in one write are answered in order; a client that never reads its
    (large) answers does not hold up anyone else."""
    offset = session.log_size()
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    s = _open(session.port)
    try:
        s.sendall(one * 199 + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    finally:
        s.close()
    assert data.count(b"HTTP/1.1 200 ") == 200, data[:300]
    hogs = [_open(session.port) for _ in range(10)]
    try:
        for h in hogs:
            h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            h.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 300)  # never read
        runs, job = real_job_runs(session.port)
        assert runs, job
    finally:
        for h in hogs:
            h.close()
    session.still_serving([job["id"]], offset)


def test_connection_storm(session: Session) -> None:
    """Hundreds of connections opened and dropped at once, some with a byte sent."""
    offset = session.log_size()
    socks = []
    for i in range(300):
        s = _open(session.port)
        if i % 3 == 0:
            s.sendall(b"G")
        socks.append(s)
    for s in socks:
        s.close()
    session.still_serving([], offset)


# -- schemathesis against the served OpenAPI document


def test_schemathesis_against_the_served_openapi(daemon_factory: Any, tmp_path: Path) -> None:
    """A short schemathesis run (its CLI) against /openapi.json of a daemon with a token: no 5xx,
    answers as the document describes them."""
    pytest.importorskip("schemathesis")
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        pytest.skip("the schemathesis command is not installed beside this Python")
    token = "fuzz-token-0123456789"
    d = daemon_factory(cfg={**FUZZ_CFG, "server": {"token": token}}).start()
    offset = d.log.stat().st_size
    work = tmp_path / "st"
    work.mkdir()
    proc = subprocess.run(
        [
            str(exe),
            "--no-color",
            "run",
            f"{d.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {token}",
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance",
            "--max-examples",
            "15",
            "--request-timeout",
            "70",  # above the longest long-poll it may ask for (?wait=60)
            "--seed",
            "1",
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--generation-database",
            "none",
            # GET /health takes no input, and its 503 is the contract's answer while no worker is
            # alive: a generated job with a timeout of 5e-324 s and 100 retries keeps both
            # workers being replaced, and not_a_server_error would count that 503 as a failure
            "--exclude-path",
            "/health",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "No issues found" in out or "passed" in out, out[-3000:]
    jobs = [j["id"] for j in d.jobs()]
    assert not lost_jobs(d.port, jobs, token=token)
    assert real_job_runs(d.port, token)[0]
    other = log_tracebacks(d.log.read_text(errors="replace")[offset:])["other"]
    assert not other, other[0]
    assert call(d.port, "GET", "/health")[0] == 200

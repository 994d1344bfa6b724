"""Hostile HTTP requests and the checks of their answers, shared by bench and tests.

The hypothesis strategies that generate whole requests (method, path, query string, headers,
body), `send` (raw bytes over a new socket, one answer read back), `Tally` and `judge` (what an
answer must not be), `fuzz` (a run of generated and byte-mutated requests) and the checks made
afterwards (`real_job_runs`, `lost_jobs`, `log_tracebacks`). `python -m bench.fuzz` (the long
run) and tests/e2e/test_fuzz.py (the short one) both use them.
"""

from __future__ import annotations

import collections
import http.client
import json
import random
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

# -- what to send

ALLOW = ["service.demo:*", "tests.support.jobs:echo", "tests.support.jobs:noop", "tests.support.jobs:add"]
CHEAP_FNS = ["tests.support.jobs:echo", "tests.support.jobs:noop", "tests.support.jobs:add"]
# names that must never run: module tricks, dunders, attribute chains, wildcard and path abuse,
# unicode lookalikes, white space and control characters
HOSTILE_FNS = [
    "os:system",
    "os:__builtins__",
    "builtins:eval",
    "builtins:__import__",
    "subprocess:run",
    "service.demo:__class__",
    "service.demo:fib.__globals__",
    "service.demo:os.system",
    "service.demo:time.sleep",
    "service.demo:__import__",
    "service.demo:__builtins__",
    "service.demo:primes.__code__",
    "service.demo:progress",
    "service.demo:time",
    "service.demo:annotations",
    "service.demo*:fib",
    "service.demo:*",
    "service:demo.fib",
    "service.demo.os:system",
    "service.demo.__builtins__:eval",
    "../service/demo:fib",
    "service/../demo:fib",
    "..:fib",
    "service.demo:../fib",
    "service.demo:fib/../../os",
    "/etc/passwd:x",
    "__main__:main",
    "service.dem\u043e:fib",
    "service.demo:f\u0456b",
    "service.demo:\uff46\uff49\uff42",
    "service.demo:fib ",
    " service.demo:fib",
    "service.demo:fib\n",
    "service.demo:fib\r\n",
    "service.demo:fib\t",
    "service.demo:fib\x00",
    "service.demo:fib\u200b",
    "service.demo :fib",
    "service.demo:",
    ":fib",
    "service.demo",
    "service.demo:fib:fib",
    "service.demo::fib",
    "",
    "tests.support.jobs:_bump",
    "tests.support.jobs:os",
    "tests.support.jobs:subprocess",
    "tests.support.jobs:CustomError",
    "tests.support.jobs:forever",
    "tests.support.jobs:suicide",
    "x" * 600,
]
RAW_NUMBERS = [
    "1e400",
    "-1e400",
    "1e-400",
    "2e308",
    "1.7976931348623157e309",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "-0.0",
    "1E+2",
    str(2**80),
    str(-(2**80)),
    str(2**63),
    str(2**64),
    "9" * 4400,
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
    "1_0",
    "--1",
    "1e",
    "nan",
    "inf",
    "true1",
    "nul",
]
METHODS = [
    "GET",
    "POST",
    "DELETE",
    "PUT",
    "PATCH",
    "HEAD",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "get",
    "BREW",
    "G\x00T",
    "\u00c9T",
]
PATHS = [
    "/v1/jobs",
    "/v1/jobs/batch",
    "/v1/jobs/wait",
    "/v1/jobs/{id}",
    "/v1/workers",
    "/v1/hosts",
    "/health",
    "/metrics",
    "/openapi.json",
    "/",
    "/v1",
    "/v1/jobs/",
    "/v1/jobs//",
    "/v1/jobs/{id}/x",
    "/v1/jobs/../health",
    "/v1/jobs/%2e%2e/%2e%2e/etc/passwd",
    "//v1//jobs",
    "/v1/jobs/%00",
    "/V1/JOBS",
    "/v1/jobs;x",
    "*",
    "http://127.0.0.1/v1/jobs",
    "/v1/jobs/{id}?wait={n}",
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "",
    "application/json, text/plain",
    "*/*",
    "\u00e9/\u00e9",
]


class Raw(str):
    """JSON text emitted as it is (numbers and literals json.dumps never writes)."""


def dumps(v: Any, ascii_only: bool = True) -> str:
    """JSON text of v, with Raw leaves spliced in verbatim."""
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return (
            "{" + ",".join(f"{dumps(str(k), ascii_only)}:{dumps(x, ascii_only)}" for k, x in v.items()) + "}"
        )
    if isinstance(v, list):
        return "[" + ",".join(dumps(x, ascii_only) for x in v) + "]"
    return json.dumps(v, ensure_ascii=ascii_only)


def encode(text: str) -> bytes:
    """UTF-8, lone surrogates included (which makes it invalid UTF-8)."""
    return text.encode("utf-8", "surrogatepass")


any_text = st.text(st.characters(exclude_categories=()), max_size=40)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**100), 2**100)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
    | st.sampled_from(RAW_NUMBERS).map(Raw)
)
json_values = st.recursive(
    leaves, lambda c: st.lists(c, max_size=5) | st.dictionaries(any_text, c, max_size=5), max_leaves=25
)


def _deep(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    if kind == "dict":
        return Raw('{"a":' * depth + "1" + "}" * depth)
    return Raw('[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2))


deep = st.builds(
    _deep,
    st.sampled_from([10, 100, 900, 1000, 2000, 10_000, 100_000]),
    st.sampled_from(["list", "dict", "mixed"]),
)
# mostly short; now and then about server.max_body_bytes (1 MiB), under and over it
big_text = st.sampled_from([0, 1, 100, 1000, 65_536, 1000, 100, 1_000_000, 1_048_500, 1_100_000]).map(
    lambda n: "x" * n
)


def field_value(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return valid | json_values | st.sampled_from(RAW_NUMBERS).map(Raw) | deep


fns = (
    st.sampled_from(CHEAP_FNS)
    | st.sampled_from(HOSTILE_FNS)
    | any_text
    | st.from_regex(r"[a-z_.]{1,20}:[a-z_.]{1,20}", fullmatch=True)
)

job_spec = st.fixed_dictionaries(
    {},
    optional={
        "fn": st.sampled_from(CHEAP_FNS) | field_value(fns),
        "args": field_value(st.lists(leaves, max_size=4)) | st.builds(lambda t: [t], big_text),
        "kwargs": field_value(
            st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), leaves, max_size=3)
        ),
        "timeout": field_value(st.floats(0.01, 2.0) | st.none()),
        "priority": field_value(st.integers(-1000, 1000)),
        "retries": field_value(st.integers(0, 2)),
        "key": field_value(
            st.text(st.characters(exclude_categories=()), min_size=1, max_size=200)
            | st.text(min_size=199, max_size=202)
            | st.none()
        ),
    },
) | st.dictionaries(any_text, json_values, max_size=4)
hostile_values = json_values | st.sampled_from(RAW_NUMBERS).map(Raw) | deep | big_text


@st.composite
def near_valid_spec(draw: Any) -> dict[str, Any]:
    """A spec that would run (a cheap function, fields in range), often with one field made hostile."""
    spec: dict[str, Any] = {"fn": draw(st.sampled_from(CHEAP_FNS))}
    optional = {
        "args": st.lists(leaves, max_size=4) | st.builds(lambda t: [t], big_text),
        "kwargs": st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), leaves, max_size=3),
        "timeout": st.floats(0.01, 2.0) | st.none(),
        "priority": st.integers(-1000, 1000),
        "retries": st.integers(0, 2),
        "key": st.text(st.characters(exclude_categories=()), min_size=1, max_size=200) | st.none(),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            spec[name] = draw(values)
    if draw(st.booleans()):
        name = draw(st.sampled_from(["fn", *optional, "unknown", "__proto__", "fn "]))
        spec[name] = draw(st.sampled_from(HOSTILE_FNS) | fns) if name == "fn" else draw(hostile_values)
    return spec


wait_body = st.fixed_dictionaries(
    {},
    optional={
        "ids": field_value(st.lists(any_text, max_size=5)),
        "timeout": field_value(st.floats(0, 0.5)),
        "all": field_value(st.booleans()),
    },
)
json_bodies = (
    job_spec
    | near_valid_spec()
    | wait_body
    | st.builds(lambda jobs: {"jobs": jobs}, st.lists(job_spec | near_valid_spec(), max_size=6))
    | st.dictionaries(st.sampled_from(["jobs", "x"]), json_values, max_size=2)
    | json_values
    | deep
)


@st.composite
def bodies(draw: Any) -> bytes | None:
    kind = draw(st.sampled_from(["json"] * 6 + ["mutated", "binary", "empty", "none", "text"]))
    if kind == "none":
        return None
    if kind == "empty":
        return b""
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return encode(draw(any_text))
    data = encode(dumps(draw(json_bodies), draw(st.booleans())))
    if kind == "mutated" and data:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 5))):
            i = draw(st.integers(0, len(buf) - 1))
            op = draw(st.sampled_from(["flip", "cut", "insert"]))
            if op == "flip":
                buf[i] = draw(st.integers(0, 255))
            elif op == "cut":
                del buf[i : i + draw(st.integers(1, 20))]
            else:
                buf[i:i] = draw(
                    st.sampled_from(
                        [
                            b"\xff",
                            b"\xc0\x80",
                            b"\xed\xa0\x80",
                            b"\x00",
                            b'"',
                            b"\\",
                            b"[",
                            b"{",
                            b"1e400",
                            b"NaN",
                            b"\\ud800",
                        ]
                    )
                )
            if not buf:
                break
        data = bytes(buf)
    return data


query_values = (
    st.sampled_from(
        [
            "0",
            "1",
            "0.5",
            "60",
            "61",
            "-1",
            "1e400",
            "nan",
            "inf",
            "-inf",
            "",
            "1000",
            "1001",
            "0x10",
            "\u00b2",
            "\u0663",
            "\u2167",
            "1_0",
            " 1",
            "true",
            "false",
            "TRUE",
            "yes",
            "queued",
            "running",
            "succeeded",
            "\x00",
            "%",
            "%zz",
            "%ff",
        ]
    )
    | any_text
    | st.integers().map(str)
)
query = st.lists(
    st.tuples(
        st.sampled_from(["wait", "limit", "state", "queued_only", "x", "wait", ""]) | any_text, query_values
    ),
    max_size=4,
)


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="", errors="surrogatepass")


@st.composite
def targets(draw: Any) -> str:
    path = draw(st.sampled_from(PATHS))
    jid = draw(
        st.sampled_from(
            [
                "0" * 32,
                "not-a-job",
                "..",
                "%2e%2e",
                "a" * 5000,
                "%ff%fe",
                "\u00e9",
                "%ED%A0%80",
                "%00",
                "'; DROP TABLE jobs; --",
            ]
        )
        | any_text
    )
    if draw(st.booleans()):
        jid = _quote(jid)
    path = path.replace("{id}", jid).replace("{n}", draw(st.sampled_from(["0", "0.1", "x", "1e400"])))
    q = draw(query)
    if q:
        pairs = [(k, v) if draw(st.booleans()) else (_quote(k), _quote(v)) for k, v in q]
        path += ("&" if "?" in path else "?") + "&".join(f"{k}={v}" for k, v in pairs)
    return path


header_names = st.sampled_from(
    [
        "Content-Type",
        "Content-Encoding",
        "Accept",
        "Accept-Encoding",
        "Authorization",
        "Expect",
        "Connection",
        "Upgrade",
        "Cookie",
        "Range",
        "X-Forwarded-For",
        "Origin",
        "If-None-Match",
        "Accept-Charset",
    ]
) | st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,30}", fullmatch=True)
header_values = st.sampled_from(
    [
        *CONTENT_TYPES,
        "gzip",
        "deflate",
        "br",
        "zstd",
        "identity, gzip",
        "100-continue",
        "Upgrade",
        "websocket",
        "h2c",
        "close",
        "keep-alive",
        "Bearer",
        "Bearer x",
        "Basic Zm9vOmJhcg==",
        "bytes=0-1",
        "\u00e9\u00e9",
        "x" * 9000,
    ]
) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@dataclass
class Req:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes | None
    framing: str = "length"  # length | chunked | none | wrong | twice
    raw: bytes | None = None  # sent as it is instead (a byte-level mutation of a rendered request)

    def render(self, port: int) -> bytes:
        if self.raw is not None:
            return self.raw
        head = [f"{self.method} {self.target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        head += [f"{k}: {v}" for k, v in self.headers]
        body = self.body or b""
        if self.body is not None:
            if self.framing == "chunked":
                head.append("Transfer-Encoding: chunked")
                body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
            elif self.framing == "wrong":
                head.append(f"Content-Length: {len(body) + 5}")
            elif self.framing == "twice":
                head += [f"Content-Length: {len(body)}", f"Content-Length: {len(body) + 1}"]
            elif self.framing == "length":
                head.append(f"Content-Length: {len(body)}")
        if not any(k.lower() == "connection" for k, _ in self.headers):
            head.append("Connection: close")
        return encode("\r\n".join(head) + "\r\n\r\n") + body

    def __repr__(self) -> str:
        if self.raw is not None:
            return f"Raw({self.raw[:600]!r})"
        body = self.body if self.body is None or len(self.body) < 300 else self.body[:300] + b"..."
        return f"Req({self.method!r}, {self.target[:300]!r}, {self.headers!r}, {body!r}, {self.framing!r})"


@st.composite
def requests(draw: Any) -> Req:
    kind = draw(st.sampled_from(["submit"] * 4 + ["batch", "any", "any", "any", "any"]))
    if kind == "any":
        target, body = draw(targets()), draw(bodies())
        method = draw(st.sampled_from(METHODS))
    else:
        target = "/v1/jobs" if kind == "submit" else "/v1/jobs/batch"
        if draw(st.integers(0, 4)) == 0:
            target = draw(targets().filter(lambda t: t.startswith("/v1/jobs")))
        spec = (
            draw(near_valid_spec())
            if kind == "submit"
            else {"jobs": draw(st.lists(near_valid_spec(), min_size=1, max_size=5))}
        )
        body = encode(dumps(spec, draw(st.booleans())))
        method = draw(st.sampled_from(["POST"] * 12 + METHODS))
    headers: list[tuple[str, str]] = []
    if body is not None and draw(st.integers(0, 3)):
        headers.append(("Content-Type", draw(st.sampled_from(CONTENT_TYPES))))
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    framing = draw(st.sampled_from(["length"] * 12 + ["chunked", "none", "wrong", "twice"]))
    if framing == "wrong":  # a body shorter than announced: close our side so the server sees the end
        headers = [(k, v) for k, v in headers if k.lower() != "connection"] + [("Connection", "close")]
    return Req(method, target, headers, body, framing)


# -- sending and judging


class Hang(Exception):
    pass


@dataclass
class Answer:
    status: int | None  # None: the server closed without answering
    headers: dict[str, str]
    body: bytes


def _read_answer(s: socket.socket, head_only: bool) -> Answer:
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                if not buf:
                    return Answer(None, {}, b"")
                raise ConnectionError(f"the answer ends inside its header: {buf[:200]!r}")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200 and status != 101:
            continue  # an interim answer (100 Continue)
        break
    if head_only or status in (101, 204, 304):
        return Answer(status, headers, b"")
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return Answer(status, headers, buf[:n])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = b""
        while True:
            while b"\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return Answer(status, headers, out)
                buf += chunk
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                chunk = s.recv(65536)
                if not chunk:
                    return Answer(status, headers, out + buf)
                buf += chunk
            if size == 0:
                return Answer(status, headers, out)
            out += buf[:size]
            buf = buf[size + 2 :]
    while chunk := s.recv(65536):
        buf += chunk
    return Answer(status, headers, buf)


def send(
    port: int, data: bytes, head_only: bool = False, timeout: float = 15.0, half_close: bool = False
) -> Answer:
    """Sends raw bytes on a new connection and reads one answer; Hang when none comes in time."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before reading all we sent: read that answer
        try:
            return _read_answer(s, head_only)
        except TimeoutError:
            raise Hang(f"no answer within {timeout} s") from None
        except ConnectionResetError:
            return Answer(None, {}, b"")
    finally:
        s.close()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(body: bytes) -> Any:
    """The body parsed as JSON as the RFC has it (no NaN, Infinity)."""
    return json.loads(body, parse_constant=_no_constant)


@dataclass
class Tally:
    """What the fuzzing saw; `problems()` lists what must not happen."""

    requests: int = 0
    incomplete: int = 0  # mutated requests left incomplete: the server waits for the rest (and serves others)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    no_answer: list[str] = field(default_factory=list)  # closed without answering a well-formed request
    invalid_json: list[str] = field(default_factory=list)
    bad_error_shape: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    accepted_fns: collections.Counter[str] = field(default_factory=collections.Counter)

    def problems(self) -> dict[str, list[str]]:
        return {
            k: v
            for k, v in (
                ("responses >= 500", self.server_errors),
                ("hangs", self.hangs),
                ("invalid JSON answers", self.invalid_json),
                ("error answers not in the contract's shape", self.bad_error_shape),
                (
                    "hostile fn accepted",
                    [
                        f
                        for f in self.accepted_fns
                        if f not in CHEAP_FNS and not f.startswith("service.demo:")
                    ],
                ),
            )
            if v
        }

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.incomplete += other.incomplete
        self.statuses.update(other.statuses)
        self.accepted_fns.update(other.accepted_fns)
        for name in ("server_errors", "hangs", "no_answer", "invalid_json", "bad_error_shape", "accepted"):
            getattr(self, name).extend(getattr(other, name))


_SAMPLES = 20  # problem samples kept per kind


def judge(tally: Tally, req: Req, ans: Answer | None, hang: str | None = None) -> None:
    """Checks one answer to a generated request and notes what it saw."""
    tally.requests += 1
    what = repr(req)
    if hang is not None:
        tally.hangs.append(f"{what}: {hang}")
        return
    assert ans is not None
    if ans.status is None:
        if len(tally.no_answer) < _SAMPLES:
            tally.no_answer.append(what)
        return
    tally.statuses[ans.status] += 1
    if ans.status >= 500:
        if len(tally.server_errors) < _SAMPLES:
            tally.server_errors.append(f"{what} -> {ans.status} {ans.body[:300]!r}")
        else:
            tally.server_errors.append("(more)")
        return
    ctype = ans.headers.get("content-type", "")
    if ctype.startswith("application/json") and ans.body:
        try:
            doc = strict_json(ans.body)
        except ValueError as e:
            if len(tally.invalid_json) < _SAMPLES:
                tally.invalid_json.append(f"{what} -> {ans.status}: {e}: {ans.body[:300]!r}")
            else:
                tally.invalid_json.append("(more)")
            doc = _lenient(ans.body)
        if ans.status >= 400 and not (
            isinstance(doc, dict)
            and isinstance(doc.get("error"), dict)
            and isinstance(doc["error"].get("code"), str)
            and isinstance(doc["error"].get("message"), str)
        ):
            tally.bad_error_shape.append(f"{what} -> {ans.status} {ans.body[:300]!r}")
        if ans.status == 202 and isinstance(doc, dict):
            for job in doc.get("jobs", [doc]):
                if isinstance(job, dict) and isinstance(job.get("id"), str):
                    tally.accepted.append(job["id"])
                    tally.accepted_fns[str(job.get("fn"))] += 1


def _lenient(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def serves(port: int) -> bool:
    """Does the daemon answer a plain request on a new connection?"""
    try:
        return (
            send(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=10).status
            is not None
        )
    except (OSError, Hang):
        return False


def fire(port: int, req: Req, tally: Tally, timeout: float = 15.0, raw_timeout: float = 1.5) -> None:
    """Sends one request and judges the answer. A byte-level mutation may leave a request the
    server rightly waits to see the end of: that is a hang only when the server stops answering
    other connections too."""
    data = req.render(port)
    try:
        ans = send(
            port,
            data,
            head_only=data.startswith(b"HEAD "),
            timeout=raw_timeout if req.raw else timeout,
            half_close=req.framing == "wrong",
        )
    except Hang as e:
        if req.raw is not None and serves(port):
            tally.requests += 1
            tally.incomplete += 1
            return
        judge(tally, req, None, str(e))
        return
    except ConnectionError as e:
        tally.requests += 1
        tally.no_answer.append(f"{req!r}: {e}")
        return
    judge(tally, req, ans)


_SPLICE = [
    b"\r\n",
    b"\r\n\r\n",
    b"\x00",
    b"\xff",
    b" ",
    b":",
    b"%",
    b"?",
    b"/../",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: -1\r\n",
    b"\n",
    b"HTTP/1.1",
    b"Expect: 100-continue\r\n",
    b"Content-Encoding: gzip\r\n",
]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A byte-level mutation of a rendered request (the HTTP parser's share of the fuzzing)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        i = rng.randrange(len(out))
        op = rng.random()
        if op < 0.3:
            out[i] = rng.randrange(256)
        elif op < 0.5:
            del out[i : i + rng.randint(1, 16)]
        elif op < 0.8:
            out[i:i] = rng.choice(_SPLICE)
        else:
            out[i:i] = out[rng.randrange(len(out)) :][: rng.randint(1, 64)]
    return bytes(out)


def fuzz(
    port: int,
    examples: int,
    tally: Tally,
    seed: int | None = None,
    mutations: int = 0,
    raw_timeout: float = 1.5,
) -> None:
    """Sends `examples` generated requests, each followed by `mutations` byte-level mutations of
    it (no shrinking: problems are noted, not raised)."""
    rng = random.Random(0 if seed is None else seed)  # derandomized runs mutate the same way too

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=seed is None,
    )
    @given(req=requests())
    def one(req: Req) -> None:
        fire(port, req, tally)
        data = req.render(port)
        for _ in range(mutations):
            fire(port, Req("?", req.target, [], None, raw=mutate(data, rng)), tally, raw_timeout=raw_timeout)

    if seed is not None:
        from hypothesis import seed as with_seed

        one = with_seed(seed)(one)
    one()


# -- after the fuzzing: is every accepted job there, and does the daemon still work?


def call(
    port: int, method: str, path: str, body: Any = None, timeout: float = 30, token: str | None = None
) -> tuple[int, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        c.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        r = c.getresponse()
        return r.status, _lenient(r.read())
    finally:
        c.close()


def real_job_runs(port: int, token: str | None = None) -> tuple[bool, Any]:
    """Does a real job (tests.support.jobs:add 2 3) run and give 5?"""
    status, job = call(port, "POST", "/v1/jobs", {"fn": "tests.support.jobs:add", "args": [2, 3]},
                       token=token)
    if status != 202:
        return False, (status, job)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        status, job = call(port, "GET", f"/v1/jobs/{job['id']}?wait=5", token=token)
        if status == 200 and job["state"] in ("succeeded", "failed", "timed_out", "cancelled"):
            return job["state"] == "succeeded" and job["result"] == 5, job
    return False, job


def lost_jobs(port: int, ids: list[str], settle: float = 30.0, token: str | None = None) -> list[str]:
    """Accepted jobs that are missing, or not final after `settle` seconds (those are then
    cancelled, to leave nothing behind, but still reported)."""
    end = time.monotonic() + settle
    pending = list(dict.fromkeys(ids))
    while pending and time.monotonic() < end:
        status, body = call(port, "POST", "/v1/jobs/wait", {"ids": pending[:1000], "timeout": 1}, token=token)
        done = {j["id"] for j in body["jobs"]} if status == 200 else set()
        pending = [i for i in pending if i not in done]
    lost = []
    for jid in pending:
        status, job = call(port, "GET", f"/v1/jobs/{jid}", token=token)
        state = job.get("state") if isinstance(job, dict) else None
        lost.append(f"{jid}: {status}, {state or job} after {settle:g} s")
        call(port, "DELETE", f"/v1/jobs/{jid}", token=token)
    return lost


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d", re.M)


def log_tracebacks(text: str) -> dict[str, list[str]]:
    """The tracebacks in a daemon log by kind: "bad_http" (aiohttp's for a malformed HTTP message),
    "client_gone" (a client that went away while its body was read), "other" (anything else)."""
    out: dict[str, list[str]] = {"bad_http": [], "client_gone": [], "other": []}
    for m in re.finditer(r"Traceback \(most recent call last\)", text):
        nxt = _RECORD.search(text, m.end())
        block = text[max(0, text.rfind("\n", 0, m.start() - 1)) : nxt.start() if nxt else len(text)]
        kind = (
            "bad_http"
            if "aiohttp.http_exceptions." in block
            else "client_gone"
            if "ConnectionResetError" in block and "readany" in block
            else "other"
        )
        out[kind].append(block.strip()[:3000])
    return out

"""Security from the HTTP API: nothing outside jobs.allow runs, tokens are checked, risky setups
are warned about.

Every function name below is refused (403 function_not_allowed, or 422 for a name that is not
`module:name` at all or cannot be found) and never runs: a canary job argument would create a
file if it did.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, expect_error
from tests.support.fuzzing import send

# fn -> the contract's answer: 403 when the name is well formed but not admitted by the allow
# list ["service.demo:*", "tests.support.jobs:*", "tests.support.jobs:add"], 422 invalid_request when it
# is not a `module:name` at all
REFUSED: list[tuple[str, int, str]] = [
    ("os:system", 403, "function_not_allowed"),
    ("os:__builtins__", 403, "function_not_allowed"),
    ("builtins:eval", 403, "function_not_allowed"),
    ("builtins:exec", 403, "function_not_allowed"),
    ("builtins:__import__", 403, "function_not_allowed"),
    ("subprocess:run", 403, "function_not_allowed"),
    ("importlib:import_module", 403, "function_not_allowed"),
    ("service.demo:__class__", 403, "function_not_allowed"),
    ("service.demo:__import__", 403, "function_not_allowed"),
    ("service.demo:__builtins__", 403, "function_not_allowed"),
    ("service.demo:__loader__", 403, "function_not_allowed"),
    ("service.demo:__spec__", 403, "function_not_allowed"),
    ("service.demo:_private", 403, "function_not_allowed"),
    ("service.demo:fib.__globals__", 403, "function_not_allowed"),
    ("service.demo:fib.__code__", 403, "function_not_allowed"),
    ("service.demo:fib.__call__", 403, "function_not_allowed"),
    ("service.demo:os.system", 403, "function_not_allowed"),
    ("service.demo:time.sleep", 403, "function_not_allowed"),
    ("service.demo:time", 403, "function_not_allowed"),  # a module it imported
    ("service.demo:progress", 403, "function_not_allowed"),  # a function it imported
    ("service.demo:annotations", 403, "function_not_allowed"),  # `from __future__ import annotations`
    ("service:demo.fib", 403, "function_not_allowed"),
    ("service:demo", 403, "function_not_allowed"),
    ("service.demo.os:system", 403, "function_not_allowed"),
    ("service.demo.__builtins__:eval", 403, "function_not_allowed"),
    ("service:progress", 403, "function_not_allowed"),
    ("tests.support.jobs:os", 403, "function_not_allowed"),
    ("tests.support.jobs:subprocess", 403, "function_not_allowed"),
    ("tests.support.jobs:subprocess.run", 403, "function_not_allowed"),
    ("tests.support.jobs:progress", 403, "function_not_allowed"),
    ("tests.support.jobs:_bump", 403, "function_not_allowed"),
    ("tests.support.jobs:CustomError", 403, "function_not_allowed"),  # a class, not a function
    ("tests.support.jobs:_HOLD", 403, "function_not_allowed"),
    ("tests.support.jobs:add.__globals__", 403, "function_not_allowed"),
    ("tests:jobs", 403, "function_not_allowed"),
    ("service.demo*:fib", 422, "invalid_request"),
    ("service.demo:*", 422, "invalid_request"),
    ("*:*", 422, "invalid_request"),
    ("service.*:fib", 422, "invalid_request"),
    ("../service/demo:fib", 422, "invalid_request"),
    ("service/demo:fib", 422, "invalid_request"),
    ("service.demo:../fib", 422, "invalid_request"),
    ("..:fib", 422, "invalid_request"),
    (".service.demo:fib", 422, "invalid_request"),
    ("service..demo:fib", 422, "invalid_request"),
    ("service.demo:fib()", 422, "invalid_request"),
    ("service.demo:fib;os.system", 422, "invalid_request"),
    ("service.demo:fib[0]", 422, "invalid_request"),
    ("__import__('os').system", 422, "invalid_request"),
    ("service.dem\u043e:fib", 422, "invalid_request"),  # Cyrillic o
    ("service.demo:f\u0456b", 422, "invalid_request"),  # Ukrainian i
    ("service.demo:\uff46\uff49\uff42", 422, "invalid_request"),  # fullwidth
    ("service.demo:\u0066\u0069\u0062\u0301", 422, "invalid_request"),  # a combining accent
    ("service.demo:fib\u200b", 422, "invalid_request"),  # zero-width space
    ("service.demo:fib ", 422, "invalid_request"),
    (" service.demo:fib", 422, "invalid_request"),
    ("service.demo :fib", 422, "invalid_request"),
    ("service.demo: fib", 422, "invalid_request"),
    ("service.demo:fib\t", 422, "invalid_request"),
    ("service.demo:fib\n", 422, "invalid_request"),
    ("service.demo:fib\r\n", 422, "invalid_request"),
    ("\nservice.demo:fib", 422, "invalid_request"),
    ("service.demo:fib\x00", 422, "invalid_request"),
    ("service.demo:fib\x00os:system", 422, "invalid_request"),
    ("service.demo:", 422, "invalid_request"),
    (":fib", 422, "invalid_request"),
    ("service.demo", 422, "invalid_request"),
    ("service.demo:fib:fib", 422, "invalid_request"),
    ("service.demo::fib", 422, "invalid_request"),
    ("", 422, "invalid_request"),
]

ALLOW = ["service.demo:*", "tests.support.jobs:*", "tests.support.jobs:add"]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.daemon import running_daemon

    with running_daemon(tmp_path_factory.mktemp("security"), cfg={"jobs": {"allow": ALLOW}}) as d:
        yield d


@pytest.mark.parametrize(("fn", "status", "code"), [pytest.param(f, s, c, id=repr(f)) for f, s, c in REFUSED])
def test_nothing_outside_the_allow_list_runs(
    guarded: Daemon, tmp_path: Path, fn: str, status: int, code: str
) -> None:
    canary = tmp_path / "canary"
    cmd = f"touch {canary}"
    for path, body in (
        ("/v1/jobs", {"fn": fn, "args": [cmd]}),
        ("/v1/jobs/batch",
         {"jobs": [{"fn": "tests.support.jobs:add", "args": [1, 2]}, {"fn": fn, "args": [cmd]}]}),
    ):
        r = guarded.post(path, body)
        err = expect_error(r, status, code)
        assert "fn" in err["message"], err
        if path.endswith("batch"):
            assert "jobs[1]" in err["message"], err  # the index of the bad spec
    time.sleep(0.2)
    assert not canary.exists()
    assert not [j for j in guarded.jobs() if j["fn"] == fn]


def test_allowed_functions_still_run(guarded: Daemon) -> None:
    """The control: what the allow list admits does run."""
    for fn, args, result in (("service.demo:fib", [10], 55), ("tests.support.jobs:add", [2, 3], 5)):
        job = guarded.run(fn, *args)
        assert job["state"] == "succeeded" and job["result"] == result, job


def test_no_function_from_kwargs_or_module_tricks(guarded: Daemon, tmp_path: Path) -> None:
    """Keyword names and argument values are data: no way through them to a callable."""
    canary = tmp_path / "canary"
    for kwargs in ({"__class__": 1}, {"__import__": "os"}, {"self": 1}):
        r = guarded.post("/v1/jobs", {"fn": "tests.support.jobs:echo", "kwargs": kwargs})
        assert r.status in (202, 422), r
        if r.status == 202:
            job = guarded.wait_done(r.json["id"])
            assert job["state"] in ("succeeded", "failed"), job
    r = guarded.post(
        "/v1/jobs",
        {"fn": "tests.support.jobs:echo", "args": [{"__reduce__": f"os.system('touch {canary}')"}]},
    )
    assert r.status == 202, r
    guarded.wait_done(r.json["id"])
    assert not canary.exists()


# -- tokens

TOKEN = "s3cret-t0ken-0123456789abcdef"


@pytest.fixture(scope="module")
def tokened(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.support.daemon import running_daemon

    with running_daemon(tmp_path_factory.mktemp("token"), cfg={"server": {"token": TOKEN}}) as d:
        yield d


def _flip_last(s: str) -> str:
    return s[:-1] + ("x" if s[-1] != "x" else "y")


BAD_AUTH = [
    ("none", None),
    ("wrong-same-length", f"Bearer {_flip_last(TOKEN)}"),
    ("wrong-first-char", f"Bearer X{TOKEN[1:]}"),
    ("shorter", f"Bearer {TOKEN[:-1]}"),
    ("prefix", f"Bearer {TOKEN[:8]}"),
    ("longer", f"Bearer {TOKEN}x"),
    ("much-longer", f"Bearer {TOKEN * 100}"),
    ("empty-bearer", "Bearer "),
    ("bearer-only", "Bearer"),
    ("no-scheme", TOKEN),
    ("basic", "Basic czNjcmV0OnQwa2Vu"),
    ("two-tokens", f"Bearer {TOKEN}, Bearer {TOKEN}"),
    ("token-twice", f"Bearer {TOKEN}{TOKEN}"),
    ("nul-inside", f"Bearer {TOKEN[:5]}\x00{TOKEN[6:]}"),
    ("unicode", f"Bearer {TOKEN[:-1]}\u00e9"),
]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs",
        "/v1/workers",
        "/metrics",
        "/openapi.json",
        "/v1/jobs/00000000000000000000000000000000",
        "/nowhere",
    ],
)
@pytest.mark.parametrize("auth", [pytest.param(a, id=i) for i, a in BAD_AUTH])
def test_wrong_tokens_get_401(tokened: Daemon, path: str, auth: str | None) -> None:
    head = [f"GET {path} HTTP/1.1", "Host: x", "Connection: close"]
    if auth is not None:
        head.append(f"Authorization: {auth}")
    ans = send(tokened.port, ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogatepass"), timeout=15)
    if ans.status == 400 and "\x00" in (auth or ""):
        return  # refused by the HTTP parser before any handler: also fine
    assert ans.status == 401, (ans.status, ans.body[:300])
    assert b'"unauthorized"' in ans.body, ans.body[:300]


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/v1/jobs", {"fn": "tests.support.jobs:add", "args": [1, 2]}),
        ("POST", "/v1/jobs/batch", {"jobs": [{"fn": "tests.support.jobs:add", "args": [1, 2]}]}),
        ("DELETE", "/v1/jobs/00000000000000000000000000000000", None),
    ],
    ids=["submit", "batch", "cancel"],
)
@pytest.mark.parametrize(
    "token", [_flip_last(TOKEN), TOKEN[:-1], None], ids=["same-length", "shorter", "none"]
)
def test_wrong_tokens_cannot_submit_or_cancel(
    tokened: Daemon, method: str, path: str, body: Any, token: str | None
) -> None:
    before = len(tokened.jobs())
    r = tokened.request(method, path, body, token=token)
    expect_error(r, 401, "unauthorized")
    assert "Bearer" in r.headers.get("WWW-Authenticate", ""), r.headers
    assert len(tokened.jobs()) == before


def test_non_utf8_authorization_is_401_not_500(tokened: Daemon) -> None:
    ans = send(
        tokened.port,
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer \xff\xfe" + TOKEN[2:].encode() + b"\r\n\r\n",
        timeout=15,
    )
    assert ans.status in (400, 401), (ans.status, ans.body[:300])


def test_right_token_and_open_health(tokened: Daemon) -> None:
    assert tokened.get("/health", token=None).status == 200
    assert tokened.get("/health", token=_flip_last(TOKEN)).status == 200
    job = tokened.run("tests.support.jobs:add", 2, 3)
    assert job["result"] == 5
    for path in ("/v1/workers", "/metrics", "/openapi.json", "/v1/jobs"):
        assert tokened.get(path).status == 200, path


# -- setups worth a warning


def _warnings(d: Daemon) -> list[str]:
    return [line for line in d.logtext(20000).splitlines() if "WARNING" in line]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o666], ids=oct)
def test_token_file_readable_by_others_is_warned_about(
    daemon_factory: Any, tmp_path: Path, mode: int
) -> None:
    """A token file that others may read gives the token away: the daemon should say so."""
    tf = tmp_path / f"token-{mode:o}"
    tf.write_text(TOKEN + "\n")
    os.chmod(tf, mode)
    d = daemon_factory(cfg={"server": {"token_file": str(tf)}}, token=TOKEN).start()
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2  # the token from the file is in force
    warned = [w for w in _warnings(d) if "token" in w.lower()]
    assert warned, (
        f"no warning about {tf} (mode {mode:o}: readable by group or others); warnings logged: {_warnings(d)}"
    )


def test_private_token_file_is_not_warned_about(daemon_factory: Any, tmp_path: Path) -> None:
    tf = tmp_path / "token"
    tf.write_text(TOKEN)
    os.chmod(tf, 0o600)
    d = daemon_factory(cfg={"server": {"token_file": str(tf)}}, token=TOKEN).start()
    assert d.run("tests.support.jobs:add", 1, 1)["result"] == 2
    assert not [w for w in _warnings(d) if "token" in w.lower()], _warnings(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="only a daemon running as root warns")
def test_running_as_root_is_warned_about_with_the_unit(daemon: Daemon) -> None:
    warned = [w for w in _warnings(daemon) if "root" in w]
    assert warned, daemon.logtext()
    assert any("systemd/poold.service" in w for w in warned), warned

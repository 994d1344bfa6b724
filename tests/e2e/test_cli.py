"""The `poold` command line: argument parsing and config commands without a daemon,
then every client command end to end against a real one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from service.cli import main as cli
from service.config import Config

# -- without a daemon


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No inherited POOLD_* variable changes what a test's command does."""
    for name in list(os.environ):
        if name.startswith("POOLD_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(("text", "value"), [
    ("1", 1), ("2.5", 2.5), ("x", "x"), ("null", None), ("true", True), ('"1"', "1"),
    ('{"a": [1]}', {"a": [1]}), ("[1, 2]", [1, 2]), ("hello world", "hello world"),
    ("NaN", "NaN"), ("Infinity", "Infinity"), ("-3", -3), ("", ""),
])
def test_each_arg_is_json_or_else_a_string(text: str, value: Any) -> None:
    assert cli.parse_arg(text) == value


def test_submit_options_follow_the_subcommand() -> None:
    args = cli.build_parser().parse_args(
        ["submit", "m:f", "1", "x", "-2", "--kwargs", '{"k": 2}', "--timeout", "9", "--priority", "7",
         "--retries", "2", "--key", "k1", "--wait", "--url", "http://h:1", "--token", "t", "--json"])
    assert (args.fn, args.args, args.kwargs) == ("m:f", [1, "x", -2], {"k": 2})
    assert (args.timeout, args.priority, args.retries, args.key) == (9.0, 7, 2, "k1")
    assert args.wait and args.json and (args.url, args.token) == ("http://h:1", "t")


def test_url_and_token_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(["health"])
    assert (args.url, args.token) == ("http://127.0.0.1:8321", None)
    monkeypatch.setenv("POOLD_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("POOLD_TOKEN", "secret")
    args = cli.build_parser().parse_args(["jobs"])
    assert (args.url, args.token) == ("http://127.0.0.1:9", "secret")
    args = cli.build_parser().parse_args(["jobs", "--url", "http://127.0.0.1:10"])
    assert args.url == "http://127.0.0.1:10"


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["submit"], ["submit", "m:f", "--kwargs", "[1]"], ["submit", "m:f", "--kwargs", "{"],
    ["status"], ["status", "x", "--wait", "-1"], ["jobs", "--state", "done"], ["serve", "--port", "x"],
])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "submit" in capsys.readouterr().out
    assert cli.main(["submit", "--help"]) == 0
    assert "--kwargs" in capsys.readouterr().out


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[pool]\nworkers = 3\n[jobs]\nallow = ["x:*"]\n')
    assert cli.main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: ok"
    for text, key in [("[pool]\nwrokers = 3\n", "wrokers"), ("[pool]\nworkers = 'many'\n", "workers"),
                      ("[poool]\nx = 1\n", "poool"), ("[pool\n", "invalid TOML")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        assert cli.main(["check-config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "bad.toml" in err and key in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert cli.main(["check-config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    # the environment's overrides apply as for serve, and the error names the variable
    monkeypatch.setenv("POOLD_POOL_WORKERS", "many")
    assert cli.main(["check-config", str(good)]) == 2
    err = capsys.readouterr().err
    assert "POOLD_POOL_WORKERS" in err and "workers" in err, err


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replaces service.daemon.main with one whose run() records the configuration it got."""
    seen: list[Config] = []
    mod = types.ModuleType("service.daemon.main")

    def run(cfg: Config, early: list[int] | None = None) -> int:
        seen.append(cfg)
        return 0

    mod.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "service.daemon.main", mod)
    return seen


def test_serve_refuses_a_bad_config_without_starting(tmp_path: Path, fake_daemon: list[Config],
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pool]\nworkers = -1\n")
    assert cli.main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "bad.toml" in err and "workers" in err
    monkeypatch.setenv("POOLD_CONFIG", str(bad))
    assert cli.main(["serve"]) == 2
    monkeypatch.delenv("POOLD_CONFIG")
    assert cli.main(["serve", "--log-level", "loud"]) == 2
    assert "--log-level" in capsys.readouterr().err
    monkeypatch.setenv("POOLD_POOL_WORKERS", "many")
    assert cli.main(["serve"]) == 2
    assert "POOLD_POOL_WORKERS" in capsys.readouterr().err
    assert fake_daemon == []


def test_serve_config_sources(tmp_path: Path, fake_daemon: list[Config],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """defaults < file ($POOLD_CONFIG or --config) < environment < flags"""
    assert cli.main(["serve"]) == 0
    assert fake_daemon[-1] == Config()
    path = tmp_path / "p.toml"
    path.write_text('[pool]\nworkers = 2\n[store]\npath = "file.db"\n[server]\nport = 1234\n')
    monkeypatch.setenv("POOLD_CONFIG", str(path))
    assert cli.main(["serve"]) == 0
    cfg = fake_daemon[-1]
    assert (cfg.pool.workers, cfg.store.path, cfg.source) == (2, "file.db", str(path))
    monkeypatch.setenv("POOLD_POOL_WORKERS", "5")
    assert cli.main(["serve"]) == 0
    assert fake_daemon[-1].pool.workers == 5
    assert cli.main(["serve", "--workers", "3", "--store", "flag.db", "--host", "::1", "--port", "99",
                     "--log-level", "debug"]) == 0
    cfg = fake_daemon[-1]
    assert (cfg.pool.workers, cfg.store.path, cfg.server.host, cfg.server.port, cfg.log.level) \
        == (3, "flag.db", "::1", 99, "debug")
    monkeypatch.setenv("POOLD_CONFIG", str(tmp_path / "nope.toml"))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert cli.main(["serve", "--config", str(empty)]) == 0  # --config wins over $POOLD_CONFIG
    assert fake_daemon[-1].source == str(empty)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("argv", [
    ["health"], ["jobs"], ["workers"], ["status", "x"], ["cancel", "x"], ["submit", "m:f", "1"],
    ["submit", "m:f", "--wait"],
])
def test_unreachable_daemon_is_one_line_and_exit_1(argv: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    assert cli.main([*argv, "--url", url]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert "cannot reach" in out.err and url in out.err and "Traceback" not in out.err
    assert len(out.err.strip().splitlines()) == 1, out.err


def test_client_commands_do_not_import_the_daemon_stack() -> None:
    code = ("import sys; from service.cli import main as cli; cli.build_parser();"
            "from service.cli import commands;"
            "print(sorted(m for m in ('aiohttp', 'uvloop', 'service.daemon.main', 'tqdm')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


# -- against a real daemon (the `daemon` fixture of conftest.py)


def poold(capsys: pytest.CaptureFixture[str], d: Any, *argv: str) -> tuple[int, str, str]:
    """Runs `poold ARGV --url <daemon>` in this process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([*argv, "--url", d.url])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_submit(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # piped, --wait prints only the result, as JSON
    assert poold(capsys, daemon, "submit", "tests.support.jobs:add", "2", "3", "--wait") == (0, "5\n", "")
    rc, out, _ = poold(capsys, daemon, "submit", "tests.support.jobs:echo", "1", "x", '{"a": [1]}', "null",
                       "-2", "--kwargs", '{"k": 2}', "--wait")
    assert rc == 0 and json.loads(out) == {"args": [1, "x", {"a": [1]}, None, -2], "kwargs": {"k": 2}}
    # --wait --json: the finished Job
    rc, out, _ = poold(capsys, daemon, "submit", "service.demo:fib", "10", "--wait", "--json")
    job = json.loads(out)
    assert rc == 0 and job["state"] == "succeeded" and job["result"] == 55
    # without --wait: the id, or the Job with every spec flag in it
    rc, out, _ = poold(capsys, daemon, "submit", "tests.support.jobs:sleep", "0.1")
    assert rc == 0 and daemon.job(out.strip())["fn"] == "tests.support.jobs:sleep"
    rc, out, _ = poold(capsys, daemon, "submit", "tests.support.jobs:sleep", "0.1", "--priority", "7",
                       "--retries", "2", "--timeout", "9", "--key", "cli-key", "--json")
    job = json.loads(out)
    assert rc == 0 and (job["args"], job["priority"], job["retries"], job["timeout"], job["key"]) \
        == ([0.1], 7, 2, 9, "cli-key")
    # the same key names the same job
    rc, out, _ = poold(capsys, daemon, "submit", "tests.support.jobs:sleep", "0.1", "--key", "cli-key")
    assert rc == 0 and out.strip() == job["id"]


def test_submit_failures(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = poold(capsys, daemon, "submit", "tests.support.jobs:boom", "--wait")
    assert rc == 1 and out == "", err
    assert "failed" in err and "ValueError" in err and "boom from tests" in err
    rc, out, err = poold(capsys, daemon, "submit", "tests.support.jobs:boom", "--wait", "--json")
    assert rc == 1 and json.loads(out)["error"]["exception"] == "ValueError"
    rc, out, err = poold(capsys, daemon, "submit", "tests.support.jobs:sleep", "10", "--timeout", "0.5",
                         "--wait")
    assert rc == 1 and out == "" and "timed_out" in err
    # refused by the daemon: 2, with the error code
    for argv, code in [(["os:system", "true"], "function_not_allowed"),
                       (["tests.support.jobs:no_such_function"], "function_not_found"),
                       (["tests.support.jobs:add", "--priority", "5000"], "invalid_request")]:
        rc, out, err = poold(capsys, daemon, "submit", *argv)
        assert rc == 2 and out == "" and code in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err


def test_status(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    done = daemon.run("tests.support.jobs:add", 1, 2)
    rc, out, _ = poold(capsys, daemon, "status", done["id"])
    assert rc == 0 and done["id"] in out and "succeeded" in out and "tests.support.jobs:add" in out
    assert "result:" in out and "3" in out
    rc, out, _ = poold(capsys, daemon, "status", done["id"], "--json")
    assert rc == 0 and json.loads(out) == done
    failed = daemon.run("tests.support.jobs:boom")
    rc, out, _ = poold(capsys, daemon, "status", failed["id"])
    assert rc == 0 and "ValueError" in out  # it exists; only --wait asks for success
    rc, out, err = poold(capsys, daemon, "status", failed["id"], "--wait", "5")
    assert rc == 1 and out == "" and "boom from tests" in err
    rc, out, err = poold(capsys, daemon, "status", "no-such-job")
    assert rc == 1 and out == "" and "not found" in err
    # --wait S: 0 once it succeeded, 1 while it still runs after S seconds
    # (piped, it prints only the result, as `submit --wait` does)
    jid = daemon.submit("tests.support.jobs:sleep", 0.5)["id"]
    rc, out, _ = poold(capsys, daemon, "status", jid, "--wait", "20", "--json")
    assert rc == 0 and json.loads(out)["state"] == "succeeded"
    assert poold(capsys, daemon, "status", jid, "--wait", "20") == (0, "0.5\n", "")
    jid = daemon.submit("tests.support.jobs:forever", timeout=60)["id"]
    rc, out, err = poold(capsys, daemon, "status", jid, "--wait", "0.3")
    assert rc == 1 and out == "" and f"{jid} still {daemon.job(jid)['state']}" in err
    rc, out, _ = poold(capsys, daemon, "status", jid, "--wait", "0", "--json")
    assert rc == 1 and json.loads(out)["id"] == jid


def test_cancel(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    jid = daemon.submit("tests.support.jobs:forever", timeout=60)["id"]
    daemon.wait_state(jid, "running")
    rc, out, _ = poold(capsys, daemon, "cancel", jid)
    assert rc == 0 and jid in out
    assert daemon.job(jid)["state"] == "cancelled"
    rc, out, err = poold(capsys, daemon, "cancel", jid)
    assert rc == 1 and "already_finished" in err
    rc, out, err = poold(capsys, daemon, "cancel", "no-such-job")
    assert rc == 1 and "not found" in err
    # waiting for a job that gets cancelled is "did not succeed"
    assert poold(capsys, daemon, "status", jid, "--wait", "1")[0] == 1


def test_jobs_workers_health(daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = poold(capsys, daemon, "jobs")
    assert rc == 0 and "no jobs" in err
    ok = daemon.run("tests.support.jobs:add", 1, 1)
    failed = daemon.run("tests.support.jobs:boom")
    rc, out, _ = poold(capsys, daemon, "jobs")
    lines = out.splitlines()
    assert rc == 0 and lines[0].split()[:3] == ["ID", "STATE", "FN"]
    assert lines[1].startswith(failed["id"]) and lines[2].startswith(ok["id"])  # newest first
    rc, out, _ = poold(capsys, daemon, "jobs", "--state", "failed", "--json")
    assert rc == 0 and [j["id"] for j in json.loads(out)["jobs"]] == [failed["id"]]
    rc, out, _ = poold(capsys, daemon, "jobs", "--limit", "1", "--json")
    assert rc == 0 and [j["id"] for j in json.loads(out)["jobs"]] == [failed["id"]]
    rc, out, _ = poold(capsys, daemon, "workers")
    workers = daemon.workers()
    assert rc == 0 and out.startswith("NAME") and all(str(w["pid"]) in out for w in workers)
    rc, out, _ = poold(capsys, daemon, "workers", "--json")
    assert rc == 0 and len(json.loads(out)["workers"]) == len(workers) == 2
    assert poold(capsys, daemon, "health") == (0, "ok\n", "")
    rc, out, _ = poold(capsys, daemon, "health", "--json")
    assert rc == 0 and json.loads(out) == daemon.get("/health").json  # the raw JSON, all of it


def test_token(daemon_factory: Any, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> None:
    d = daemon_factory(cfg={"server": {"token": "s3cret"}}).start()
    rc, _, err = poold(capsys, d, "jobs")
    assert rc == 1 and "unauthorized" in err and "Traceback" not in err
    assert poold(capsys, d, "submit", "tests.support.jobs:add", "1", "2")[0] == 2
    assert poold(capsys, d, "health")[0] == 0  # /health needs no token
    assert poold(capsys, d, "jobs", "--token", "s3cret")[0] == 0
    monkeypatch.setenv("POOLD_TOKEN", "s3cret")
    assert poold(capsys, d, "submit", "tests.support.jobs:add", "1", "2", "--wait") == (0, "3\n", "")


def run_in_terminal(argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Runs argv with stdin, stdout and stderr on a pseudo-terminal; (exit status, all it showed)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLD_")}
    try:
        p = subprocess.Popen(argv, env=dict(env, TERM="xterm"), stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True)
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal has gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif p.poll() is not None:
                break
        rc = p.wait(timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


MARKS = ([f"{i}/5" for i in range(1, 5)] + [f"{p}%" for p in (20, 40, 60, 80)]
         + [f"step {i}" for i in range(1, 5)])


def test_progress_bar_on_a_terminal(daemon: Any) -> None:
    poold_cmd = [sys.executable, "-m", "service"]
    rc, shown = run_in_terminal([*poold_cmd, "submit", "tests.support.jobs:report", "5", "0.4", "--wait",
                                 "--url", daemon.url])
    assert rc == 0, shown
    assert sum(m in shown for m in MARKS) >= 3, shown  # intermediate reports, not just the end
    assert shown.rstrip().splitlines()[-1].strip() == "5", shown
    jid = daemon.submit("tests.support.jobs:report", 5, 0.4)["id"]
    rc, shown = run_in_terminal([*poold_cmd, "status", jid, "--wait", "30", "--url", daemon.url])
    assert rc == 0 and any(m in shown for m in MARKS), shown
    assert shown.rstrip().splitlines()[-1].strip() == "5", shown
    # a job that fails: the bar ends and the error follows, exit 1
    rc, shown = run_in_terminal([*poold_cmd, "submit", "tests.support.jobs:boom", "--wait",
                                 "--url", daemon.url])
    assert rc == 1 and "boom from tests" in shown and "Traceback (most recent call last)" in shown, shown

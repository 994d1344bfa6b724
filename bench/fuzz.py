"""Hostile HTTP input against a live poold: no answer >= 500, no hang, no job lost.

    python -m bench.fuzz [--requests 100000] [--procs 4] [--quick] [--seed N]

Hypothesis generates whole requests (method, path, query string, headers, body) from the
strategies in tests/support/fuzzing.py, and each is sent over a raw socket, so that what no HTTP
library would send gets sent too: wrong types, huge numbers (1e400, 2**80), NaN/Infinity
literals, deep nesting, invalid UTF-8 and lone surrogates, strings near server.max_body_bytes,
unicode, '../' and dunder names in `fn`, wrong content types and encodings, malformed request
lines and headers. Each answer is checked: status < 500, an answer within the socket timeout
(else a hang), strict JSON (no NaN/Infinity) when it says it is JSON. At the end the daemon must
still be healthy and run a real job, every job it accepted (202) must exist and reach a final
state, and its log must hold no traceback.

Prints: requests tried, responses >= 500, hangs, no answer, invalid JSON answers, jobs accepted,
jobs lost, tracebacks in the log. Exits 1 when any of those that must be 0 is not.

The strategies, `send`, `Tally` and the checks live in tests/support/fuzzing.py, shared with
tests/e2e/test_fuzz.py (its short CI run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, free_port
from tests.support.fuzzing import ALLOW, Tally, call, fuzz, log_tracebacks, lost_jobs, real_job_runs

# -- the long run


def _proc_main(port: int, examples: int, seed: int, mutations: int, out: Any) -> None:
    tally = Tally()
    try:
        fuzz(port, examples, tally, seed, mutations)
    finally:
        out.put(tally)


def _start_daemon(tmp: Path) -> tuple[int, subprocess.Popen[bytes], Path]:
    port = free_port()
    cfg: dict[str, dict[str, Any]] = {
        "server": {"port": port},
        "pool": {"workers": 2},
        "jobs": {"allow": ALLOW, "default_timeout": 1.0, "max_timeout": 2.0},
        "store": {"path": str(tmp / "fuzz.db")},
        "supervisor": {"interval": 0.5, "kill_grace": 1.0, "shutdown_grace": 5.0},
        "log": {"level": "info"},
    }
    lines = []
    for sec, vals in cfg.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in vals.items()]
    (tmp / "poold.toml").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLD_")}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    log = tmp / "daemon.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--config", str(tmp / "poold.toml")],
            env=env,
            cwd=str(tmp),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    end = time.monotonic() + 60
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            if call(port, "GET", "/health", timeout=5)[0] == 200:
                return port, proc, log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the daemon did not start; see {log}")


def _schemathesis(port: int, seconds: float, seed: int, work: Path) -> tuple[int, str]:
    """Runs the schemathesis CLI against the daemon's /openapi.json for `seconds`; (exit status,
    its summary lines, or the tail of its output when it failed)."""
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        return 0, "not installed: skipped"
    proc = subprocess.run(
        [
            str(exe),
            "--no-color",
            "run",
            f"http://127.0.0.1:{port}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance",
            "--max-time",
            str(int(seconds)),
            "--request-timeout",
            "70",  # above the longest long-poll it may ask for (?wait=60)
            "--seed",
            str(seed),
            "--generation-database",
            "none",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=seconds * 3 + 600,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
    )
    out = proc.stdout + proc.stderr
    summary = [line.strip() for line in out.splitlines() if "generated" in line or "issues" in line.lower()]
    return proc.returncode, "; ".join(summary) if proc.returncode == 0 else out[-4000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument(
        "--mutations",
        type=int,
        default=4,
        help="byte-level mutations sent after each generated request (default 4)",
    )
    ap.add_argument(
        "--schemathesis",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then run schemathesis against /openapi.json for this long (0: not at all)",
    )
    ap.add_argument("--quick", action="store_true", help="5,000 requests")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args(argv)
    if a.quick:
        a.requests = 5000
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        port, proc, log = _start_daemon(Path(tmp))
        try:
            t0 = time.monotonic()
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            per = -(-a.requests // (a.procs * (1 + a.mutations)))  # generated requests per process
            procs = [
                ctx.Process(target=_proc_main, args=(port, per, a.seed + i, a.mutations, out))
                for i in range(a.procs)
            ]
            for p in procs:
                p.start()
            tally = Tally()
            for _ in procs:
                tally.merge(out.get())
            for p in procs:
                p.join()
            seconds = time.monotonic() - t0
            st_rc, st_summary = (
                _schemathesis(port, a.schemathesis, a.seed, Path(tmp)) if a.schemathesis else (0, "")
            )
            healthy = call(port, "GET", "/health")[0] == 200
            runs, _ = real_job_runs(port)
            lost = lost_jobs(port, tally.accepted)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        text = log.read_text(errors="replace")
        tbs = log_tracebacks(text)
        other = tbs["other"]
        tracebacks = len(other)
        print(
            f"requests tried:          {tally.requests} in {seconds:.0f} s (seed {a.seed}, {a.procs} procs)"
        )
        print(f"statuses:                {dict(sorted(tally.statuses.items()))}")
        print(f"responses >= 500:        {len(tally.server_errors)}")
        print(f"hangs:                   {len(tally.hangs)}")
        print(f"closed without answer:   {len(tally.no_answer)} (malformed requests may get none)")
        print(
            f"left incomplete:         {tally.incomplete} (mutations the server waits to see the end of,"
            " serving others)"
        )
        print(f"invalid JSON answers:    {len(tally.invalid_json)}")
        print(f"bad error shapes:        {len(tally.bad_error_shape)}")
        print(f"jobs accepted:           {len(set(tally.accepted))} {dict(tally.accepted_fns)}")
        print(f"jobs lost:               {len(lost)}")
        print(f"healthy afterwards:      {healthy}; a real job ran: {runs}")
        print(
            f"tracebacks in the log:   {tracebacks}, and {len(tbs['bad_http'])} for malformed HTTP messages,"
            f" {len(tbs['client_gone'])} for clients gone mid-body (logged as errors);"
            f" exit status after SIGTERM: {rc}"
        )
        if a.schemathesis:
            print(f"schemathesis:            exit status {st_rc}; {st_summary}")
        for kind, samples in tally.problems().items():
            print(f"\n{kind}: {len(samples)}; samples:")
            for s in dict.fromkeys(samples[:8]):
                print("  ", s[:600])
        for tb in list(dict.fromkeys(other))[:3]:
            print("\na traceback in the log:\n" + tb)
        bad = tally.problems() or lost or not healthy or not runs or tracebacks or rc != 0 or st_rc != 0
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Job code never runs in `poold: main` (CONTRACT.md, "The daemon never runs job code in its own
process"): lookups are a probe's, misbehaving modules leave the daemon alone, and a reload
brings edited code in without a restart or a failed job."""

from __future__ import annotations

import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, expect_error, wait_for

pytestmark = pytest.mark.stores("sqlite", "postgres")

MODULES = {
    "jc_sleepy": "import time\ntime.sleep(3)\n",
    "jc_noisy": "import sys\nprint('JC-NOISY-IMPORT')\nsys.stderr.write('JC-NOISY-STDERR\\n')\n",
    "jc_crashy": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "jc_raising": "raise RuntimeError('jc_raising refuses')\n",
}
BODY = "\ndef f(x=1):\n    return x\n"


def _code_daemon(factory: Any, tmp_path: Path, modules: dict[str, str], **cfg: Any) -> Daemon:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    for name, text in modules.items():
        (code / f"{name}.py").write_text(text)
    allow = ["service.demo:*", "tests.support.jobs:*", *(f"{m}:*" for m in modules)]
    d = factory(cfg={"jobs": {"allow": allow}, **cfg})
    d.env["PYTHONPATH"] += f":{code}"
    d.notes["code"] = code
    return d


def _health_latencies(d: Daemon, until: threading.Event) -> list[float]:
    out = []
    while not until.is_set() or len(out) < 5:
        t = time.perf_counter()
        d.get("/health", timeout=5)
        out.append(time.perf_counter() - t)
        time.sleep(0.02)
    return out


@pytest.mark.parametrize("module, status, says", [
    ("jc_sleepy", 202, None),
    ("jc_noisy", 202, None),
    ("jc_crashy", 422, "crashed"),
    ("jc_raising", 422, "RuntimeError: jc_raising refuses"),
])
def test_a_misbehaving_module_never_slows_or_pollutes_the_daemon(daemon_factory: Any, tmp_path: Path,
                                                                   module: str, status: int,
                                                                   says: str | None) -> None:
    d = _code_daemon(daemon_factory, tmp_path, {module: MODULES[module] + BODY}).start()
    done = threading.Event()
    answer: list[Any] = []

    def submit() -> None:
        answer.append(d.post("/v1/jobs", {"fn": f"{module}:f", "args": [7]}))
        done.set()

    t = threading.Thread(target=submit)
    t.start()
    lat = _health_latencies(d, done)
    t.join()
    assert statistics.median(lat) < 0.1 and max(lat) < 0.5, lat
    r = answer[0]
    if status == 202:
        assert r.status == 202, r
        assert d.wait_done(r.json["id"])["result"] == 7
    else:
        assert says in expect_error(r, status, "function_not_found")["message"]
        # learned: the second submit is answered at once, from what the daemon knows
        t0 = time.perf_counter()
        expect_error(d.post("/v1/jobs", {"fn": f"{module}:f"}), status, "function_not_found")
        assert time.perf_counter() - t0 < 0.5
    log = d.logtext(200_000)
    for line in log.splitlines():
        assert "JC-NOISY" not in line or (r.json or {}).get("id", "?") in line, line  # labelled, if at all
    assert d.get("/health").status == 200


def test_poold_main_never_imports_a_job_module(daemon_factory: Any, tmp_path: Path) -> None:
    mark = tmp_path / "imported-by"
    d = _code_daemon(daemon_factory, tmp_path, {
        "jc_marked": f"import os\nopen({str(mark)!r}, 'a').write(f'{{os.getpid()}}\\n')\n" + BODY}).start()
    assert d.run("jc_marked:f", 3)["result"] == 3
    expect_error(d.post("/v1/jobs", {"fn": "jc_marked:nope"}), 422, "function_not_found")
    assert d.proc is not None
    pids = {int(p) for p in mark.read_text().split()}
    assert pids and d.proc.pid not in pids


def test_a_lookup_that_outlasts_ten_seconds_is_refused_and_the_daemon_serves_on(
        daemon_factory: Any, tmp_path: Path) -> None:
    d = _code_daemon(daemon_factory, tmp_path, {"jc_stuck": "import time\ntime.sleep(60)\n" + BODY}).start()
    t0 = time.monotonic()
    err = expect_error(d.post("/v1/jobs", {"fn": "jc_stuck:f"}, timeout=30), 422, "function_not_found")
    assert 9 < time.monotonic() - t0 < 13 and "timed out" in err["message"]
    assert d.run("service.demo:fib", 10)["result"] == 55  # the pool and the next lookup are fine
    assert d.submit("tests.support.jobs:add", 1, 2)


def test_a_reload_brings_edited_and_new_code_in_without_failing_a_job(daemon_factory: Any,
                                                                      tmp_path: Path) -> None:
    d = _code_daemon(daemon_factory, tmp_path, {"jc_live": "import time\n\ndef v():\n    return 1\n\n"
                                                            "def slow(s):\n    time.sleep(s)\n"
                                                            "    return 'old'\n"}).start()
    assert d.run("jc_live:v")["result"] == 1
    expect_error(d.post("/v1/jobs", {"fn": "jc_live:w"}), 422, "function_not_found")
    slow = d.submit("jc_live:slow", 2)
    d.wait_state(slow["id"], "running")
    old_pids = {w["pid"] for w in d.workers()}
    (d.notes["code"] / "jc_live.py").write_text("import time\n\ndef v():\n    return 2\n\ndef w():\n"
                                                "    return 'new'\n\ndef slow(s):\n    time.sleep(s)\n"
                                                "    return 'new'\n")
    d.signal(signal.SIGHUP)
    after = wait_for(lambda: (j := d.run("jc_live:v"))["result"] == 2 and j, 15)
    assert after["worker"]["pid"] not in old_pids
    assert d.run("jc_live:w")["result"] == "new"
    done = d.wait_done(slow["id"])
    assert done["state"] == "succeeded" and done["result"] == "old", done
    wait_for(lambda: not ({w["pid"] for w in d.live_workers()} & old_pids), 15)


def test_health_counts_workers_being_replaced_as_alive(daemon: Daemon) -> None:
    """A cancel of every running job replaces every worker: no 503 for that."""
    ids = [daemon.submit("service.demo:sleep", 30)["id"] for _ in range(2)]
    for jid in ids:
        daemon.wait_state(jid, "running")
    for jid in ids:
        assert daemon.delete(f"/v1/jobs/{jid}").status == 200
    seen = set()
    end = time.monotonic() + 2
    while time.monotonic() < end:
        seen.add(daemon.get("/health").status)
        time.sleep(0.01)
    assert seen == {200}


def test_the_first_health_answer_after_start_is_200(daemon_factory: Any) -> None:
    d = daemon_factory().start(wait=False)

    def answer() -> int | None:
        try:
            return d.get("/health", timeout=5).status
        except OSError:
            return None

    assert wait_for(answer, 30, 0.005) == 200


def test_a_function_gone_by_the_time_it_runs_fails_function_not_found(daemon_factory: Any,
                                                                      tmp_path: Path) -> None:
    d = _code_daemon(daemon_factory, tmp_path, {"jc_gone": "def f():\n    return 1\n"},
                     pool={"workers": 1}).start()
    busy = d.submit("tests.support.jobs:sleep", 1.0)
    d.wait_state(busy["id"], "running")
    job = d.submit("jc_gone:f")  # found by the probe; the worker has not imported it yet
    (d.notes["code"] / "jc_gone.py").unlink()
    done = d.wait_done(job["id"], 30)
    assert done["state"] == "failed" and done["error"]["type"] == "function_not_found", done
    assert "jc_gone" in done["error"]["message"], done

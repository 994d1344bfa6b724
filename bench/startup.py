"""Start-up time: `poold serve` started → first job accepted (202) → first job finished.

    python -m bench.startup [--runs 5] [--workers 2] [--quick]

Each run starts a fresh daemon on a new store (the `poold` console script next to this
Python, else `python -m service`), and from the moment of the spawn a client POSTs
bench.jobs:noop every 2 ms until one is accepted (202), then long-polls the job until it has
finished (GET /v1/jobs/{id}?wait=30). The daemon is then stopped (SIGTERM) before the next run.

Two settings, `--runs` runs each (medians reported):
  env       the environment as inherited (here PYTHONDONTWRITEBYTECODE=1 may be set: then
            service/ is compiled from source at every start);
  bytecode  with a bytecode cache (PYTHONPYCACHEPREFIX, filled by one untimed start), as an
            installed distribution has.
For reference: a bare ProcessPoolExecutor(workers, forkserver) in a fresh interpreter, spawn →
first result, in the same settings.
Target (issue 7): median start → first job accepted <= 1 s (judged on the inherited environment).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.concurrency import Neighbours, wait_quiet
from bench.harness import REPO, free_port, stop

TARGET_S = 1.0

_PPE_SNIPPET = """
import multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
from bench.jobs import noop
if __name__ == "__main__":
    ex = ProcessPoolExecutor(int(sys.argv[1]), mp_context=multiprocessing.get_context("forkserver"))
    print(ex.submit(noop, 1).result(), flush=True)
    ex.shutdown()
"""


def _env(cache: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLD_")}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    if cache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = cache
    return env


def _command(cfg: Path) -> list[str]:
    script = Path(sys.executable).with_name("poold")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "service"]
    return [*head, "serve", "--config", str(cfg)]


def _post(port: int, body: bytes) -> tuple[int, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", "/v1/jobs", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        c.close()


def one_start(workers: int, cache: str | None) -> tuple[float, float]:
    """(seconds to the first 202, seconds to that job finished) of one fresh daemon."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = Path(tmp) / "poold.toml"
        cfg.write_text(f"[server]\nport = {port}\n[pool]\nworkers = {workers}\n"
                       f'[jobs]\nallow = ["bench.jobs:*"]\n[store]\npath = "{Path(tmp) / "s.db"}"\n'
                       '[log]\nlevel = "warning"\n')
        body = json.dumps({"fn": "bench.jobs:noop", "args": [1]}).encode()
        t0 = time.perf_counter()
        proc = subprocess.Popen(_command(cfg), env=_env(cache), cwd=tmp, start_new_session=True,
                                stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    status, job = _post(port, body)
                    if status == 202:
                        break
                except OSError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"poold exited with {proc.returncode}")
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("no job accepted within 30 s")
                time.sleep(0.002)
            accepted = time.perf_counter() - t0
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("GET", f"/v1/jobs/{job['id']}?wait=30")
            done = json.loads(c.getresponse().read())
            c.close()
            finished = time.perf_counter() - t0
            assert done["state"] == "succeeded", done
            return accepted, finished
        finally:
            stop(proc)


def bare_start(workers: int, cache: str | None) -> float:
    """Seconds from spawning a fresh interpreter to a bare ProcessPoolExecutor's first result."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _PPE_SNIPPET, str(workers)], env=_env(cache),
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    dt = time.perf_counter() - t0
    proc.wait(30)
    assert line.strip() == b"1", line
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 runs per setting")
    a = ap.parse_args()
    if a.quick:
        a.runs = 2
    results: dict[str, tuple[list[float], list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as cache, Neighbours() as nb:
        for setting, prefix in (("env", None), ("bytecode", cache)):
            if prefix is not None:  # fill the cache: one untimed start of each
                one_start(a.workers, prefix)
                bare_start(a.workers, prefix)
            acc, fin, bare = [], [], []
            for _ in range(a.runs):
                wait_quiet(5 if a.quick else 30)
                x, y = one_start(a.workers, prefix)
                acc.append(x)
                fin.append(y)
                bare.append(bare_start(a.workers, prefix))
            results[setting] = (acc, fin, bare)
    cmd = " ".join(_command(Path("CFG"))[:2])
    print(f"start-up of `{cmd}` ({a.workers} workers), median of {a.runs} runs; {nb.note()}")
    for setting, (acc, fin, bare) in results.items():
        print(f"  {setting:8s}: → first job accepted {statistics.median(acc):.3f} s"
              f" (runs: {', '.join(f'{x:.3f}' for x in acc)})")
        print(f"            → first job finished {statistics.median(fin):.3f} s"
              f" (runs: {', '.join(f'{x:.3f}' for x in fin)})")
        m_fin, m_bare = statistics.median(fin), statistics.median(bare)
        print(f"            bare ProcessPoolExecutor, interpreter → first result {m_bare:.3f} s"
              f" (poold finished / bare: {m_fin / m_bare:.2f})")
    acc_env = statistics.median(results["env"][0])
    ok = acc_env <= TARGET_S
    print(f"target: start → first job accepted <= {TARGET_S:g} s: {acc_env:.3f} s"
          f" (with bytecode cache {statistics.median(results['bytecode'][0]):.3f} s)"
          f" -> {'HOLDS' if ok else 'MISSED'}")
    print("RESULT " + json.dumps({"measure": "startup: start -> first job accepted (median)",
                                  "target": f"<= {TARGET_S:g} s", "figure": f"{acc_env:.3f} s", "ok": ok}))
    print("RESULT " + json.dumps({"measure": "startup: start -> first job finished (median)", "target": "-",
                                  "figure": f"{statistics.median(results['env'][1]):.3f} s", "ok": None}))


if __name__ == "__main__":
    main()

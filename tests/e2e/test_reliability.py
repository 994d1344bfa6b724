"""No accepted job is lost: a short crash loop under load (the long one is `python -m bench.crashloop`).

Submitter threads send single jobs and batches (some with retries, some with idempotency keys)
while the daemon is SIGKILLed and started again on the same store. Every job the daemon answered
for must exist and end final (also after one more clean restart), none may run again after its
success was committed, jobs with more retries than there were kills must succeed, one job per
key, and the store must pass `PRAGMA integrity_check`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.crashloop import report, run
from tests.support.daemon import Daemon

CFG: dict[str, dict[str, Any]] = {
    "server": {"max_body_bytes": 8 << 20},
    "pool": {"workers": 2},
    "jobs": {"allow": ["bench.jobs:*", "tests.support.jobs:*"], "max_queue": 1_000_000},
    "supervisor": {"interval": 0.5, "kill_grace": 1.0, "shutdown_grace": 5.0},
}


def test_crash_loop_under_load(daemon_factory: Any, tmp_path: Path) -> None:
    d: Daemon = daemon_factory(cfg=CFG).start()
    res = run(d, record=str(tmp_path / "executions.log"), submitters=8, restarts=3, up=(0.8, 1.6),
              settle=90.0, seed=8)
    text = report(res) + "\nlog:\n" + d.logtext(3000)
    assert res.accepted > 100, text  # there was load
    assert not res.lost, text
    assert not res.ran_after_success, text
    assert not res.changed_after_final, text
    assert not res.retried_not_succeeded, text
    assert not res.key_duplicates, text
    assert not res.unexpected, text
    assert res.integrity == "ok", text
    # The contract: a job that was running when the daemon died is retried only while it has
    # retries left, else it fails as `interrupted` — also one whose start the store never heard of
    # (a batch member that began in the worker just before the SIGKILL): see service.engine.ledger.
    assert not res.over_retries, text

"""Runs tests/e2e/systemd/e2e.sh: poold under a real systemd (PID 1 of a systemd-nspawn container).

It needs root and the systemd sandbox (sandbox.sh, which installs
systemd-nspawn with apt the first time); elsewhere it is skipped with the reason.
Set POOLD_SKIP_SYSTEMD_E2E=1 to skip it on purpose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "e2e.sh"
SANDBOX_CANDIDATES = (
    HERE.parents[3] / "shared" / "tools" / "systemd-sandbox" / "sandbox.sh",
    Path("/work/shared/tools/systemd-sandbox/sandbox.sh"),
)


def _sandbox() -> Path | None:
    env = os.environ.get("SD_SANDBOX")
    candidates = (Path(env),) if env else SANDBOX_CANDIDATES
    return next((p for p in candidates if p.is_file() and os.access(p, os.X_OK)), None)


def _skip_reason() -> str | None:
    """Why the end-to-end run cannot happen here, or None when it can."""
    if os.environ.get("POOLD_SKIP_SYSTEMD_E2E") == "1":
        return "POOLD_SKIP_SYSTEMD_E2E=1"
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn boots a container)"
    if _sandbox() is None:
        return "systemd sandbox (sandbox.sh) not found; set SD_SANDBOX"
    if not shutil.which("bash"):
        return "needs bash"
    # sandbox.sh setup installs systemd-container + debootstrap with apt when they are missing
    if not shutil.which("systemd-nspawn") and not shutil.which("apt-get"):
        return "needs systemd-nspawn (or apt-get to install it)"
    return None


@pytest.mark.timeout(1200)
def test_poold_under_real_systemd() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "SD_SANDBOX": str(_sandbox())}
    env.setdefault("POOLD_E2E_PYTHON", sys.executable)
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1150,
    )
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    ok = proc.returncode == 0 and summary.endswith(" 0 failed")
    assert ok, f"e2e.sh exit {proc.returncode}:\n{proc.stdout}"

"""Fixtures for every test: daemons that are always closed, and a session with no process left.

The helpers themselves live in tests/support (shared with bench/).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.daemon import Daemon, proc_args, session_leftovers


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """make(cfg=..., env=..., extra_args=..., token=...) -> an unstarted Daemon; all closed at teardown."""
    made: list[Daemon] = []

    def make(**kw: Any) -> Daemon:
        d = Daemon(tmp_path / f"d{len(made)}", **kw)
        made.append(d)
        return d

    yield make
    failures = []
    for d in made:
        try:
            d.close()
        except Exception as e:  # noqa: BLE001 - close every daemon even when one fails
            failures.append(e)
    if failures:
        raise failures[0]


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A started daemon with the default test configuration (2 workers)."""
    return daemon_factory().start()


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_session() -> Iterator[None]:
    yield
    left = session_leftovers()
    daemons = []
    for p in left:
        args = proc_args(p.pid)
        if "poold" in args or "-m service serve" in args:
            daemons.append(f"{p.pid} {args!r}")
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not daemons, "poold processes outlived the test session: " + ", ".join(daemons)

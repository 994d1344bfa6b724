"""Fixtures for every test: daemons that are always closed, and a session with no process left.

The helpers themselves live in tests/support (shared with bench/).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import postgres
from tests.support.daemon import Daemon, proc_args, session_leftovers


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.PgServer]:
    """One throwaway PostgreSQL server for the session (each test takes a schema of its own)."""
    if (why := postgres.available()) is not None:
        if os.environ.get("POOLD_REQUIRE_POSTGRES") == "1":  # CI: a skip would hide half the suite
            pytest.fail(why)
        pytest.skip(why)
    server = postgres.PgServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `pytest.mark.stores("sqlite", "postgres")` runs its daemons on each store."""
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is not None and "store_kind" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", marker.args, ids=[f"store={k}" for k in marker.args])


@pytest.fixture
def store_kind() -> str:
    """The store of the test's daemons: "sqlite" unless the module asks for more (see above)."""
    return "sqlite"


@pytest.fixture
def daemon_factory(tmp_path: Path, store_kind: str,
                   request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """make(cfg=..., env=..., extra_args=..., token=...) -> an unstarted Daemon; all closed at teardown.

    On store_kind "postgres" every daemon of the test is a host of one cluster (a schema of its
    own on the session's server), unless its cfg names a store.url itself."""
    made: list[Daemon] = []
    shared: dict[str, dict[str, Any]] = {}
    if store_kind == "postgres":
        server: postgres.PgServer = request.getfixturevalue("pg_server")
        shared = {"store": {"url": server.url(), "schema": postgres.fresh_schema()}}

    def make(**kw: Any) -> Daemon:
        if shared:
            cfg = kw.get("cfg") or {}
            kw["cfg"] = {**cfg, "store": {**shared["store"], **cfg.get("store", {})},
                         "cluster": {"name": f"h{len(made) + 1}", **cfg.get("cluster", {})}}
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

"""poold on PostgreSQL beside poold on SQLite, in one run, on one local throwaway server.

    python -m bench.cluster [--jobs 10000] [--workers 2] [--repeat 2] [--quick]

Prints: N no-op jobs through one host's batch API (submit → every result) on SQLite and on
PostgreSQL, and their ratio (target ≥ 0.5); three hosts draining one queue together against
one host (the same jobs, submitted to the first host; target ≥ 0.8); one client's submit →
?wait round trip p50/p99 on each store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator

from bench.harness import daemon
from bench.throughput import poold_batch, round_trips
from tests.support import postgres


@contextlib.contextmanager
def hosts(server: postgres.PgServer, n: int, workers: int) -> Iterator[list[int]]:
    """n daemons on one fresh schema; their ports."""
    schema = postgres.fresh_schema()
    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(daemon(workers, store={"url": server.url(), "schema": schema},
                                            cluster={"name": f"h{i + 1}"}))[0] for i in range(n)]
        yield ports


def p50_p99(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"p50 {statistics.median(xs) * 1e3:.2f} ms, p99 {xs[int(len(xs) * 0.99) - 1] * 1e3:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trips", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2, help="rounds per figure; the best counts")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.jobs, a.trips, a.repeat = 2000, 200, 1
    if (why := postgres.available()) is not None:
        raise SystemExit(f"bench.cluster: {why}")
    server = postgres.PgServer()
    server.start()
    try:
        with daemon(a.workers) as (port, _):
            lite = min(poold_batch(port, a.jobs) for _ in range(a.repeat))
            lite_trips = round_trips(port, a.trips)
        with hosts(server, 1, a.workers) as [port]:
            one = min(poold_batch(port, a.jobs) for _ in range(a.repeat))
            pg_trips = round_trips(port, a.trips)
        with hosts(server, 3, a.workers) as ports:
            three = min(poold_batch(ports[0], a.jobs) for _ in range(a.repeat))
    finally:
        server.remove()
    print(f"no-op jobs: {a.jobs}, workers per host: {a.workers}, best of {a.repeat}; one local PostgreSQL"
          " (fsync off: the database's disk is not what is measured)")
    print(f"  SQLite, one host            : {lite:.3f} s  {a.jobs / lite:,.0f} jobs/s")
    print(f"  PostgreSQL, one host        : {one:.3f} s  {a.jobs / one:,.0f} jobs/s"
          f"  ratio to SQLite {lite / one:.2f} (target >= 0.5)")
    print(f"  PostgreSQL, three hosts     : {three:.3f} s  {a.jobs / three:,.0f} jobs/s"
          f"  ratio to one host {one / three:.2f} (target >= 0.8)")
    print(f"submit → ?wait round trip ({a.trips}): SQLite {p50_p99(lite_trips)};"
          f" PostgreSQL {p50_p99(pg_trips)}")
    for measure, target, ratio, want in (
            ("cluster: 10k no-op batch, PostgreSQL / SQLite", ">= 0.5", lite / one, 0.5),
            ("cluster: three hosts draining / one host", ">= 0.8", one / three, 0.8)):
        print("RESULT " + json.dumps({"measure": measure, "target": target, "figure": f"{ratio:.2f}",
                                      "ok": ratio >= want}))
    print("RESULT " + json.dumps({"measure": "cluster: submit -> ?wait p50, PostgreSQL", "target": "-",
                                  "figure": f"{statistics.median(pg_trips) * 1e3:.2f} ms", "ok": None}))


if __name__ == "__main__":
    main()

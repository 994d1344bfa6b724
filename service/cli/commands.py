"""The client commands (`submit`, `status`, `cancel`, `jobs`, `workers`, `health`).

Each talks to the daemon through `service.client.Client` and turns the answer
into output and an exit status: 0 ok, 1 not ok (the job did not succeed, was
not found, the daemon is unhealthy or unreachable), 2 a submission refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.cli.output import Job, error, job_lines, jobs_table, print_json, report_failure, workers_table
from service.cli.progress import follow, on_terminal

if TYPE_CHECKING:
    from service.client import Client


def run(name: str, args: argparse.Namespace) -> int:
    """Runs one client command; connection and HTTP errors become a message and exit 1."""
    from service.client import Client, PooldError, PooldUnavailable

    try:
        client = Client(url=args.url, token=args.token)
    except ValueError as e:  # a malformed --url
        error(f"invalid --url {args.url!r}: {e}")
        return 2
    try:
        with client:
            return _HANDLERS[name](client, args)
    except PooldUnavailable as e:
        error(f"cannot reach the daemon at {args.url}: {_unreachable(e)}")
        return 1
    except PooldError as e:
        error(str(e))
        return 1


def _unreachable(e: BaseException) -> str:
    """Why the daemon could not be reached, in a few words ("Connection refused")."""
    cause = e.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause or e)


def submit(client: Client, args: argparse.Namespace) -> int:
    from service.client import PooldError, PooldUnavailable

    try:
        job = client.submit(args.fn, *args.args, kwargs=args.kwargs, timeout=args.timeout,
                            priority=args.priority, retries=args.retries, key=args.key)
    except PooldUnavailable:
        raise
    except PooldError as e:
        if e.status is not None and 400 <= e.status < 500:  # the daemon refused this request
            error(f"refused: {e}")
            return 2
        raise
    if not args.wait:
        if args.json:
            print_json(job)
        else:
            print(job["id"])
        return 0
    return _wait_and_finish(client, job, None, args.json)


def _wait_and_finish(client: Client, job: Job, seconds: float | None, as_json: bool) -> int:
    """Waits for the job and reports it; Ctrl-C only stops the waiting, and says so."""
    try:
        job = follow(client, job, seconds, bar=on_terminal())
    except KeyboardInterrupt:
        jid = job["id"]
        error(f"stopped waiting; job {jid} carries on (poold status {jid}, poold cancel {jid})")
        return 130
    return _finish(job, as_json)


def _finish(job: Job, as_json: bool) -> int:
    """Output for a waited-for job: the Job (--json) or only its result; 1 unless it succeeded."""
    ok = job["state"] == "succeeded"
    if as_json:
        print_json(job)
    elif ok:
        print(json.dumps(job.get("result"), ensure_ascii=False))
    if not ok:
        report_failure(job)
    return 0 if ok else 1


def status(client: Client, args: argparse.Namespace) -> int:
    from service.client import PooldError

    try:
        job = client.get(args.id)
    except PooldError as e:
        if e.status == 404:
            error(f"job {args.id} not found")
            return 1
        raise
    if args.wait is not None:  # like `submit --wait`: the result, or why there is none
        return _wait_and_finish(client, job, args.wait, args.json)
    if args.json:
        print_json(job)
    else:
        print("\n".join(job_lines(job)))
    return 0


def cancel(client: Client, args: argparse.Namespace) -> int:
    from service.client import PooldError

    try:
        job = client.cancel(args.id)
    except PooldError as e:
        if e.status == 404:
            error(f"job {args.id} not found")
            return 1
        if e.status == 409:
            error(f"job {args.id} not cancelled: {e}")
            return 1
        raise
    if args.json:
        print_json(job)
    else:
        print(f"cancelled {job['id']}")
    return 0


def jobs(client: Client, args: argparse.Namespace) -> int:
    found = client.jobs(state=args.state, limit=args.limit)
    if args.json:
        print_json({"jobs": found})
    elif found:
        print("\n".join(jobs_table(found)))
    else:
        print("no jobs" + (f" in state {args.state}" if args.state else ""), file=sys.stderr)
    return 0


def workers(client: Client, args: argparse.Namespace) -> int:
    found = client.workers()
    if args.json:
        print_json({"workers": found})
    else:
        print("\n".join(workers_table(found)))
    return 0


def health(client: Client, args: argparse.Namespace) -> int:
    report = client.health_report()
    ok = report.get("status") == "ok"
    if args.json:
        print_json(report)
    else:
        reasons = "; ".join(map(str, report.get("reasons") or ()))
        print("ok" if ok else f"unhealthy: {reasons}" if reasons else "unhealthy")
    return 0 if ok else 1


_HANDLERS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "submit": submit, "status": status, "cancel": cancel, "jobs": jobs, "workers": workers,
    "health": health,
}

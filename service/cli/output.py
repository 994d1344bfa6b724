"""How the client commands show Jobs and Workers to a person (tables, a few lines).

`--json` bypasses all of this and prints the API's JSON unchanged.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

Job = dict[str, Any]

FINISHED = frozenset({"succeeded", "failed", "timed_out", "cancelled"})


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def error(message: str) -> None:
    """One line on stderr, prefixed like every CLI message."""
    print(f"poold: {message}", file=sys.stderr)


def compact(value: Any, limit: int = 0) -> str:
    """A value as one line of JSON, cut to `limit` characters when that is set."""
    text = json.dumps(value, ensure_ascii=False)
    if limit and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def number(x: Any) -> Any:
    """3.0 -> 3 and 1.000129 -> 1, so progress reads "3/5" rather than "3.0/5.0"."""
    if isinstance(x, float):
        x = round(x, 2)
        return int(x) if x.is_integer() else x
    return x


def progress_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return ""
    current, total = number(progress.get("current")), number(progress.get("total"))
    text = f"{current}/{total}" if total is not None else f"{current}"
    if progress.get("message"):
        text += f" {progress['message']}"
    return text


def error_text(job: Job) -> str:
    """One line: why a job did not succeed."""
    err = job.get("error") or {}
    if not err:
        return job["state"]
    parts = [str(err.get("type") or job["state"])]
    exc, message = err.get("exception"), str(err.get("message") or "")
    if exc and not message.startswith(f"{exc}:"):  # the daemon may have named it already
        parts.append(str(exc))
    if message:
        parts.append(message)
    return ": ".join(parts)


def report_failure(job: Job) -> None:
    """On stderr: why the job did not succeed, with the remote traceback of an exception."""
    state = job["state"]
    if state == "cancelled":
        error(f"job {job['id']} was cancelled")
        return
    if state not in FINISHED:  # `status --wait S` ran out of time
        done = progress_text(job.get("progress"))
        error(f"job {job['id']} still {state}" + (f" ({done})" if done else ""))
        return
    error(f"job {job['id']} {state}: {error_text(job)}")
    tb = (job.get("error") or {}).get("traceback")
    if tb:
        print(tb.rstrip("\n"), file=sys.stderr)


def job_lines(job: Job) -> list[str]:
    """`poold status`: the fields a person looks at first."""
    rows: list[tuple[str, str]] = [("id", job["id"]), ("fn", job["fn"]), ("state", job["state"])]
    if job.get("args") or job.get("kwargs"):
        call = ", ".join([compact(a) for a in job.get("args") or []]
                         + [f"{k}={compact(v)}" for k, v in (job.get("kwargs") or {}).items()])
        rows.append(("call", f"({call})"))
    if job.get("progress"):
        rows.append(("progress", progress_text(job["progress"])))
    rows.append(("attempts", f"{job.get('attempts', 0)} of {1 + (job.get('retries') or 0)}"))
    worker = job.get("worker")
    if worker:
        rows.append(("worker", f"{worker.get('name')} (pid {worker.get('pid')})"))
    for key in ("created_at", "started_at", "finished_at"):
        if job.get(key):
            rows.append((key.replace("_at", ""), job[key]))
    if job["state"] == "succeeded":
        rows.append(("result", compact(job.get("result"))))
    elif job.get("error"):
        rows.append(("error", error_text(job)))
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    tb = (job.get("error") or {}).get("traceback")
    if tb:
        lines.append(tb.rstrip("\n"))
    return lines


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def jobs_table(jobs: Sequence[Job]) -> list[str]:
    rows = []
    for j in jobs:
        if j["state"] == "succeeded":
            outcome = compact(j.get("result"), 40)
        elif j.get("error"):
            outcome = error_text(j)[:60]
        else:
            outcome = progress_text(j.get("progress"))[:40]
        rows.append((j["id"], j["state"], j["fn"], j.get("created_at") or "", outcome))
    return table(("ID", "STATE", "FN", "CREATED", "RESULT/ERROR"), rows)


def workers_table(workers: Sequence[dict[str, Any]]) -> list[str]:
    rows = []
    for w in workers:
        rss = w.get("rss_bytes")
        rss_text = f"{rss / 1048576:.1f} MiB" if isinstance(rss, int | float) else ""
        rows.append((w.get("name"), w.get("pid"), w.get("state"), w.get("job") or "-", rss_text,
                     w.get("tasks_done"), w.get("started_at")))
    return table(("NAME", "PID", "STATE", "JOB", "RSS", "TASKS", "STARTED"), rows)

"""Periodic schedules: the `[[schedule]]` tables checked, and their ticks (pure functions).

A tick is the planned time of one fire: for `every = S`, the multiples of S since the Unix
epoch; for `cron`, the times the five-field expression names in `timezone`, read by cronsim
(the cron parser of healthchecks.io). A local time a daylight saving change skips fires just
after the change (cronsim's rule); one that occurs twice fires once, at its first occurrence.
"""

from __future__ import annotations

import datetime
import json
import math
import zoneinfo
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from cronsim import CronSim, CronSimError

KEYS = ("name", "fn", "cron", "every", "timezone", "args", "kwargs", "timeout", "priority", "retries",
        "retry_delay", "limits", "overlap")
LATE = 60.0  # seconds: a tick missed while no daemon ran fires at start only when less late than this
_SCAN = 7 * 86400.0  # seconds of missed cron ticks looked through at most


class ScheduleError(Exception):
    """A bad [[schedule]] table: `key` is the table's key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


@dataclass(frozen=True)
class Schedule:
    name: str
    fn: str
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    priority: int = 0
    retries: int = 0
    retry_delay: float = 0.0
    limits: dict[str, Any] | None = None
    overlap: bool = False

    def definition(self) -> str:
        """Canonical JSON: the text the store keeps; two definitions differ when their texts do."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_definition(cls, text: str) -> Schedule:
        return cls(**{k: v for k, v in json.loads(text).items() if k in KEYS})

    # -- ticks
    def next_after(self, t: float) -> float:
        """The first tick strictly after t."""
        if self.every is not None:
            return (math.floor(t / self.every) + 1) * self.every
        return next(self._cron_ticks(t))

    def due(self, since: float, now: float) -> tuple[int, float | None]:
        """The ticks in (since, now]: how many (counted up to a week back), and the latest."""
        if now <= since:
            return 0, None
        if self.every is not None:
            n = math.floor(now / self.every) - math.floor(since / self.every)
            return n, (math.floor(now / self.every) * self.every if n > 0 else None)
        count, latest = 0, None
        for t in self._cron_ticks(max(since, now - _SCAN)):
            if t > now:
                break
            count, latest = count + 1, t
        return count, latest

    def ticks(self, since: float, now: float, limit: int = 100) -> list[float]:
        """The ticks in (since, now], the latest `limit` of them."""
        if self.every is not None:
            lo, hi = math.floor(since / self.every) + 1, math.floor(now / self.every)
            return [k * self.every for k in range(max(lo, hi - limit + 1), hi + 1)]
        out: list[float] = []
        for t in self._cron_ticks(max(since, now - _SCAN)):
            if t > now:
                break
            out = [*out[-(limit - 1):], t] if limit > 1 else [t]
        return out

    def _cron_ticks(self, after: float) -> Iterator[float]:
        zone = zoneinfo.ZoneInfo(self.timezone)
        assert self.cron is not None
        for dt in CronSim(self.cron, datetime.datetime.fromtimestamp(after, zone)):
            if dt.fold == 1 and dt.replace(fold=0).utcoffset() != dt.utcoffset():
                continue  # the second occurrence of a repeated local time
            t = dt.timestamp()
            if t > after:
                yield t


def parse(table: Any, index: int, taken: set[str]) -> Schedule:
    """One [[schedule]] table, checked; ScheduleError names the key."""
    if not isinstance(table, dict):
        raise ScheduleError("", "expected a table")
    for k in table:
        if k not in KEYS:
            raise ScheduleError(k, f"unknown key (keys: {', '.join(KEYS)})")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or not name.isprintable():
        raise ScheduleError("name", "required: a name of 1 to 200 printable characters")
    if name in taken:
        raise ScheduleError("name", f"{name!r} is the name of an earlier schedule")
    fn = table.get("fn")
    if not isinstance(fn, str):
        raise ScheduleError("fn", "required: 'module:name'")
    mod, sep, attr = fn.partition(":")
    if not sep or not all(p.isidentifier() for p in mod.split(".")) or not attr.isidentifier():
        raise ScheduleError("fn", "required: 'module:name'")
    cron, every = table.get("cron"), table.get("every")
    if (cron is None) == (every is None):
        raise ScheduleError("cron" if cron is not None else "every", "give exactly one of cron and every")
    tz = table.get("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(tz if isinstance(tz, str) else "")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleError("timezone", f"not an IANA time zone name: {tz!r}") from None
    if cron is not None:
        if not isinstance(cron, str):
            raise ScheduleError("cron", "expected a five-field cron expression")
        try:
            CronSim(cron, datetime.datetime.now(datetime.UTC))
        except CronSimError as e:
            raise ScheduleError("cron", f"not a valid cron expression ({e}): {cron!r}") from None
        if len(cron.split()) != 5:
            raise ScheduleError("cron", f"expected five fields, got {cron!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))
                              or not math.isfinite(every) or every <= 0):
        raise ScheduleError("every", f"expected a number of seconds > 0, got {every!r}")
    args, kwargs = table.get("args", []), table.get("kwargs", {})
    if not isinstance(args, list):
        raise ScheduleError("args", "expected a list")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise ScheduleError("kwargs", "expected a table of keyword arguments")
    for k, v in (("args", args), ("kwargs", kwargs)):
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ScheduleError(k, f"only JSON values (no dates or times): {e}") from None
    timeout = table.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ScheduleError("timeout", f"expected a number of seconds > 0, got {timeout!r}")
    priority, retries = table.get("priority", 0), table.get("retries", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -1000 <= priority <= 1000:
        raise ScheduleError("priority", f"expected an integer from -1000 to 1000, got {priority!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 100:
        raise ScheduleError("retries", f"expected an integer from 0 to 100, got {retries!r}")
    retry_delay = table.get("retry_delay", 0.0)
    if isinstance(retry_delay, bool) or not isinstance(retry_delay, (int, float)) \
            or not math.isfinite(retry_delay) or retry_delay < 0:
        raise ScheduleError("retry_delay", f"expected a number of seconds >= 0, got {retry_delay!r}")
    limits = table.get("limits")
    if limits is not None and not isinstance(limits, dict):
        raise ScheduleError("limits", "expected a table")
    overlap = table.get("overlap", False)
    if not isinstance(overlap, bool):
        raise ScheduleError("overlap", f"expected true or false, got {overlap!r}")
    return Schedule(name, fn, cron, None if every is None else float(every), tz, args, kwargs,
                    None if timeout is None else float(timeout), priority, retries, float(retry_delay),
                    limits, overlap)

"""The allow list and what the daemon has learned of each function, without importing any.

A name is first judged by the patterns alone (403 when no entry matches);
whether it exists, and for a "module:*" entry whether it is a public function
defined in that module itself, is asked of the probe (service.engine.probe)
once, then remembered until the next reload, which builds a new Allow.
A lookup that timed out or crashed the probe is not remembered: the module
may import fine next time.
"""

from __future__ import annotations

import asyncio

from service.engine.probe import Probe, Verdict
from service.model import ApiError

_CODES = {403: "function_not_allowed", 422: "function_not_found"}


class Allow:
    def __init__(self, patterns: tuple[str, ...], probe: Probe | None) -> None:
        self.exact = {p for p in patterns if not p.endswith(":*")}
        self.modules = {p[:-2] for p in patterns if p.endswith(":*")}
        self.probe = probe
        self.ok: set[str] = set()  # admitted and found
        self._refused: dict[str, ApiError] = {}
        self._asking: dict[str, asyncio.Future[Verdict]] = {}  # one lookup per name at a time

    def admit(self, fn: str) -> None:
        """403 unless a pattern admits fn (cheap: no lookup)."""
        if fn in self.ok or fn in self.exact:
            return
        mod, _, name = fn.partition(":")
        if mod not in self.modules or "." in name or name.startswith("_"):
            raise ApiError(403, "function_not_allowed", f"fn: {fn!r} is not allowed by jobs.allow")

    async def check(self, fn: str) -> None:
        """Raises 403 or 422 `function_not_found` (the message says why) unless fn can run."""
        if fn in self.ok:
            return
        if (refused := self._refused.get(fn)) is not None:
            raise refused
        self.admit(fn)
        if self.probe is None:  # no pool to ask (unit tests of the layers above)
            self.ok.add(fn)
            return
        asking = self._asking.get(fn)
        if asking is None:
            asking = self._asking[fn] = asyncio.ensure_future(self.probe.find(fn, fn not in self.exact))
            asking.add_done_callback(lambda _: self._asking.pop(fn, None))
        verdict = await asyncio.shield(asking)
        if verdict.ok:
            self.ok.add(fn)
            return
        error = ApiError(verdict.status, _CODES.get(verdict.status, "function_not_found"), verdict.message)
        if verdict.lasting:
            self._refused[fn] = error
        raise error

    async def check_all(self, fns: list[str]) -> None:
        """check() for a batch: each distinct name once; the first refusal (in order) is raised,
        with its index in the batch."""
        distinct = list(dict.fromkeys(f for f in fns if f not in self.ok))
        if not distinct:
            return
        results = await asyncio.gather(*(self.check(f) for f in distinct), return_exceptions=True)
        failed = {f: r for f, r in zip(distinct, results, strict=True) if isinstance(r, BaseException)}
        for i, f in enumerate(fns):
            if (e := failed.get(f)) is not None:
                if isinstance(e, ApiError):
                    raise ApiError(e.status, e.code, f"jobs[{i}]: {e.message}") from None
                raise e

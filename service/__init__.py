"""poold: runs CPU-bound Python functions on a pool of worker processes — as a daemon (HTTP, a
durable store) or embedded in an asyncio program (`service.Pool`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.progress import progress

if TYPE_CHECKING:
    from service.engine.errors import WorkerDied
    from service.engine.pool import Pool

__all__ = ["Pool", "WorkerDied", "progress"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Pool and WorkerDied are imported on first use: a job module's `from service import
    progress`, in every worker, does not pay for the engine."""
    if name == "Pool":
        from service.engine.pool import Pool

        return Pool
    if name == "WorkerDied":
        from service.engine.errors import WorkerDied

        return WorkerDied
    raise AttributeError(f"module 'service' has no attribute {name!r}")

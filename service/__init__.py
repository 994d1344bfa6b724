"""poold: a daemon that runs CPU-bound Python functions on all the cores of one host."""

from __future__ import annotations

from service.progress import progress

__all__ = ["progress"]
__version__ = "0.1.0"
